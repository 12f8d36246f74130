//! Memory that held streams leave behind: rounds of many idle streams across a link, held and
//! released, must not ratchet the process up round after round.

mod common;

use std::time::Duration;

use common::{Site, rss_kib};
use router::admin::Request;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
};

const STREAMS: usize = 2000;
const ROUNDS: usize = 6;

/// The review's rounds (5,000 idle streams, eight times) took a router from 89 to 343 MB: the
/// memory was free inside glibc's heaps but stayed resident (`router/src/trim.rs`). Here both
/// routers, the clients and the backend share one process; after each round is released the
/// process's RSS is read once both routers report no connection in flight and have trimmed
/// since. The last round may not sit far above the second (the first warms up pools and
/// tables). Without the trim: 60, 93, 124, 154, 181, 208 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_of_held_streams_do_not_ratchet_memory_up() {
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend_port = backend.local_addr().expect("addr").port();
    // Holds each connection until the router closes it.
    let held = tokio::spawn(async move {
        while let Ok((mut conn, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut conn, &mut sink).await;
            });
        }
    });
    west.connector("hold", "hold", backend_port).await;
    let port = east.listener("hold", "hold").await;

    // Every connection that ended is covered by a trim that began after it ended.
    let trimmed = |v: &serde_json::Value| {
        v["activeConnections"] == 0
            && v["memory"]["trimmedAfter"] == v["memory"]["connectionsEnded"]
    };
    let mut levels = Vec::new();
    for round in 0..ROUNDS {
        let mut clients = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS {
            let mut c = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            c.write_all(b"x").await.expect("write");
            clients.push(c);
        }
        west.wait_for(
            |v| v["activeConnections"].as_u64() >= Some(STREAMS as u64),
            Request::Status,
        )
        .await;
        drop(clients);
        for site in [&east, &west] {
            for _ in 0..100 {
                let v = site.call(Request::Status).await.expect("status");
                if v["activeConnections"] == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let ls = west.call(Request::LinkStatus).await.expect("links");
        let le = east.call(Request::LinkStatus).await.expect("links");
        eprintln!(
            "streams west {} east {}",
            ls[0]["streams"], le[0]["streams"]
        );
        for site in [&east, &west] {
            site.wait_for(trimmed, Request::Status).await;
        }
        levels.push(rss_kib());
        eprintln!("round {round}: RSS {} KiB", levels[round]);
    }
    held.abort();
    let settled = levels[1];
    let last = *levels.last().expect("rounds");
    assert!(
        last < settled + settled / 4,
        "RSS kept growing after held streams ended: {levels:?} KiB"
    );
}
