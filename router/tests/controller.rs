//! The node controller against a real router in this process, driven by the API server's
//! answers (lists, watch events, status patches) through kube's mocked client: resources
//! become the router changes `skiff apply -f` makes, statuses say so, changes follow, and a
//! deleted resource leaves nothing in the router.

mod common;

use std::time::Duration;

use common::{Site, fake_api::FakeApi};
use router::{
    admin::Request,
    k8s::controller::{self, Options},
};
use serde_json::{Value, json};

fn names(rows: &Value) -> Vec<String> {
    rows.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect()
}

fn find<'a>(rows: &'a Value, name: &str) -> Option<&'a Value> {
    rows.as_array()?.iter().find(|r| r["name"] == name)
}

fn is(status: &'static str, reason: &'static str) -> impl Fn(&Value) -> bool {
    move |c| c["status"] == status && c["reason"] == reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_become_router_changes_and_deletes_leave_nothing() {
    let site = Site::start("west", false).await;
    let api = FakeApi::default();
    // What the cluster holds when the controller starts.
    api.apply("sites", "team-a", "west", json!({}));
    api.apply(
        "listeners",
        "team-a",
        "web",
        json!({"port": 0, "host": "127.0.0.1"}),
    );
    api.apply(
        "connectors",
        "team-a",
        "db",
        json!({"host": "127.0.0.1", "port": 5432}),
    );
    // Claims another namespace: refused.
    api.apply(
        "listeners",
        "team-b",
        "sneaky",
        json!({"port": 0, "host": "127.0.0.1", "namespace": "team-a"}),
    );
    // Not a namespace this controller serves: left alone.
    api.apply(
        "connectors",
        "elsewhere",
        "db",
        json!({"host": "127.0.0.1", "port": 1}),
    );
    let pods_root = kernel_tests::TempDir::new("no-pods").expect("temp dir");
    let options = Options {
        node: "gw-1".into(),
        namespaces: vec!["team-a".into(), "team-b".into()],
        state: site.state.clone(),
        cgroup_roots: vec![pods_root.path().to_owned()],
        resync: Duration::from_secs(3600),
    };
    let running = tokio::spawn(controller::run(api.client(), options));

    let ready = api
        .wait_ready("listeners", "team-a", "web", is("True", "Applied"))
        .await;
    assert_eq!(ready["observedGeneration"], 1);
    assert!(
        ready["lastTransitionTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    api.wait_ready("connectors", "team-a", "db", is("True", "Applied"))
        .await;
    api.wait_ready("sites", "team-a", "west", is("True", "Running"))
        .await;
    let refused = api
        .wait_ready("listeners", "team-b", "sneaky", is("False", "Refused"))
        .await;
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("own namespace")),
        "{refused}"
    );
    assert_eq!(api.ready("connectors", "elsewhere", "db"), None);

    // The router has exactly what `skiff apply -f` would have made of them.
    let listeners = site.call(Request::ListenerStatus).await.expect("listeners");
    assert_eq!(names(&listeners), ["team-a-web"]);
    assert_eq!(
        find(&listeners, "team-a-web").expect("web")["routingKey"],
        "web"
    );
    let connectors = site
        .call(Request::ConnectorStatus)
        .await
        .expect("connectors");
    assert_eq!(names(&connectors), ["team-a-db"]);
    assert_eq!(
        find(&connectors, "team-a-db").expect("db")["routingKey"],
        "db"
    );

    // A change to the spec is applied, and its status names the new generation.
    api.apply(
        "listeners",
        "team-a",
        "web",
        json!({"port": 0, "host": "127.0.0.1", "routingKey": "web-v2"}),
    );
    api.wait_ready("listeners", "team-a", "web", |c| {
        c["observedGeneration"] == 2
    })
    .await;
    let listeners = site.call(Request::ListenerStatus).await.expect("listeners");
    assert_eq!(
        find(&listeners, "team-a-web").expect("web")["routingKey"],
        "web-v2"
    );

    // A SitePolicy is the router's policy; a second one is refused.
    api.apply(
        "sitepolicies",
        "team-a",
        "policy",
        json!({"allowedServices": ["web-v2", "db"]}),
    );
    api.wait_ready("sitepolicies", "team-a", "policy", is("True", "Applied"))
        .await;
    let policy = site.call(Request::PolicyStatus).await.expect("policy");
    assert_eq!(policy["policy"]["allowedServices"], json!(["web-v2", "db"]));
    api.apply(
        "sitepolicies",
        "team-b",
        "another",
        json!({"allowedServices": []}),
    );
    api.wait_ready("sitepolicies", "team-b", "another", is("False", "Conflict"))
        .await;

    // Deletes: the listener, the connector and the policies go from the router.
    let patches_before = api.patches("listeners", "team-a", "web");
    api.delete("listeners", "team-a", "web");
    api.delete("connectors", "team-a", "db");
    api.delete("sitepolicies", "team-b", "another");
    api.delete("sitepolicies", "team-a", "policy");
    site.wait_for(|rows| names(rows).is_empty(), Request::ListenerStatus)
        .await;
    site.wait_for(|rows| names(rows).is_empty(), Request::ConnectorStatus)
        .await;
    site.wait_for(|p| p["policy"].is_null(), Request::PolicyStatus)
        .await;
    assert_eq!(
        api.patches("listeners", "team-a", "web"),
        patches_before,
        "nothing is written to a deleted resource"
    );

    // Quiet when nothing changes: the statuses written did not make the controller write
    // them again (each write is a watch event it sees).
    assert!(api.patches("connectors", "team-a", "db") <= 1);
    assert!(!running.is_finished(), "the controller keeps running");
    running.abort();
    // Gone before the sites drop: it writes in their state directories.
    let _ = running.await;
}

/// Something the controller did not make keeps its name: a listener made with the CLI is
/// neither replaced nor deleted, and the resource that would take its name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_cli_made_is_left_alone() {
    let site = Site::start("west", false).await;
    site.call(Request::ListenerCreate {
        listener: router::service::Listener {
            name: "team-a-web".into(),
            host: "127.0.0.1".into(),
            port: 0,
            routing_key: "cli".into(),
            namespace: None,
            allow_namespaces: Vec::new(),
            tls: None,
        },
    })
    .await
    .expect("a listener made with the CLI");
    let api = FakeApi::default();
    api.apply(
        "listeners",
        "team-a",
        "web",
        json!({"port": 0, "host": "127.0.0.1"}),
    );
    let options = Options {
        node: "gw-1".into(),
        namespaces: Vec::new(),
        state: site.state.clone(),
        cgroup_roots: vec![
            kernel_tests::TempDir::new("no-pods")
                .expect("dir")
                .path()
                .to_owned(),
        ],
        resync: Duration::from_secs(3600),
    };
    let running = tokio::spawn(controller::run(api.client(), options));
    api.wait_ready("listeners", "team-a", "web", is("False", "Conflict"))
        .await;
    api.delete("listeners", "team-a", "web");
    // The delete is seen (an event that would have come first), and the CLI's stays.
    api.apply(
        "connectors",
        "team-a",
        "probe",
        json!({"host": "127.0.0.1", "port": 1}),
    );
    api.wait_ready("connectors", "team-a", "probe", is("True", "Applied"))
        .await;
    let listeners = site.call(Request::ListenerStatus).await.expect("listeners");
    assert_eq!(
        find(&listeners, "team-a-web").expect("kept")["routingKey"],
        "cli"
    );
    running.abort();
    // Gone before the sites drop: it writes in their state directories.
    let _ = running.await;
}

