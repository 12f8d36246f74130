//! Certificate rotation while the router runs: nothing established is dropped, and new
//! handshakes get the new certificates.

mod common;

use std::{sync::Arc, time::Duration};

use common::{Site, checksum_backend, gated_transfer, transfer};
use router::{admin::Request, pki, service::Listener, site::SiteConfig, tls};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The fingerprint of the certificate a TLS server at `port` presents as `name`.
async fn served(port: u16, config: Arc<ClientConfig>, name: &str) -> String {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = ServerName::try_from(name.to_owned()).expect("name");
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("handshake verifies against the unchanged CA");
    let certs = tls.get_ref().1.peer_certificates().expect("a certificate");
    pki::fingerprint(&certs[0])
}

/// East linked to `west`, with a checksumming backend at west behind east's listener `port`;
/// `link_port` is west's link access.
struct Linked {
    east: Site,
    port: u16,
    link_port: u16,
    _server: tokio::task::JoinHandle<()>,
}

async fn linked(west: &Site) -> Linked {
    let east = Site::start("east", false).await;
    east.link_to(west).await;
    let (backend, _server) = checksum_backend().await;
    west.connector("sink", "sink", backend).await;
    let port = east.listener("sink", "sink").await;
    let token = west.token().await;
    let link_port = token
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    Linked {
        east,
        port,
        link_port,
        _server,
    }
}

fn pem(site: &Site, file: &str) -> String {
    std::fs::read_to_string(site.dir().join(file)).expect("read PEM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_links_and_streams_and_new_handshakes_get_new_certificates() {
    let west = Site::start("west", true).await;
    let Linked {
        east,
        port,
        link_port,
        _server,
    } = linked(&west).await;
    let link_client = tls::grant_client_config(&pem(&west, "ca.crt")).expect("config");
    let identity_before = served(link_port, Arc::clone(&link_client), "west").await;

    // A TLS listener at east, to rotate alongside east's identity.
    east.call(Request::ListenerCreate {
        listener: Listener {
            name: "sink-tls".into(),
            host: "127.0.0.1".into(),
            port: 0,
            routing_key: "sink".into(),
            namespace: None,
            allow_namespaces: vec![],
            tls: Some(router::service::ListenerTls::default()),
        },
    })
    .await
    .expect("TLS listener");
    let tls_port = east.reachable_port("sink-tls").await;
    let service_client =
        tls::service_client_config(&pem(&east, "service-ca.crt"), None, None).expect("config");
    let listener_before = served(tls_port, Arc::clone(&service_client), "localhost").await;

    // A checksummed stream crosses the link while both sites rotate: its second half is sent
    // only after both have.
    let (go, gate) = tokio::sync::oneshot::channel();
    let flowing = tokio::spawn(gated_transfer(port, 64 << 20, 64 << 20, Some(gate)));
    // The first half has crossed the link (east sent it) before anything rotates.
    east.wait_for(
        |v| v[0]["bytesOut"].as_u64() >= Some(64 << 20),
        Request::LinkStatus,
    )
    .await;
    west.call(Request::RotateCerts).await.expect("rotate west");
    let done = east.call(Request::RotateCerts).await.expect("rotate east");
    assert_eq!(done["listeners"], 1, "{done}");
    go.send(()).expect("the transfer is waiting");
    tokio::time::timeout(Duration::from_secs(120), flowing)
        .await
        .expect("transfer finishes")
        .expect("byte-exact through the rotation");
    let links = east.call(Request::LinkStatus).await.expect("links");
    assert_eq!(links[0]["status"], "up", "{links}");

    // New handshakes get new certificates, still from the same CAs.
    let identity_after = served(link_port, link_client, "west").await;
    assert_ne!(
        identity_before, identity_after,
        "link access serves the new identity"
    );
    let stored = pki::certs_from_pem(&pem(&west, "router.crt")).expect("stored identity");
    assert_eq!(
        pki::fingerprint(&stored[0]),
        identity_after,
        "and it is the stored one"
    );
    let listener_after = served(tls_port, service_client, "localhost").await;
    assert_ne!(
        listener_before, listener_after,
        "the TLS listener serves a new certificate"
    );
    // And the network keeps serving new streams.
    transfer(port, 1 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_are_renewed_before_they_expire_and_links_stay_up() {
    // Six-second certificates: renewed whenever less than two seconds are left.
    let west = Site::create_and_run(
        &SiteConfig {
            name: "west".into(),
            link_access: Some("127.0.0.1:0".into()),
            cert_lifetime_secs: Some(6),
            ..SiteConfig::default()
        },
        &router::site::Supplied::default(),
    )
    .await;
    let Linked {
        east,
        port,
        link_port,
        _server,
    } = linked(&west).await;
    let client = tls::grant_client_config(&pem(&west, "ca.crt")).expect("config");
    let first = served(link_port, Arc::clone(&client), "west").await;

    // Streams keep crossing the link for longer than a certificate lives.
    let deadline = std::time::Instant::now() + Duration::from_secs(9);
    while std::time::Instant::now() < deadline {
        transfer(port, 8 << 20).await;
    }
    // `served` verifies the chain and the validity period against the clock: a certificate
    // that had been left to expire would fail here.
    let later = served(link_port, client, "west").await;
    assert_ne!(first, later, "the identity was renewed");
    let links = east.call(Request::LinkStatus).await.expect("links");
    assert_eq!(links[0]["status"], "up", "{links}");
}
