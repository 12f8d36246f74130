//! A listener and a connector at the same site, joined by the data path with no link: bytes
//! arrive exactly, half-close and resets are carried, many connections run at once, on
//! whichever backend `SKIFF_DATAPATH` names (`cargo xtask test` runs both).

mod common;

use common::{Site, checksum_backend, transfer};
use router::admin::Request;
use tokio::net::TcpListener;

async fn local_site(backend_port: u16) -> (Site, u16) {
    let site = Site::start("solo", false).await;
    site.connector("svc", "svc", backend_port).await;
    let port = site.listener("svc", "svc").await;
    (site, port)
}

/// The suite runs on the backend it asked for: `uring`, and `auto` where io_uring is enabled
/// (`kernel.io_uring_disabled = 0`), give io_uring; `auto` elsewhere says why it fell back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_backend_the_suite_asked_for() {
    let site = Site::start("solo", false).await;
    let status = site.call(Request::Status).await.expect("status");
    let enabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .is_ok_and(|v| v.trim() == "0");
    let want = match common::datapath() {
        router::datapath::Mode::Epoll => "epoll",
        router::datapath::Mode::Uring => "uring",
        router::datapath::Mode::Auto if enabled => "uring",
        router::datapath::Mode::Auto => "epoll",
    };
    assert_eq!(status["datapath"], want, "{status}");
    let summary = status["datapathSummary"].as_str().unwrap_or_default();
    assert!(summary.starts_with(want), "{status}");
    if common::datapath() == router::datapath::Mode::Auto && want == "epoll" {
        assert!(
            summary.contains("io_uring"),
            "a fallback says why: {summary}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transfer_arrives_exactly_and_half_close_carries_the_answer_back() {
    let (port, _backend) = checksum_backend().await;
    let (site, listener) = local_site(port).await;
    transfer(listener, 256 << 20).await;
    // The bytes went through the backend the suite asked for.
    let status = site.call(Request::Status).await.expect("status");
    let on_rings = status["uringConnections"].as_u64().expect("a count");
    let expected = u64::from(status["datapath"] == "uring");
    assert_eq!(on_rings, expected, "{status}");
}

/// An echo backend: both directions full at once, through the buffers' back-pressure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_at_once_arrive_exactly() {
    let (_site, listener) = local_site(common::echo_backend().await).await;
    common::echo_both_ways(listener, 64 << 20).await;
}

/// The backend resets the connection: the client sees a reset, not a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reset_reaches_the_client_as_a_reset() {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = backend.local_addr().expect("addr").port();
    let (_site, listener) = local_site(port).await;
    common::backend_reset_reaches_client(&backend, listener).await;
}

/// 1,000 connections at once, each with its own checksummed transfer: the buffers are shared
/// among them and none is lost or mixed up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_each_arrive_exactly() {
    let (port, _backend) = checksum_backend().await;
    let (_site, listener) = local_site(port).await;
    let clients: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(transfer(listener, 256 * 1024)))
        .collect();
    for client in clients {
        client.await.expect("transfer");
    }
}
