//! What an authenticated but hostile peer can and cannot do to a router: it holds a real link
//! credential and speaks the protocol by hand (`common::peer`), sending what a real router
//! never would. Every test checks that the router refuses the input and keeps serving.

mod common;

use std::time::{Duration, SystemTime};

use common::{Site, peer};
use router::{
    admin::Request,
    link::frame::{Frame, LinkState},
};
use serde_json::Value;

fn micros_now() -> u64 {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since.as_micros()).expect("fits")
}

fn keys_of<'a>(network: &'a Value, site: &str) -> Option<&'a Value> {
    network
        .as_array()?
        .iter()
        .find(|r| r["site"] == site)
        .map(|r| &r["routingKeys"])
}

/// The review's frame: `LinkState` at the top of the sequence space, for the receiver itself
/// and for a third site, then a copy of the receiver's own state just inside the bound. The
/// receiver neither crashes nor stores them; the third site's real advertisements still
/// count, at the receiver and at a router one hop further.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_link_state_neither_crashes_nor_poisons_the_network() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let mut evil = peer::linked_peer(&west, "evil").await;

    for origin in ["west", "east"] {
        peer::send(
            &mut evil,
            Frame::LinkState(LinkState {
                origin: origin.into(),
                seq: u64::MAX,
                links: vec![("evil".into(), 1)],
                keys: vec!["stolen".into()],
            }),
        )
        .await;
    }
    // Just inside the bound: west must re-originate above it, and east must believe west.
    peer::send(
        &mut evil,
        Frame::LinkState(LinkState {
            origin: "west".into(),
            seq: micros_now() + 60_000_000,
            links: vec![],
            keys: vec!["stolen".into()],
        }),
    )
    .await;

    // East's next advertisement (a new connector) reaches west and is believed.
    east.connector("db", "db", 9).await;
    let network = west
        .wait_for(
            |v| keys_of(v, "east").is_some_and(|k| k.to_string().contains("\"db\"")),
            Request::NetworkStatus,
        )
        .await;
    assert!(!network.to_string().contains("stolen"), "{network}");
    // East's view of west is west's own, not the forgery: west lists its link to east.
    east.wait_for(
        |v| {
            v.as_array().is_some_and(|rows| {
                rows.iter().any(|r| {
                    r["site"] == "west"
                        && r["links"].to_string().contains("\"east\"")
                        && !r["routingKeys"].to_string().contains("stolen")
                })
            })
        },
        Request::NetworkStatus,
    )
    .await;
    // The connection that carried them stays up: refusing an advertisement is not a
    // protocol error. West answers a Ping on it.
    peer::send(&mut evil, Frame::Ping { nonce: 7 }).await;
    assert!(peer::pong(&mut evil, 7, Duration::from_secs(5)).await);
}

/// The review's redemptions: a token holder asked for a credential in the name of a linked
/// site, of the issuer itself, and in names that are paths or 1,000 characters long. Each is
/// refused in one line, before the grant is spent, so the same token still serves a real new
/// site; a revoked site can be invited again under its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeemer_cannot_take_a_linked_sites_name() {
    let west = Site::start("west", true).await;
    let north = Site::start("north", false).await;
    north.link_to(&west).await;

    let token = west.token().await;
    let long = "a".repeat(1000);
    for (name, why) in [
        ("north", "held by a credential"),
        ("west", "the issuing site's own"),
        ("../../x", "not valid"),
        ("a/b", "not valid"),
        (long.as_str(), "not valid"),
    ] {
        let err = router::link::dial::redeem(&token, name, "west")
            .await
            .expect_err(name)
            .to_string();
        assert!(err.contains(why), "{name}: {err}");
        assert!(!err.contains('\n') && err.len() < 400, "one line: {err}");
    }
    // The grant was not spent by the refusals.
    router::link::dial::redeem(&token, "south", "west")
        .await
        .expect("a new name redeems the same token");

    // North goes down; its name is still not free while its credential is valid.
    let mut north = north;
    north.stop().await;
    let err = router::link::dial::redeem(&west.token().await, "north", "west")
        .await
        .expect_err("north's name while north is down");
    assert!(err.to_string().contains("north"), "{err}");

    // Revoked, north may be invited again under its name.
    west.call(Request::LinkRevoke {
        site: "north".into(),
    })
    .await
    .expect("revoke");
    router::link::dial::redeem(&west.token().await, "north", "west")
        .await
        .expect("a revoked site is invited again");
}

