//! In-process integration tests: several routers in one process, on loopback, every port bound
//! on :0. Real TLS, real sockets, the real admin API.

mod common;

use std::time::Duration;

use common::{
    Site, checksum_backend, has_lines,
    peer::{credentialed, first_frame, hello, tls_to},
    scrape, scrape_until, transfer,
};
use router::{admin::Request, token::Token};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gigabyte_crosses_an_mtls_link_byte_exact_with_half_close() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let (backend, _server) = checksum_backend().await;
    west.connector("sink", "sink", backend).await;
    let port = east.listener("sink", "sink").await;
    transfer(port, 1 << 30).await;
    let links = east.call(Request::LinkStatus).await.expect("link status");
    assert!(links[0]["bytesOut"].as_u64() > Some(1 << 30), "{links}");
}

/// Reads from `conn` until it ends: `Err` when it ended with a reset, `Ok` on a clean EOF.
async fn ends_within(conn: &mut TcpStream, limit: Duration) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            if conn.read(&mut buf).await? == 0 {
                return Ok(());
            }
        }
    })
    .await
    .expect("connection ended in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_hop_reaches_a_connector_through_the_middle_router() {
    // a -> b <- c: both edge sites link to the hub; the key lives at c.
    let b = Site::start("hub", true).await;
    let a = Site::start("edge-a", false).await;
    let c = Site::start("edge-c", false).await;
    a.link_to(&b).await;
    c.link_to(&b).await;
    let (backend, _server) = checksum_backend().await;
    c.connector("db", "db", backend).await;
    let port = a.listener("db", "db").await;
    transfer(port, 8 << 20).await;
    let network = a.call(Request::NetworkStatus).await.expect("network");
    let row = network
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["site"] == "edge-c"))
        .expect("edge-c known at edge-a");
    assert_eq!(row["cost"], 2, "{network}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_fail_over_and_dead_paths_reset_at_once() {
    let hub = Site::start("hub", true).await;
    let left = Site::start("left", false).await;
    let right = Site::start("right", false).await;
    left.link_to(&hub).await;
    right.link_to(&hub).await;
    let (backend_left, _s1) = checksum_backend().await;
    let (backend_right, _s2) = checksum_backend().await;
    left.connector("web", "web", backend_left).await;
    right.connector("web", "web", backend_right).await;
    let port = hub.listener("web", "web").await;
    // Both connectors known at the hub before the first client comes.
    hub.wait_for(
        |v| {
            v.as_array().is_some_and(|rows| {
                rows.iter()
                    .filter(|r| {
                        r["routingKeys"]
                            .as_array()
                            .is_some_and(|k| k.contains(&"web".into()))
                    })
                    .count()
                    == 2
            })
        },
        Request::NetworkStatus,
    )
    .await;

    // Two open streams are balanced over the two equally cheap connectors.
    let mut first = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    first.write_all(b"x").await.expect("write");
    let mut second = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    second.write_all(b"y").await.expect("write");
    // Wait for both streams to be open (a fixed pause was too short when the other tests of
    // this file run beside it), then look at how they are spread.
    let links = hub
        .wait_for(
            |v| {
                v.as_array().is_some_and(|rows| {
                    rows.iter()
                        .map(|l| l["streams"].as_u64().unwrap_or(0))
                        .sum::<u64>()
                        == 2
                })
            },
            Request::LinkStatus,
        )
        .await;
    let busy: Vec<u64> = links
        .as_array()
        .expect("rows")
        .iter()
        .map(|l| l["streams"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(busy, vec![1, 1], "one stream on each link: {links}");

    // The left site's link goes away: the stream through it is reset at once, not left hanging.
    left.call(Request::LinkDelete { name: "hub".into() })
        .await
        .expect("link delete");
    // Exactly one of the two streams ran through the deleted link; it must end with a reset
    // (an error, not a clean EOF) well within the deadline, and the other must stay open.
    let limit = Duration::from_secs(DEAD_PATH_SECS);
    let (mut buf, mut buf2) = ([0u8; 16], [0u8; 16]);
    let (ended, other) = tokio::select! {
        r = first.read(&mut buf) => (r, second),
        r = second.read(&mut buf2) => (r, first),
        () = tokio::time::sleep(limit) => panic!("no stream ended within {limit:?}"),
    };
    assert!(
        ended.is_err(),
        "a stream on a dead path ends with a reset, got {ended:?}"
    );
    let mut other = other;
    let still_open = tokio::time::timeout(Duration::from_millis(300), other.read(&mut buf)).await;
    assert!(
        still_open.is_err(),
        "the stream on the surviving path stays open"
    );
    // New streams go to the survivor.
    hub.wait_for(
        |v| v.as_array().is_some_and(|rows| rows.len() == 1),
        Request::LinkStatus,
    )
    .await;
    transfer(port, 1 << 20).await;
}

/// The peer notices a dead router when its TCP connection closes (immediately here) or, at the
/// latest, after the heartbeat deadline.
const DEAD_PATH_SECS: u64 = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_resets_the_client_promptly() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead_port = closed.local_addr().expect("addr").port();
    drop(closed);
    west.connector("gone", "gone", dead_port).await;
    let port = east.listener("gone", "gone").await;
    // The reset is so prompt that it may surface at connect, at write or at read.
    let outcome = tokio::time::timeout(Duration::from_secs(3), async {
        let mut client = TcpStream::connect(("127.0.0.1", port)).await?;
        client.write_all(b"hello").await?;
        let mut buf = [0u8; 16];
        loop {
            if client.read(&mut buf).await? == 0 {
                return Ok::<(), std::io::Error>(());
            }
        }
    })
    .await
    .expect("client ended in time");
    let err = outcome.expect_err("refused backend: client sees a reset, not a clean close");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// A link connection that is cut counts as lost at both ends, and the dialer's new connection
/// as a reconnect; the peer that restarted counts from zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_counts_as_lost_and_its_redial_as_a_reconnect() {
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr").to_string()
    };
    let mut west = Site::start_on("west", &addr).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    scrape_until(
        &east,
        r#"skiff_link_reconnects_total{peer="west",direction="outgoing"} 0"#,
    )
    .await;
    west.stop().await;
    west.run().await;
    west.wait_for(|v| v["links"] == 1, Request::Status).await;
    let text = scrape_until(
        &east,
        r#"skiff_link_reconnects_total{peer="west",direction="outgoing"} 1"#,
    )
    .await;
    has_lines(
        &text,
        &[r#"skiff_link_lost_connections_total{peer="west",direction="outgoing"} 1"#],
    );
    let text = scrape_until(
        &west,
        r#"skiff_link_lost_connections_total{peer="east",direction="incoming"} 0"#,
    )
    .await;
    has_lines(
        &text,
        &[r#"skiff_link_reconnects_total{peer="east",direction="incoming"} 0"#],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_links_listeners_and_connectors() {
    let west = Site::start("west", true).await;
    let mut east = Site::start("east", false).await;
    east.link_to(&west).await;
    let (backend, _server) = checksum_backend().await;
    west.connector("sink", "sink", backend).await;
    let port = east.listener("sink", "sink").await;
    transfer(port, 1 << 20).await;

    east.stop().await;
    east.run().await;
    east.wait_for(|v| v["links"] == 1, Request::Status).await;
    // The listener spec says port 0, so the restarted listener has a new port.
    let status = east
        .wait_for(
            |v| {
                v.as_array()
                    .is_some_and(|ls| ls.iter().any(|l| l["reachable"] == true))
            },
            Request::ListenerStatus,
        )
        .await;
    let new_port = u16::try_from(status[0]["port"].as_u64().expect("port")).expect("fits");
    assert_ne!(new_port, 0);
    let _ = port;
    transfer(new_port, 1 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_expired_and_forged_tokens_fail_with_clear_errors() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    let north = Site::start("north", false).await;

    let token = west.token().await;
    east.redeem(token.clone()).await.expect("first redemption");
    let reused = north.redeem(token).await.expect_err("second redemption");
    assert!(
        reused.to_string().contains("already been redeemed"),
        "{reused}"
    );

    // The shortest life a token may have; it has ended once the clock passes the second
    // after the one it was issued in.
    let before = router::token::now_secs();
    let expiring = west
        .call(Request::TokenIssue {
            redemptions: 1,
            expiry_secs: 1,
        })
        .await
        .expect("issue");
    let expiring: Token = serde_json::from_value(expiring).expect("token");
    while router::token::now_secs() < before + 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expired = north.redeem(expiring).await.expect_err("expired");
    assert!(expired.to_string().contains("expired"), "{expired}");

    let mut forged = west.token().await;
    forged.code = "0".repeat(forged.code.len());
    let wrong = north.redeem(forged).await.expect_err("wrong code");
    assert!(wrong.to_string().contains("code is wrong"), "{wrong}");

    // A token whose CA is not the issuer's: the TLS check fails before any secret is sent.
    let mut foreign = west.token().await;
    foreign.ca = router::pki::new_ca("mallory").expect("ca").cert_pem;
    let untrusted = north.redeem(foreign).await.expect_err("untrusted issuer");
    assert!(
        untrusted.to_string().contains("tls handshake"),
        "{untrusted}"
    );
}

/// Whether the server ends the connection (EOF or error) within a few seconds.
async fn server_hangs_up(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(DEAD_PATH_SECS);
    loop {
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_on_the_link_port_are_refused_and_others_keep_working() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let (backend, _server) = checksum_backend().await;
    west.connector("sink", "sink", backend).await;
    let port = east.listener("sink", "sink").await;
    let west_ca = west.token().await.ca;
    let link_alpn = router::link::frame::ALPN_LINK.to_vec();

    // Plaintext garbage instead of a TLS ClientHello.
    let url = west.token().await.url;
    let mut plain = TcpStream::connect(&url).await.expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    // The server answers garbage by hanging up (ends_within panics if it does not).
    let _ = ends_within(&mut plain, Duration::from_secs(5)).await;

    // A client certificate from another CA.
    let mallory = router::pki::new_ca("mallory").expect("ca");
    let forged =
        router::pki::issue(&mallory, "east", &[], router::pki::Usage::Client).expect("leaf");
    let config = router::tls::link_client_config(&west_ca, &forged).expect("config");
    let refused = match tls_to(&west, config).await {
        Err(_) => true,
        Ok(mut tls) => server_hangs_up(&mut tls).await,
    };
    assert!(refused, "certificate from another CA must be refused");

    // The link protocol without a client certificate.
    let mut roots = rustls::RootCertStore::empty();
    for cert in router::pki::certs_from_pem(&west_ca).expect("ca") {
        roots.add(cert).expect("root");
    }
    let mut anonymous = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots)
    .with_no_client_auth();
    anonymous.alpn_protocols = vec![link_alpn];
    let mut tls = tls_to(&west, std::sync::Arc::new(anonymous))
        .await
        .expect("handshake");
    assert!(
        server_hangs_up(&mut tls).await,
        "link without a certificate must be closed"
    );

    // A properly credentialed peer that sends malformed frames after its Hello.
    let config = credentialed(&west, "intruder").await;
    let mut tls = tls_to(&west, config).await.expect("handshake");
    tls.write_all(&hello(router::link::frame::VERSION, "intruder"))
        .await
        .expect("hello");
    tls.write_all(&[0xff; 64]).await.expect("garbage");
    assert!(
        server_hangs_up(&mut tls).await,
        "malformed frames must close the link"
    );

    // Through all of that, the real link kept serving.
    transfer(port, 4 << 20).await;
    let links = west.call(Request::LinkStatus).await.expect("links");
    assert!(
        links
            .as_array()
            .expect("rows")
            .iter()
            .any(|l| l["peer"] == "east" && l["status"] == "up"),
        "{links}"
    );

    // Each failed handshake is counted under its reason; the ones that completed (east's link,
    // the anonymous and the credentialed intruder, refused after their handshakes) as such.
    let text = scrape_until(
        &west,
        r#"skiff_tls_handshake_failures_total{endpoint="link_access",reason="certificate"} 1"#,
    )
    .await;
    has_lines(
        &text,
        &[
            r#"skiff_tls_handshake_failures_total{endpoint="link_access",reason="protocol"} 1"#,
            r#"skiff_tls_handshake_failures_total{endpoint="link_access",reason="timeout"} 0"#,
            r#"skiff_tls_handshake_failures_total{endpoint="listener",reason="certificate"} 0"#,
        ],
    );
    let completed = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"skiff_tls_handshakes_total{endpoint="link_access"} "#))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no link_access handshakes in {text}"));
    assert!(
        completed >= 3,
        "{completed} link-access handshakes completed: {text}"
    );
    let text = scrape(&east).await;
    has_lines(
        &text,
        &[r#"skiff_tls_handshake_failures_total{endpoint="link_dial",reason="certificate"} 0"#],
    );
    assert!(
        !text.contains(r#"skiff_tls_handshakes_total{endpoint="link_dial"} 0"#),
        "east's dial is counted: {text}"
    );
}

/// Version negotiation: a dialer that speaks only version 1 gets version 1 (Hello says so),
/// and may not send version 2's OpenAlpn there; a Hello that disagrees with the ALPN-agreed
/// version ends the connection. Real links between two routers agree on version 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_versions_are_negotiated_by_alpn_and_enforced() {
    use router::link::frame::{ALPN_LINK, ALPN_LINK_V1, Frame};
    let west = Site::start("west", true).await;
    let config = credentialed(&west, "old").await;
    let dial = |alpn: &[u8]| {
        let mut config = (*config).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        tls_to(&west, std::sync::Arc::new(config))
    };

    // A version 1 dialer: west answers in version 1 and refuses OpenAlpn on that link.
    let mut old = dial(ALPN_LINK_V1).await.expect("handshake");
    assert_eq!(old.get_ref().1.alpn_protocol(), Some(ALPN_LINK_V1));
    let Frame::Hello { version, .. } = first_frame(&mut old).await else {
        panic!("west's first frame is not Hello");
    };
    assert_eq!(version, 1);
    old.write_all(&hello(1, "old")).await.expect("hello");
    let mut open = bytes::BytesMut::new();
    Frame::Open {
        stream: 1,
        routing_key: "web".into(),
        origin: "old".into(),
        dest: "west".into(),
        window: 1 << 16,
        alpn: "h2".into(),
    }
    .encode(&mut open);
    old.write_all(&open).await.expect("open-alpn");
    assert!(
        server_hangs_up(&mut old).await,
        "OpenAlpn on a version 1 link is a protocol error"
    );

    // A version 2 dialer whose Hello claims version 1.
    let mut liar = dial(ALPN_LINK).await.expect("handshake");
    let Frame::Hello { version, .. } = first_frame(&mut liar).await else {
        panic!("west's first frame is not Hello");
    };
    assert_eq!(version, 2);
    liar.write_all(&hello(1, "old")).await.expect("hello");
    assert!(
        server_hangs_up(&mut liar).await,
        "a Hello that disagrees with ALPN"
    );

    // Two routers agree on the newest version.
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let links = west.call(Request::LinkStatus).await.expect("links");
    assert!(
        links
            .as_array()
            .expect("rows")
            .iter()
            .any(|l| l["peer"] == "east" && l["status"] == "up" && l["protocolVersion"] == 2),
        "{links}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_changes_and_leaves_identical_resources_alone() {
    let site = Site::start("west", false).await;
    let yaml = |port: u16| {
        format!(
            "apiVersion: skiff.io/v1alpha1\nkind: Connector\nmetadata: {{name: db}}\nspec: {{host: 127.0.0.1, port: {port}}}\n---\napiVersion: skiff.io/v1alpha1\nkind: Listener\nmetadata: {{name: db}}\nspec: {{host: 127.0.0.1, port: 0}}\n"
        )
    };
    let results = |rows: &Value| -> Vec<String> {
        rows.as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                format!(
                    "{}/{}",
                    r["kind"].as_str().unwrap_or("?"),
                    r["result"].as_str().unwrap_or("?")
                )
            })
            .collect()
    };
    let apply = |text: String| {
        let resources = router::resource::parse(&text).expect("yaml").resources;
        site.call(Request::Apply { resources })
    };
    let first = apply(yaml(5432)).await.expect("apply");
    assert_eq!(results(&first), ["Connector/created", "Listener/created"]);
    let again = apply(yaml(5432)).await.expect("apply");
    assert_eq!(
        results(&again),
        ["Connector/unchanged", "Listener/unchanged"]
    );
    let changed = apply(yaml(5433)).await.expect("apply");
    assert_eq!(
        results(&changed),
        ["Connector/configured", "Listener/unchanged"]
    );
    let connectors = site.call(Request::ConnectorStatus).await.expect("status");
    assert_eq!(connectors[0]["port"], 5433);
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_with_an_openssl_made_ca_and_router_certificate_links_and_serves() {
    let dir = std::env::temp_dir().join(format!("skiff-it-{}-pki", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "30",
                "-subj",
                "/CN=corp CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ],
        ]
        .concat(),
    );
    openssl(
        &dir,
        &[
            &["req"][..],
            &ec,
            &["-keyout", "r.key", "-out", "r.csr", "-subj", "/CN=west"],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=DNS:west,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("ext");
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "r.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "r.crt",
            "-days",
            "10",
            "-extfile",
            "ext",
        ],
    );
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect("pem");
    let supplied = router::site::Supplied {
        ca: Some(router::pki::CertKey {
            cert_pem: read("ca.crt"),
            key_pem: read("ca.key"),
        }),
        router: Some(router::pki::CertKey {
            cert_pem: read("r.crt"),
            key_pem: read("r.key"),
        }),
    };
    let west = Site::start_with("west", true, &supplied).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let (backend, _server) = checksum_backend().await;
    west.connector("sink", "sink", backend).await;
    let port = east.listener("sink", "sink").await;
    transfer(port, 1 << 20).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_connector_is_served_by_splice_byte_exact_with_half_close() {
    // Listener and connector at one site: no link, the router splices socket to socket.
    let site = Site::start("west", false).await;
    let (backend, _server) = checksum_backend().await;
    site.connector("sink", "sink", backend).await;
    let port = site.listener("sink", "sink").await;
    transfer(port, 256 << 20).await;
    transfer(port, 1).await;
}

/// Fetches `/metrics` from the site's metrics endpoint.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_links_and_connections_in_prometheus_text() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let text = scrape(&east).await;
    assert!(
        text.contains("# TYPE skiff_link_connections gauge"),
        "{text}"
    );
    assert!(
        text.contains(r#"skiff_link_connections{peer="west",direction="outgoing"} 1"#),
        "{text}"
    );
    assert!(text.contains("skiff_active_connections 0"), "{text}");
    assert!(
        text.contains(r#"skiff_certificate_expiry_timestamp_seconds{certificate="router"} "#),
        "{text}"
    );
    // The backend the suite runs on is named (SKIFF_DATAPATH; auto gives uring here).
    let status = east.call(Request::Status).await.expect("status");
    let backend = status["datapath"].as_str().expect("a backend");
    assert!(
        text.contains(&format!("skiff_datapath{{backend=\"{backend}\"}} 1")),
        "{text}"
    );
    assert!(text.contains("skiff_links_refused_total 0"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    // A service across the link: each end counts its side, labelled by name and key.
    let (backend, _server) = checksum_backend().await;
    west.connector("db", "db", backend).await;
    let port = east.listener("db-in", "db").await;
    transfer(port, 1 << 20).await;
    let east_text = scrape_until(
        &east,
        r#"skiff_listener_received_bytes_total{listener="db-in",routing_key="db"} 1048576"#,
    )
    .await;
    has_lines(
        &east_text,
        &[
            r#"skiff_listener_connections_total{listener="db-in",routing_key="db"} 1"#,
            r#"skiff_listener_active_connections{listener="db-in",routing_key="db"} 0"#,
            r#"skiff_listener_failed_connections_total{listener="db-in",routing_key="db",side="upstream"} 0"#,
            // The checksum the backend sends after the client's half-close is the answer.
            r#"skiff_listener_first_byte_seconds_count{listener="db-in",routing_key="db"} 1"#,
        ],
    );
    let west_text = scrape_until(
        &west,
        r#"skiff_connector_sent_bytes_total{connector="db",routing_key="db"} 1048576"#,
    )
    .await;
    has_lines(
        &west_text,
        &[
            r#"skiff_connector_connections_total{connector="db",routing_key="db"} 1"#,
            r#"skiff_link_streams_opened_total{peer="east",direction="incoming"} 1"#,
            r#"skiff_connector_first_byte_seconds_count{connector="db",routing_key="db"} 1"#,
        ],
    );
}

/// A link from a credential made out of band (openssl signs east's CSR with west's CA; no
/// token): `link create` checks it, stores it, and the link carries a stream. A credential for
/// another name, a key that does not match, or a certificate from another CA is refused with
/// one line, and the router keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_from_a_credential_made_out_of_band_carries_streams() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    let dir = std::env::temp_dir().join(format!("skiff-it-{}-oob", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let west_ca = west.dir().join("ca");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    std::fs::write(dir.join("ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for name in ["east", "mallory"] {
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        let subject = format!("/CN={name}");
        openssl(
            &dir,
            &[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", &subject],
            ]
            .concat(),
        );
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &west_ca.with_extension("crt").to_string_lossy(),
                "-CAkey",
                &west_ca.with_extension("key").to_string_lossy(),
                "-CAcreateserial",
                "-CAserial",
                "serial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                "ext",
            ],
        );
    }
    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).expect("pem");
    let url = west.token().await.url;
    let create = |cert: String, key: String, ca: String| {
        east.call(Request::LinkCreate {
            name: "west".into(),
            url: url.clone(),
            peer_site: "west".into(),
            ca,
            cert,
            key,
            cost: None,
            connections: None,
        })
    };
    let ca = read(west_ca.with_extension("crt"));
    let other_ca = read(east.dir().join("ca.crt"));
    for (cert, key, peer_ca, says) in [
        ("mallory.crt", "mallory.key", &ca, "common name"),
        ("east.crt", "mallory.key", &ca, "does not match"),
        (
            "east.crt",
            "east.key",
            &other_ca,
            "not signed by the peer's CA",
        ),
    ] {
        let refused = create(read(dir.join(cert)), read(dir.join(key)), peer_ca.clone())
            .await
            .expect_err("refused")
            .to_string();
        assert!(!refused.contains('\n'), "one line: {refused}");
        assert!(refused.contains(says), "{cert}, {key}: {refused}");
    }

    create(read(dir.join("east.crt")), read(dir.join("east.key")), ca)
        .await
        .expect("a good credential");
    let (backend, _server) = checksum_backend().await;
    west.connector("sink", "sink", backend).await;
    let port = east.listener("sink", "sink").await;
    transfer(port, 1 << 20).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each connection leaves one flow record at each end: the listener's at the site the client
/// entered, the connector's where the backend is, with the sites, bytes each way, the TCP
/// round-trip time and the outcome; `Flows` answers with them and the flow log has the same.
/// A client whose key has no connector anywhere is recorded as failed, on the link side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_leaves_a_flow_record_at_each_end() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let (backend, _server) = checksum_backend().await;
    west.connector("db", "db", backend).await;
    let port = east.listener("db-in", "db").await;
    transfer(port, 1 << 20).await;

    let listener_side = east
        .wait_for(
            |v| v.as_array().is_some_and(|a| !a.is_empty()),
            Request::Flows { since: None },
        )
        .await;
    let flow = &listener_side[0];
    assert_eq!(flow["role"], "listener", "{flow}");
    assert_eq!(flow["routingKey"], "db", "{flow}");
    assert_eq!(flow["resource"], "db-in", "{flow}");
    assert_eq!(
        (&flow["origin"], &flow["dest"]),
        (&"east".into(), &"west".into()),
        "{flow}"
    );
    assert_eq!(flow["bytesToBackend"], 1 << 20, "{flow}");
    assert_eq!(flow["outcome"], "ok", "{flow}");
    assert!(
        flow["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{flow}"
    );
    assert!(flow["tcpRttUs"].as_u64() > Some(0), "{flow}");
    assert!(flow["endMs"].as_u64() >= flow["startMs"].as_u64(), "{flow}");

    let connector_side = west
        .wait_for(
            |v| v.as_array().is_some_and(|a| !a.is_empty()),
            Request::Flows { since: None },
        )
        .await;
    let served = &connector_side[0];
    assert_eq!(served["role"], "connector", "{served}");
    assert_eq!(served["resource"], "db", "{served}");
    assert_eq!(
        (&served["origin"], &served["dest"]),
        (&"east".into(), &"west".into()),
        "{served}"
    );
    assert_eq!(served["bytesToBackend"], 1 << 20, "{served}");
    assert!(served["bytesToClient"].as_u64() > Some(0), "{served}");

    // A key no site serves: refused, blamed on the link side (no route).
    let nowhere = router::service::Listener {
        name: "nowhere".into(),
        host: "127.0.0.1".into(),
        port: 0,
        routing_key: "nowhere".into(),
        namespace: None,
        allow_namespaces: vec![],
        tls: None,
    };
    east.call(Request::ListenerCreate { listener: nowhere })
        .await
        .expect("listener");
    let listeners = east.call(Request::ListenerStatus).await.expect("listeners");
    let lost = listeners
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "nowhere"))
        .and_then(|l| l["port"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .expect("the listener's port");
    // The router resets it at once: the connect itself may see the reset.
    if let Ok(mut conn) = TcpStream::connect(("127.0.0.1", lost)).await {
        let _ = conn.read_to_end(&mut Vec::new()).await;
    }
    let since = flow["id"].as_u64().expect("an id");
    let failed = east
        .wait_for(
            |v| v.as_array().is_some_and(|a| !a.is_empty()),
            Request::Flows { since: Some(since) },
        )
        .await;
    assert_eq!(failed[0]["outcome"], "failed", "{failed}");
    assert_eq!(failed[0]["failure"], "link: refused (no route)", "{failed}");

    // The flow log has the same records, one JSON line each (written by a thread of its own,
    // a moment after the record is kept).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut logged = east.flow_log();
    while logged.len() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        logged = east.flow_log();
    }
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert_eq!(logged[0], listener_side[0]);
}
