//! Streams across an mTLS link between two sites, on whichever backend `SKIFF_DATAPATH` names
//! (`cargo xtask test` runs both): on io_uring the link connection and the streams' sockets are
//! served by one worker, and these check that what a relay on tokio guarantees still holds
//! there: bytes arrive exactly in both directions at once, half-close and resets are carried
//! both ways, and many streams share a link connection.

mod common;

use std::time::Duration;

use common::{Site, checksum_backend, transfer};
use router::admin::Request;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// Two linked sites: `east` has a listener for key `svc`, `west` a connector to `backend`.
async fn linked(backend: u16) -> (Site, Site, u16) {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    west.connector("svc", "svc", backend).await;
    east.listener("svc", "svc").await;
    let port = east.reachable_port("svc").await;
    (west, east, port)
}

/// On io_uring both routers' link connections are carried by a worker and the streams' sockets
/// served by it (counted in status); on epoll neither counts anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_streams_run_on_the_backend_the_suite_asked_for() {
    let (backend, _server) = checksum_backend().await;
    let (west, east, port) = linked(backend).await;
    transfer(port, 64 << 20).await;
    for site in [&east, &west] {
        let status = site.call(Request::Status).await.expect("status");
        let (links, streams) = (
            status["uringLinks"].as_u64().expect("a count"),
            status["uringStreams"].as_u64().expect("a count"),
        );
        if status["datapath"] == "uring" {
            assert!(links >= 1 && streams >= 1, "{status}");
        } else {
            assert_eq!((links, streams), (0, 0), "{status}");
        }
    }
}

/// An echo backend across the link: both directions full at once, each held back only by its
/// own stream's credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_of_a_stream_at_once_cross_the_link_exactly() {
    let (_west, _east, port) = linked(common::echo_backend().await).await;
    common::echo_both_ways(port, 64 << 20).await;
}

/// The backend resets its connection: the reset crosses the link and reaches the client as a
/// reset, not a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reset_crosses_the_link_as_a_reset() {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = backend.local_addr().expect("addr").port();
    let (_west, _east, listener) = linked(port).await;
    common::backend_reset_reaches_client(&backend, listener).await;
}

/// The client resets its connection: the backend's connection is reset too, and the next
/// stream on the same link works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_crosses_the_link_and_the_link_goes_on() {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = backend.local_addr().expect("addr").port();
    let (_west, _east, listener) = linked(port).await;
    let client = TcpStream::connect(("127.0.0.1", listener))
        .await
        .expect("connect");
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(5), backend.accept())
        .await
        .expect("the router connects in time")
        .expect("accept");
    client.set_zero_linger().expect("linger");
    drop(client);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("the backend hears in time");
    match read {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("a clean read of {n} bytes instead of a reset"),
    }
    // The link is still up for the next stream.
    ping_through(listener, &backend).await;
}

/// Opens a stream from a client at `listener` to `backend` and sends "ping" across it: the
/// client's and the backend's connections, once the bytes arrived.
async fn ping_through(listener: u16, backend: &TcpListener) -> (TcpStream, TcpStream) {
    let mut client = TcpStream::connect(("127.0.0.1", listener))
        .await
        .expect("connect");
    client.write_all(b"ping").await.expect("send");
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(5), backend.accept())
        .await
        .expect("the router connects in time")
        .expect("accept");
    let mut got = [0u8; 4];
    conn.read_exact(&mut got).await.expect("the bytes arrive");
    assert_eq!(&got, b"ping");
    (client, conn)
}

/// 1,000 streams at once on one link connection, each with its own checksummed transfer and
/// half-close: none is lost, stalled or mixed up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_cross_the_link_exactly() {
    let (backend, _server) = checksum_backend().await;
    let (_west, east, port) = linked(backend).await;
    let clients: Vec<_> = (0..STREAMS)
        .map(|_| tokio::spawn(transfer(port, 256 * 1024)))
        .collect();
    for client in clients {
        client.await.expect("transfer");
    }
    // East serves the clients' sockets. Sockets that found its buffer ring empty are received
    // again no faster than buffers come back, so each misses a few times at most; re-arming
    // every waiting socket at each turn made them miss about 80 times each (80k in all).
    let status = east.call(Request::Status).await.expect("status");
    let starved = status["uringStarvedReceives"].as_u64().expect("a count");
    eprintln!("receives that found the ring empty: {starved}");
    if status["datapath"] == "uring" {
        assert!(
            starved <= 16 * STREAMS,
            "{starved} starved receives for {STREAMS} streams"
        );
    } else {
        assert_eq!(starved, 0, "{status}");
    }
}

/// Streams of [`a_thousand_concurrent_streams_cross_the_link_exactly`].
const STREAMS: u64 = 1000;

/// What a site's relayed sockets hold of its receive budget (`skiff status`).
async fn allotted(site: &Site) -> u64 {
    let status = site.call(Request::Status).await.expect("status");
    let budget = &status["receiveBudget"];
    let (bytes, allotted) = (
        budget["bytes"].as_u64().expect("a size"),
        budget["allotted"].as_u64().expect("a size"),
    );
    assert!(bytes > 0 && allotted <= bytes, "{budget}");
    allotted
}

/// A relayed stream's socket holds a share of its router's receive budget (a fixed receive
/// buffer) while the stream lives, at both ends, and gives it back when the stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_stream_holds_a_share_of_the_receive_budget_until_it_ends() {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = backend.local_addr().expect("addr").port();
    let (west, east, listener) = linked(port).await;
    for site in [&east, &west] {
        assert_eq!(allotted(site).await, 0);
    }
    let (client, conn) = ping_through(listener, &backend).await;
    // East relays the client's socket, west the backend's.
    let floor = router::datapath::budget::FLOOR as u64;
    let ceiling = router::datapath::budget::CEILING as u64;
    for site in [&east, &west] {
        let share = allotted(site).await;
        assert!((floor..=ceiling).contains(&share), "{share}");
    }
    drop((client, conn));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for site in [&east, &west] {
        while allotted(site).await != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the share is given back when the stream ends"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
