//! What one link connection may hold for a peer that grants credit and never reads: its own
//! process, so that no other test's memory moves the figure.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{Site, peer, rss_kib};
use router::{
    admin::Request,
    link::frame::{Frame, LinkState},
};
use tokio::io::AsyncWriteExt as _;

/// The review's peer granted credit and read nothing, and each link connection queued about
/// 64 MiB for it (1,024 frames of 64 KiB). Now the queue holds at most `QUEUE_BYTES` (4 MiB):
/// while a client pushes into a stream towards such a peer, the process grows by far less
/// than the old bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_grants_credit_and_never_reads_gets_at_most_the_queue_bound() {
    let west = Site::start("west", true).await;
    let mut evil = peer::linked_peer(&west, "evil").await;
    let seq = u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock")
            .as_micros(),
    )
    .expect("fits");
    peer::send(
        &mut evil,
        Frame::LinkState(LinkState {
            origin: "evil".into(),
            seq,
            links: vec![("west".into(), 1)],
            keys: vec!["sink".into()],
        }),
    )
    .await;
    let port = west.listener("sink", "sink").await;

    let before = rss_kib();
    let pusher = tokio::spawn(async move {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let block = vec![0u8; 1 << 20];
        for _ in 0..512 {
            if conn.write_all(&block).await.is_err() {
                return;
            }
        }
    });
    // West opens its first stream to evil (id 2: evil dialled); evil grants it a GiB of
    // credit without reading a byte.
    west.wait_for(
        |v| {
            v.as_array().is_some_and(|rows| {
                rows.iter()
                    .any(|r| r["peer"] == "evil" && r["streams"] == 1)
            })
        },
        Request::LinkStatus,
    )
    .await;
    peer::send(
        &mut evil,
        Frame::Window {
            stream: 2,
            increment: 1 << 30,
        },
    )
    .await;
    let mut peak = before;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        peak = peak.max(rss_kib());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pusher.abort();
    let grown = peak.saturating_sub(before);
    eprintln!("RSS {before} KiB before, {peak} KiB at most: grew {grown} KiB");
    assert!(
        grown < 32 << 10,
        "the process grew {grown} KiB for one peer that reads nothing (bound 4 MiB queued)"
    );
}