/// A request with the right code that is refused for what else it carries (no certificate
/// signing request, garbage in its place) costs the grant nothing: the single redemption is
/// still there for a good request. Before, the grant was spent before the CSR was read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_redemption_costs_the_grant_nothing() {
    use router::token::{RedeemRequest, RedeemResponse};
    let west = Site::start("west", true).await;
    let token = west.token().await;
    for csr in [
        "",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let request = RedeemRequest {
            grant: token.grant.clone(),
            code: token.code.clone(),
            site: "south".into(),
            csr: csr.into(),
        };
        let answer = router::link::dial::exchange(&token, &request)
            .await
            .expect("an answer");
        let RedeemResponse::Error { error } = answer else {
            panic!("a request without a valid CSR was granted");
        };
        assert!(error.contains("certificate signing request"), "{error}");
    }
    router::link::dial::redeem(&token, "south", "west")
        .await
        .expect("the single redemption is still there");
    let err = router::link::dial::redeem(&token, "east", "west")
        .await
        .expect_err("and now it is used");
    assert!(err.to_string().contains("used"), "{err}");
}

/// A redemption request that is not UTF-8 gets a one-line refusal, as any malformed request
/// does; before, the issuer dropped the connection without a word (found by the
/// `grant_exchange` fuzz target).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redemption_request_that_is_not_text_is_refused_in_one_line() {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let west = Site::start("west", true).await;
    let token = west.token().await;
    let config = router::tls::grant_client_config(&token.ca).expect("config");
    let tcp = tokio::net::TcpStream::connect(&token.url)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.write_all(&[0xf1; 40]).await.expect("send");
    tls.write_all(b"\n").await.expect("send");
    let mut answer = String::new();
    tokio::io::BufReader::new(tls)
        .read_line(&mut answer)
        .await
        .expect("an answer, not a dropped connection");
    assert!(answer.contains("malformed redemption request"), "{answer}");
    assert_eq!(answer.matches('\n').count(), 1, "one line: {answer}");
}

/// Token lifetimes from the admin API (the CLI's path): no redemptions, no time, and a time
/// that overflowed the expiry are refused in one line; the router keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_a_life_or_with_an_endless_one_are_refused() {
    let west = Site::start("west", true).await;
    for (redemptions, expiry_secs) in [(0, 60), (1, 0), (1, u64::MAX)] {
        let err = west
            .call(Request::TokenIssue {
                redemptions,
                expiry_secs,
            })
            .await
            .expect_err("refused")
            .to_string();
        assert!(err.contains("a token must"), "{err}");
    }
    west.token().await;
}

/// Limits are checked where input enters: a 2,000-byte routing key (which the peer's decoder
/// would refuse in the LinkState, flapping the link) and path-like names are refused at
/// create, through the admin API that the CLI and `apply -f` use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_that_break_the_protocol_limits_are_refused_at_create() {
    let west = Site::start("west", true).await;
    let connector = |name: &str, key: &str| router::service::Connector {
        name: name.into(),
        host: "127.0.0.1".into(),
        port: 9,
        routing_key: key.into(),
        tls: None,
    };
    for (c, why) in [
        (connector("db", &"k".repeat(2000)), "routing key"),
        (connector("a/b", "db"), "connector name"),
        (connector("..", "db"), "connector name"),
        (connector("", "db"), "connector name"),
    ] {
        let err = west
            .call(Request::ConnectorCreate { connector: c })
            .await
            .expect_err("refused")
            .to_string();
        assert!(err.contains(why) && err.len() < 400, "{err}");
    }
    let connectors = west.call(Request::ConnectorStatus).await.expect("status");
    assert_eq!(connectors, serde_json::json!([]));
}

/// The review's peer floods Pings and never reads. The router's answers pile up unsent; the
/// link used to stay `up` through 30 s of it. Now a peer that reads nothing for the dead-link
/// time while frames wait for it is cut off like one that sends nothing, and other links go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_floods_pings_and_never_reads_is_cut_off() {
    use tokio::io::AsyncWriteExt as _;
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let mut evil = peer::linked_peer(&west, "evil").await;
    let evil_up = |v: &Value| {
        v.as_array().is_some_and(|rows| {
            rows.iter()
                .any(|r| r["peer"] == "evil" && r["status"] == "up")
        })
    };
    west.wait_for(evil_up, Request::LinkStatus).await;
    let mut pings = bytes::BytesMut::new();
    for nonce in 0..512 {
        Frame::Ping { nonce }.encode(&mut pings);
    }
    let start = std::time::Instant::now();
    let limit = router::link::DEAD_AFTER * 4;
    let cut = loop {
        let sent = tokio::time::timeout(Duration::from_secs(1), evil.write_all(&pings)).await;
        if matches!(sent, Ok(Err(_))) {
            break start.elapsed();
        }
        let links = west.call(Request::LinkStatus).await.expect("links");
        if !evil_up(&links) {
            break start.elapsed();
        }
        assert!(start.elapsed() < limit, "still up after {limit:?}: {links}");
    };
    eprintln!("cut off after {cut:?}");
    // East's link was never disturbed.
    let links = west.call(Request::LinkStatus).await.expect("links");
    assert!(
        links.as_array().is_some_and(|rows| rows
            .iter()
            .any(|r| r["peer"] == "east" && r["status"] == "up")),
        "{links}"
    );
}

