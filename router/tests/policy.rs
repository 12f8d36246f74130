//! Site policy, end to end in one process: each of the four controls refuses what it does not
//! name with a clear message, counts the denial, and applies to links and resources that
//! already exist.

mod common;

use std::time::Duration;

use common::{Site, checksum_backend, transfer};
use router::{admin::Request, policy::Policy, service::Connector};
use serde_json::{Value, json};
use tokio::{io::AsyncReadExt as _, net::TcpStream};

fn policy(spec: Value) -> Option<Policy> {
    Some(serde_json::from_value(spec).expect("policy"))
}

async fn set(site: &Site, spec: Value) -> Value {
    site.call(Request::PolicySet {
        policy: policy(spec),
    })
    .await
    .expect("policy set")
}

async fn denials(site: &Site, control: &str) -> u64 {
    let status = site.call(Request::PolicyStatus).await.expect("status");
    status["denials"][control].as_u64().unwrap_or(0)
}

async fn links(site: &Site) -> u64 {
    let status = site.call(Request::Status).await.expect("status");
    status["links"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_links_follow_the_policy_including_links_already_up() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    set(&west, json!({"allowIncomingLinks": ["north"]})).await;

    // Refused before the grant is spent: the same token works once the policy allows east.
    let token = west.token().await;
    let err = east
        .redeem(token.clone())
        .await
        .expect_err("east may not link");
    assert!(
        err.to_string().contains(
            "a link from site east is not allowed by the site policy (allowIncomingLinks)"
        ),
        "{err}"
    );
    set(&west, json!({"allowIncomingLinks": ["north", "east"]})).await;
    east.redeem(token).await.expect("redeem once allowed");
    east.wait_for(|v| v["links"] == 1, Request::Status).await;

    // Withdrawing the permission closes the link that is up, and it stays down.
    let changes = set(&west, json!({"allowIncomingLinks": false})).await;
    assert_eq!(changes["closedIncomingLinks"], json!(["east"]), "{changes}");
    west.wait_for(|v| v["links"] == 0, Request::Status).await;
    east.wait_for(|v| v["links"] == 0, Request::Status).await;
    // east keeps redialling, in vain: wait for two more refusals, then look.
    let before = denials(&west, "allowIncomingLinks").await;
    west.wait_for(
        |v| v["denials"]["allowIncomingLinks"].as_u64() >= Some(before + 2),
        Request::PolicyStatus,
    )
    .await;
    assert_eq!(links(&east).await, 0, "a refused link does not come back");

    // Removing the policy allows everything again: east's redialling gets through.
    west.call(Request::PolicySet { policy: None })
        .await
        .expect("policy delete");
    east.wait_for(|v| v["links"] == 1, Request::Status).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_backends_follow_the_policy() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let (backend, _server) = checksum_backend().await;
    set(
        &west,
        json!({"allowIncomingLinks": true, "allowedServices": ["web", "api-*"],
               "allowedExposedResources": ["127.0.0.1"]}),
    )
    .await;

    let create = |name: &str, key: &str, host: &str| Request::ConnectorCreate {
        connector: Connector {
            name: name.into(),
            host: host.into(),
            port: backend,
            routing_key: key.into(),
            tls: None,
        },
    };
    let err = west
        .call(create("db", "db", "127.0.0.1"))
        .await
        .expect_err("db is not an allowed service");
    assert!(
        err.to_string()
            .contains("routing key db is not allowed by the site policy (allowedServices)"),
        "{err}"
    );
    let err = west
        .call(create("web-by-name", "web", "localhost"))
        .await
        .expect_err("localhost is not an allowed backend");
    assert!(
        err.to_string().contains("(allowedExposedResources)"),
        "{err}"
    );
    west.call(create("web", "web", "127.0.0.1"))
        .await
        .expect("an allowed service on an allowed backend");
    let port = east.listener("web", "web").await;
    transfer(port, 1 << 20).await;

    // The service is no longer allowed at west: its connector is withdrawn from the network,
    // so east's listener has nowhere to go.
    let changes = set(
        &west,
        json!({"allowIncomingLinks": true, "allowedServices": ["api-*"],
               "allowedExposedResources": ["127.0.0.1"]}),
    )
    .await;
    assert_eq!(changes["withdrawnConnectors"], json!(["web"]), "{changes}");
    east.wait_for(
        |v| {
            v.as_array()
                .is_some_and(|ls| ls.iter().all(|l| l["reachable"] == false))
        },
        Request::ListenerStatus,
    )
    .await;
    // Allowed again: advertised again, and served.
    let changes = set(
        &west,
        json!({"allowIncomingLinks": true, "allowedServices": ["web"],
               "allowedExposedResources": ["*"]}),
    )
    .await;
    assert_eq!(changes["advertisedConnectors"], json!(["web"]), "{changes}");
    east.wait_for(
        |v| {
            v.as_array()
                .is_some_and(|ls| ls.iter().all(|l| l["reachable"] == true))
        },
        Request::ListenerStatus,
    )
    .await;
    transfer(port, 1 << 20).await;

    // At east, a policy without the key makes its existing listener refuse new connections.
    let changes = set(&east, json!({"allowedOutgoingLinksHostnames": ["*"]})).await;
    assert_eq!(changes["refusingListeners"], json!(["web"]), "{changes}");
    // The refusal (RST) is so prompt that it may surface at connect or at read.
    let outcome = tokio::time::timeout(Duration::from_secs(3), async {
        let mut client = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut buf = [0u8; 1];
        client.read(&mut buf).await
    })
    .await
    .expect("refused promptly");
    assert!(
        matches!(outcome, Ok(0) | Err(_)),
        "a refused client gets no bytes: {outcome:?}"
    );
    assert_eq!(denials(&east, "allowedServices").await, 1);
    assert!(denials(&west, "allowedServices").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outgoing_links_stop_and_resume_with_the_policy() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;

    let changes = set(&east, json!({"allowedOutgoingLinksHostnames": ["*.corp"]})).await;
    assert_eq!(changes["stoppedLinks"], json!(["west"]), "{changes}");
    east.wait_for(|v| v["links"] == 0, Request::Status).await;
    let err = east
        .redeem(west.token().await)
        .await
        .expect_err("127.0.0.1 is not an allowed link host");
    assert!(
        err.to_string().contains(
            "a link to 127.0.0.1 is not allowed by the site policy (allowedOutgoingLinksHostnames)"
        ),
        "{err}"
    );
    let status = east.call(Request::LinkStatus).await.expect("links");
    assert!(
        status.to_string().contains("allowedOutgoingLinksHostnames"),
        "link status says why the link is down: {status}"
    );

    let changes = set(
        &east,
        json!({"allowedOutgoingLinksHostnames": ["127.0.0.*"]}),
    )
    .await;
    assert_eq!(changes["resumedLinks"], json!(["west"]), "{changes}");
    east.wait_for(|v| v["links"] == 1, Request::Status).await;
}

/// The review's peer sent Open for a routing key whose connector the policy had withdrawn
/// (`allowedExposedResources`), and reached the backend. The control holds where the stream
/// arrives: the stream is reset and the backend never sees a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_connector_serves_no_stream_whoever_asks() {
    use router::link::frame::Frame;
    let west = Site::start("west", true).await;
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = backend.local_addr().expect("addr").port();
    west.connector("db", "db", port).await;
    let changes = set(
        &west,
        json!({"allowIncomingLinks": true, "allowedServices": ["*"], "allowedExposedResources": ["10.0.0.*"]}),
    )
    .await;
    assert_eq!(changes["withdrawnConnectors"], json!(["db"]), "{changes}");

    let mut evil = common::peer::linked_peer(&west, "evil").await;
    common::peer::send(
        &mut evil,
        Frame::Open {
            stream: 1,
            routing_key: "db".into(),
            origin: "evil".into(),
            dest: "west".into(),
            window: 1 << 16,
            alpn: String::new(),
        },
    )
    .await;
    let reset = common::peer::reset_reason(&mut evil, 1).await;
    eprintln!("reset: {reset}");
    // The reset came after the router chose (or refused) a backend: nothing was accepted.
    let accepted = tokio::time::timeout(Duration::ZERO, backend.accept()).await;
    assert!(accepted.is_err(), "the backend saw a connection");
}