/// On a new node the controller creates the site from its Site resource, as `skiff apply -f`
/// would, and applies the rest as soon as the router started with it answers (long before the
/// next resync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_site_is_created_from_its_resource_and_the_rest_follows_its_router() {
    let mut site = Site::uncreated("north");
    let api = FakeApi::default();
    api.apply("sites", "team-a", "north", json!({"certLifetime": "90d"}));
    api.apply("sites", "team-b", "south", json!({}));
    api.apply(
        "listeners",
        "team-a",
        "web",
        json!({"port": 0, "host": "127.0.0.1"}),
    );
    let options = Options {
        node: "gw-1".into(),
        namespaces: Vec::new(),
        state: site.state.clone(),
        cgroup_roots: vec![
            kernel_tests::TempDir::new("no-pods")
                .expect("dir")
                .path()
                .to_owned(),
        ],
        resync: Duration::from_secs(3600),
    };
    let running = tokio::spawn(controller::run(api.client(), options));
    api.wait_ready("sites", "team-a", "north", is("True", "Created"))
        .await;
    api.wait_ready("sites", "team-b", "south", is("False", "Conflict"))
        .await;
    let config = site.state.config().expect("the site is there");
    assert_eq!(config.name, "north");
    assert_eq!(config.cert_lifetime_secs, Some(90 * 86_400));
    api.wait_ready("listeners", "team-a", "web", is("False", "RouterDown"))
        .await;

    site.run().await;
    api.wait_ready("listeners", "team-a", "web", is("True", "Applied"))
        .await;
    api.wait_ready("sites", "team-a", "north", is("True", "Running"))
        .await;
    running.abort();
    // Gone before the sites drop: it writes in their state directories.
    let _ = running.await;
    site.stop().await;
}