/// The review's credential opened 200 concurrent link connections. One site may hold at most
/// `MAX_CONNECTIONS_PER_PEER`; the rest are refused after the handshake, in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_site_cannot_hold_more_than_its_share_of_link_connections() {
    use router::link::{MAX_CONNECTIONS_PER_PEER, frame::Frame};
    let west = Site::start("west", true).await;
    let config = peer::credentialed(&west, "evil").await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..MAX_CONNECTIONS_PER_PEER + 8 {
        let Ok(mut tls) = peer::tls_to(&west, std::sync::Arc::clone(&config)).await else {
            refused += 1;
            continue;
        };
        match tokio::time::timeout(Duration::from_secs(5), peer::first_frame_or_end(&mut tls)).await
        {
            Ok(Some(Frame::Hello { version, .. })) => {
                peer::send_hello(&mut tls, version, "evil").await;
                held.push(tls);
                // Wait until west counts it, so the next one sees the true number.
                let n = held.len();
                west.wait_for(
                    |v| {
                        v.as_array().is_some_and(|rows| {
                            rows.iter().any(|r| {
                                r["peer"] == "evil" && r["connections"].as_u64() >= Some(n as u64)
                            })
                        })
                    },
                    Request::LinkStatus,
                )
                .await;
            }
            _ => refused += 1,
        }
    }
    assert_eq!(held.len(), MAX_CONNECTIONS_PER_PEER);
    assert_eq!(refused, 8);
}

/// The review's 20,000 dripping clients on the metrics port exhausted the router's file
/// descriptors, and service clients failed until they left. Metrics connections beyond a few
/// are closed as they arrive, and each has a deadline for its whole request: with a crowd of
/// drippers holding on, the router's descriptors stay bounded and a service still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_metrics_clients_cannot_take_the_routers_descriptors() {
    use tokio::io::AsyncWriteExt as _;
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let (backend, _server) = common::checksum_backend().await;
    west.connector("db", "db", backend).await;
    let port = east.listener("db", "db").await;
    let status = west.call(Request::Status).await.expect("status");
    let metrics = status["metricsAddr"].as_str().expect("metrics").to_owned();

    let fds = || std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    let before = fds();
    let mut drippers = Vec::new();
    for _ in 0..400 {
        if let Ok(mut conn) = tokio::net::TcpStream::connect(&metrics).await {
            let _ = conn.write_all(b"G").await;
            drippers.push(conn);
        }
    }
    // Both ends live in this process: 400 of ours, and what the router kept of its side.
    let during = fds();
    eprintln!("descriptors: {before} before, {during} with 400 drippers");
    assert!(
        during < before + 400 + 2 * router::metrics::MAX_SCRAPES,
        "the router kept a descriptor per dripping client: {before} -> {during}"
    );
    common::transfer(port, 1 << 20).await;
    drop(drippers);
}

/// Data after the peer's own Close is reset (docs/protocol.md), and says why; an oversized
/// admin request (the review's 50 MB name) is refused in one line instead of a broken pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_after_close_is_reset_and_oversized_requests_are_refused_in_one_line() {
    use tokio::io::AsyncWriteExt as _;
    let west = Site::start("west", true).await;
    // A backend that holds its connections open: the stream outlives the peer's Close, so the
    // Data after it finds the stream (a backend that answered and closed could end the stream
    // first, and the Data would be a late frame for a stream already gone).
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = backend.local_addr().expect("addr").port();
    let _held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((conn, _)) = backend.accept().await {
            conns.push(conn);
        }
    });
    west.connector("db", "db", port).await;
    let mut evil = peer::linked_peer(&west, "evil").await;
    // One write: the router decodes all three in one pass.
    let mut frames = bytes::BytesMut::new();
    for frame in [
        Frame::Open {
            stream: 1,
            routing_key: "db".into(),
            origin: "evil".into(),
            dest: "west".into(),
            window: 1 << 16,
            alpn: String::new(),
        },
        Frame::Close { stream: 1 },
        Frame::Data {
            stream: 1,
            data: bytes::Bytes::from_static(b"after close"),
        },
    ] {
        frame.encode(&mut frames);
    }
    evil.write_all(&frames).await.expect("send");
    let reason = peer::reset_reason(&mut evil, 1).await;
    assert!(reason.contains("after the peer's own close"), "{reason}");

    let connector = router::service::Connector {
        name: "n".repeat(2 << 20),
        host: "127.0.0.1".into(),
        port: 9,
        routing_key: "k".into(),
        tls: None,
    };
    let err = west
        .call(Request::ConnectorCreate { connector })
        .await
        .expect_err("too large")
        .to_string();
    assert!(
        err.contains("more than the router takes") && err.len() < 200,
        "{err}"
    );
    west.call(Request::Status).await.expect("still serving");
}
