//! The state directory against a local user who is not the router: one router per directory,
//! and no router on a directory someone else may write to.

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::Site;
use router::{
    admin::Request,
    app,
    site::{SiteConfig, StateDir},
};

/// The review's second `router run` took the admin socket, removed the first router's pins
/// and attached its programs again. It is refused in one line, before it touches anything,
/// and the first router answers as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_router_on_a_running_site_is_refused() {
    let west = Site::start("west", true).await;
    let err = app::run(StateDir::new(west.dir()), app::RunOptions::default())
        .await
        .expect_err("a second router");
    let line = err.to_string();
    assert!(
        line.contains("another router is running on")
            && line.contains(&format!("(pid {})", std::process::id())),
        "{line}"
    );
    west.call(Request::Status)
        .await
        .expect("the first router still answers");
}

/// A directory others may write to (the review's 0777 state directory, where another user
/// swapped the admin socket) is refused at start; so is one whose owner is not the user the
/// router runs as.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_does_not_start_on_a_directory_others_may_write() {
    let dir = std::env::temp_dir().join(format!("skiff-it-{}-open", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = StateDir::new(&dir);
    state
        .create(&SiteConfig {
            name: "open".into(),
            ..SiteConfig::default()
        })
        .expect("create");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let err = app::run(state.clone(), app::RunOptions::default())
        .await
        .expect_err("0777");
    assert!(err.to_string().contains("writable by others"), "{err}");

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let options = app::RunOptions {
        owner: Some(router::site::euid().wrapping_add(1)),
        ..app::RunOptions::default()
    };
    let err = app::run(state.clone(), options)
        .await
        .expect_err("another owner");
    assert!(err.to_string().contains("belongs to uid"), "{err}");
    assert!(
        !state.admin_socket().exists(),
        "refused before the admin socket"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// `site create` on a directory made in advance by someone else (here: left open to all)
/// refuses it rather than chmodding it and keeping keys there.
#[test]
fn site_create_refuses_a_directory_it_does_not_hold_alone() {
    let dir = std::env::temp_dir().join(format!("skiff-it-{}-pre", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let err = StateDir::new(&dir)
        .create(&SiteConfig {
            name: "pre".into(),
            ..SiteConfig::default()
        })
        .expect_err("refused");
    assert!(err.to_string().contains("writable by others"), "{err}");
    assert!(!dir.join("ca.key").exists());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// A connector or listener the router fails to store is not kept either: it would vanish at
/// the next restart. Storing fails here because `resources.json` is a directory the atomic
/// rename cannot replace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_that_cannot_be_stored_is_not_kept() {
    let west = Site::start("west", false).await;
    let blocker = west.dir().join("resources.json");
    std::fs::create_dir_all(blocker.join("in-the-way")).expect("block the file");
    let connector = router::service::Connector {
        name: "db".into(),
        host: "127.0.0.1".into(),
        port: 9,
        routing_key: "db".into(),
        tls: None,
    };
    let err = west
        .call(Request::ConnectorCreate {
            connector: connector.clone(),
        })
        .await
        .expect_err("nowhere to store it");
    assert!(err.to_string().contains("failed to store it"), "{err}");
    let connectors = west.call(Request::ConnectorStatus).await.expect("status");
    assert_eq!(
        connectors,
        serde_json::json!([]),
        "kept in memory: {connectors}"
    );
    let listener = router::service::Listener {
        name: "web".into(),
        host: "127.0.0.1".into(),
        port: 0,
        routing_key: "web".into(),
        namespace: None,
        allow_namespaces: vec![],
        tls: None,
    };
    let err = west
        .call(Request::ListenerCreate { listener })
        .await
        .expect_err("nowhere to store it");
    assert!(err.to_string().contains("failed to store it"), "{err}");
    let listeners = west.call(Request::ListenerStatus).await.expect("status");
    assert_eq!(
        listeners,
        serde_json::json!([]),
        "kept in memory: {listeners}"
    );

    std::fs::remove_dir_all(&blocker).expect("unblock");
    west.call(Request::ConnectorCreate { connector })
        .await
        .expect("stored once the file can be written");
}

/// A Site declares its data path in YAML; its router runs on it unless `router run
/// --datapath` says otherwise. An unknown value is refused in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_chooses_its_data_path_and_the_flag_overrides_it() {
    let yaml = |name: &str, datapath: &str| {
        format!(
            "apiVersion: skiff.io/v1alpha1\nkind: Site\nmetadata: {{name: {name}}}\nspec: {{datapath: {datapath}}}\n"
        )
    };
    let err = router::resource::parse(&yaml("fast", "fast")).expect_err("datapath: fast");
    // As the CLI prints it: the error and its causes on one line.
    let line = format!("{:#}", anyhow::Error::from(err));
    assert!(
        line.contains("unknown variant `fast`") && !line.contains('\n'),
        "{line}"
    );
    let declared = |name: &str| {
        router::resource::parse(&yaml(name, "epoll"))
            .expect("parses")
            .site
            .expect("a site")
    };
    let backend = |site: &Site| {
        let site = site.state.clone();
        async move {
            let status = router::admin::call(&site.admin_socket(), &Request::Status)
                .await
                .expect("status");
            status["datapath"].as_str().unwrap_or_default().to_owned()
        }
    };

    let mut chosen = Site::uncreated("chosen");
    chosen.state.create(&declared("chosen")).expect("create");
    chosen.run_with(None).await;
    assert_eq!(backend(&chosen).await, "epoll");

    let mut flagged = Site::uncreated("flagged");
    flagged.state.create(&declared("flagged")).expect("create");
    flagged.run_with(Some(router::datapath::Mode::Uring)).await;
    assert_eq!(backend(&flagged).await, "uring");
}