/// The Secret's `key`, decoded.
fn secret_data(secret: &Value, key: &str) -> String {
    use base64::Engine as _;
    let encoded = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key}: {secret}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64");
    String::from_utf8(bytes).expect("PEM")
}

fn owner_uids(object: &Value) -> Vec<String> {
    object["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["uid"].as_str().map(str::to_owned))
        .collect()
}

/// A TLS connector's backend finds its bundle in `skiff-tls-NAME`, the frontends of a TLS
/// listener the service CA in `skiff-service-client`, and those of a listener that requires
/// client certificates their bundle in `skiff-client-NAME`; they are written once, issued again
/// when what they were issued for changes, and go when nothing needs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_bundles_live_in_secrets_and_go_with_their_resources() {
    let site = Site::start("west", false).await;
    let api = FakeApi::default();
    api.apply(
        "connectors",
        "team-a",
        "db",
        json!({"host": "db.team-a.svc", "port": 5432, "tls": {"serverName": "db"}}),
    );
    api.apply(
        "listeners",
        "team-b",
        "front",
        json!({"port": 0, "host": "127.0.0.1", "tls": {}}),
    );
    api.apply(
        "listeners",
        "team-b",
        "vault",
        json!({"port": 0, "host": "127.0.0.1", "tls": {"requireClientCert": true}}),
    );
    let options = Options {
        node: "gw-1".into(),
        namespaces: Vec::new(),
        state: site.state.clone(),
        cgroup_roots: vec![
            kernel_tests::TempDir::new("no-pods")
                .expect("dir")
                .path()
                .to_owned(),
        ],
        resync: Duration::from_secs(3600),
    };
    let running = tokio::spawn(controller::run(api.client(), options));

    let backend = api
        .wait_object("secrets", "team-a", "skiff-tls-db", |s| s.is_some())
        .await
        .expect("the backend's Secret");
    assert_eq!(backend["type"], "kubernetes.io/tls");
    let connector = api.get("connectors", "team-a", "db").expect("connector");
    assert_eq!(
        owner_uids(&backend),
        [connector["metadata"]["uid"].as_str().expect("uid")]
    );
    // Its CA is the site's service CA, its certificate names the backend and the connector.
    let from_router = site
        .call(Request::ServiceBundle {
            kind: router::admin::BundleKind::Server,
            name: "team-a-db".into(),
        })
        .await
        .expect("a bundle");
    assert_eq!(
        secret_data(&backend, "ca.crt"),
        from_router["ca"].as_str().expect("ca")
    );
    let cert = router::pki::certs_from_pem(&secret_data(&backend, "tls.crt")).expect("PEM");
    assert!(router::tls::identity::names(
        &cert[0],
        &router::tls::identity::connector_uri("west", "team-a-db")
    ));
    assert!(secret_data(&backend, "tls.key").contains("PRIVATE KEY"));

    let client = api
        .wait_object("secrets", "team-b", "skiff-service-client", |s| s.is_some())
        .await
        .expect("the frontends' Secret");
    assert_eq!(
        client["data"].as_object().map(|d| d.len()),
        Some(1),
        "the CA only"
    );
    assert_eq!(
        secret_data(&client, "ca.crt"),
        from_router["ca"].as_str().expect("ca")
    );
    let front = api.get("listeners", "team-b", "front").expect("listener");
    let vault = api.get("listeners", "team-b", "vault").expect("listener");
    let uid = |l: &Value| l["metadata"]["uid"].as_str().expect("uid").to_owned();
    let mut owners = owner_uids(&client);
    owners.sort();
    assert_eq!(owners, [uid(&front), uid(&vault)]);

    // The listener that requires client certificates: a client bundle for its frontends,
    // issued for that listener by the service CA.
    let frontend = api
        .wait_object("secrets", "team-b", "skiff-client-vault", |s| s.is_some())
        .await
        .expect("the frontends' client Secret");
    assert_eq!(frontend["type"], "kubernetes.io/tls");
    assert_eq!(owner_uids(&frontend), [uid(&vault)]);
    let cert = router::pki::certs_from_pem(&secret_data(&frontend, "tls.crt")).expect("PEM");
    assert!(router::tls::identity::names(
        &cert[0],
        &router::tls::identity::listener_uri("west", "team-b-vault")
    ));
    assert_eq!(
        secret_data(&frontend, "ca.crt"),
        from_router["ca"].as_str().expect("ca")
    );

    // Another pass (a new resource) writes nothing again.
    let writes = api.writes();
    api.apply(
        "connectors",
        "team-a",
        "plain",
        json!({"host": "127.0.0.1", "port": 1}),
    );
    api.wait_ready("connectors", "team-a", "plain", is("True", "Applied"))
        .await;
    assert_eq!(
        api.writes(),
        writes,
        "up-to-date Secrets are left as they are"
    );

    // The backend moves: a new bundle, for the new name.
    api.apply(
        "connectors",
        "team-a",
        "db",
        json!({"host": "db2.team-a.svc", "port": 5432, "tls": {"serverName": "db"}}),
    );
    api.wait_object("secrets", "team-a", "skiff-tls-db", |s| {
        s.is_some_and(|s| {
            s["metadata"]["annotations"]["skiff.io/issued-for"]
                .as_str()
                .is_some_and(|a| a.contains("db2.team-a.svc"))
        })
    })
    .await;

    // No TLS any more, or no listener: the Secrets go.
    api.apply(
        "connectors",
        "team-a",
        "db",
        json!({"host": "db2.team-a.svc", "port": 5432}),
    );
    api.wait_object("secrets", "team-a", "skiff-tls-db", |s| s.is_none())
        .await;
    api.delete("listeners", "team-b", "vault");
    api.wait_object("secrets", "team-b", "skiff-client-vault", |s| s.is_none())
        .await;
    api.delete("listeners", "team-b", "front");
    api.wait_object("secrets", "team-b", "skiff-service-client", |s| s.is_none())
        .await;
    running.abort();
    // Gone before the sites drop: it writes in their state directories.
    let _ = running.await;
}

fn controller_options(site: &Site, pods: &kernel_tests::TempDir) -> Options {
    Options {
        node: "gw-1".into(),
        namespaces: Vec::new(),
        state: site.state.clone(),
        cgroup_roots: vec![pods.path().to_owned()],
        resync: Duration::from_secs(3600),
    }
}

/// Whether the site has an outgoing link `name` that is up.
fn link_up(links: &Value, name: &str) -> bool {
    find(links, name).is_some_and(|l| l["direction"] == "outgoing" && l["status"] == "up")
}

/// Linking two clusters is `kubectl apply` on both sides: west's AccessGrant puts a token in
/// the Secret `skiff-token-NAME` as an AccessToken manifest; applied at east, it is redeemed
/// once (a restarted controller does not try again) for a link that comes up. Deleting the
/// AccessToken deletes the link; deleting an AccessGrant withdraws its grant, so its token is
/// refused. A Link made from a credential Secret brings the link back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linking_two_clusters_is_kubectl_apply_on_both_sides() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    let (west_api, east_api) = (FakeApi::default(), FakeApi::default());
    let pods = kernel_tests::TempDir::new("no-pods").expect("dir");
    west_api.apply("accessgrants", "team-a", "to-east", json!({}));
    west_api.apply(
        "accessgrants",
        "team-a",
        "spare",
        json!({"redemptionsAllowed": 3, "expirationWindow": "1h"}),
    );
    let west_controller = tokio::spawn(controller::run(
        west_api.client(),
        controller_options(&west, &pods),
    ));
    let mut east_controller = tokio::spawn(controller::run(
        east_api.client(),
        controller_options(&east, &pods),
    ));

    // West: the token is in a Secret that goes with its AccessGrant.
    let issued = west_api
        .wait_ready("accessgrants", "team-a", "to-east", is("True", "Issued"))
        .await;
    assert!(
        issued["message"]
            .as_str()
            .is_some_and(|m| m.contains("skiff-token-to-east") && m.contains("1 time")),
        "{issued}"
    );
    let secret = west_api
        .wait_object("secrets", "team-a", "skiff-token-to-east", |s| s.is_some())
        .await
        .expect("the token's Secret");
    let grant = west_api
        .get("accessgrants", "team-a", "to-east")
        .expect("grant");
    assert_eq!(
        owner_uids(&secret),
        [grant["metadata"]["uid"].as_str().expect("uid")]
    );
    let manifest: Value =
        serde_yaml_ng::from_str(&secret_data(&secret, "token.yaml")).expect("YAML");
    assert_eq!(manifest["kind"], "AccessToken");
    assert_eq!(manifest["apiVersion"], "skiff.io/v1alpha1");
    assert_eq!(manifest["metadata"]["name"], "west");
    assert_eq!(manifest["spec"]["site"], "west");

    // East: the manifest applied as it is; the token is redeemed for the link team-b-west.
    east_api.apply("accesstokens", "team-b", "west", manifest["spec"].clone());
    let redeemed = east_api
        .wait_ready("accesstokens", "team-b", "west", is("True", "Redeemed"))
        .await;
    assert!(
        redeemed["message"]
            .as_str()
            .is_some_and(|m| m.contains("team-b-west")),
        "{redeemed}"
    );
    east.wait_for(|l| link_up(l, "team-b-west"), Request::LinkStatus)
        .await;

    // A restarted controller finds the token redeemed and does not spend another redemption
    // (this grant allowed one: a second try would be refused and say so).
    east_controller.abort();
    // Gone before the sites drop: it writes in their state directories.
    let _ = (&mut east_controller).await;
    east_controller = tokio::spawn(controller::run(
        east_api.client(),
        controller_options(&east, &pods),
    ));
    east_api.apply("sites", "team-b", "east", json!({}));
    east_api
        .wait_ready("sites", "team-b", "east", is("True", "Running"))
        .await;
    assert_eq!(
        east_api
            .ready("accesstokens", "team-b", "west")
            .expect("ready")["reason"],
        "Redeemed"
    );
    assert_eq!(east_api.patches("accesstokens", "team-b", "west"), 1);

    // The credential, kept as a Secret, for a Link resource later.
    let stored: Value = serde_json::from_slice(
        &std::fs::read(east.state.links_dir().join("team-b-west.json")).expect("link"),
    )
    .expect("JSON");
    let key = std::fs::read_to_string(east.state.links_dir().join("team-b-west.key")).expect("key");

    // Deleting the AccessToken deletes its link.
    east_api.delete("accesstokens", "team-b", "west");
    east.wait_for(|l| find(l, "team-b-west").is_none(), Request::LinkStatus)
        .await;

    // A Link from a credential Secret: the link is back, and goes with the resource.
    let text = |k: &str| stored[k].as_str().expect(k).to_owned();
    east_api.put_secret(
        "team-b",
        "west-credential",
        &[
            ("ca.crt", &text("ca")),
            ("tls.crt", &text("cert")),
            ("tls.key", &key),
        ],
    );
    east_api.apply(
        "links",
        "team-b",
        "to-west",
        json!({"url": text("url"), "peerSite": "west", "tlsCredentials": "west-credential"}),
    );
    east_api
        .wait_ready("links", "team-b", "to-west", is("True", "Applied"))
        .await;
    east.wait_for(|l| link_up(l, "team-b-to-west"), Request::LinkStatus)
        .await;
    east_api.delete("links", "team-b", "to-west");
    east.wait_for(|l| find(l, "team-b-to-west").is_none(), Request::LinkStatus)
        .await;
    // West's operator revokes east's credentials, so that east's name may be redeemed for
    // again (a site's name is its identity: the issuer refuses it while its credential holds).
    west.call(Request::LinkRevoke {
        site: "east".into(),
    })
    .await
    .expect("revoke");

    // A used token, applied again, is refused by its issuer, once, and not tried again.
    east_api.apply("accesstokens", "team-b", "again", manifest["spec"].clone());
    let used = east_api
        .wait_ready("accesstokens", "team-b", "again", is("False", "Refused"))
        .await;
    assert!(
        used["message"]
            .as_str()
            .is_some_and(|m| m.contains("already been redeemed")),
        "{used}"
    );
    // Another pass (a new resource) leaves it as it was.
    east_api.apply(
        "connectors",
        "team-b",
        "probe",
        json!({"host": "127.0.0.1", "port": 1}),
    );
    east_api
        .wait_ready("connectors", "team-b", "probe", is("True", "Applied"))
        .await;
    assert_eq!(east_api.patches("accesstokens", "team-b", "again"), 1);

    // A deleted AccessGrant is withdrawn with its Secret: its token no longer works.
    let spare = west_api
        .wait_object("secrets", "team-a", "skiff-token-spare", |s| s.is_some())
        .await
        .expect("the spare token");
    let spare: Value = serde_yaml_ng::from_str(&secret_data(&spare, "token.yaml")).expect("YAML");
    west_api.delete("accessgrants", "team-a", "spare");
    west_api
        .wait_object("secrets", "team-a", "skiff-token-spare", |s| s.is_none())
        .await;
    east_api.apply("accesstokens", "team-b", "spare", spare["spec"].clone());
    let withdrawn = east_api
        .wait_ready("accesstokens", "team-b", "spare", is("False", "Refused"))
        .await;
    assert!(
        withdrawn["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown to the issuing site")),
        "{withdrawn}"
    );

    west_controller.abort();

    // Gone before the sites drop: it writes in their state directories.

    let _ = west_controller.await;
    east_controller.abort();
    // Gone before the sites drop: it writes in their state directories.
    let _ = (&mut east_controller).await;
}
