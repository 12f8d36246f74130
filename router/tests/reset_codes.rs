//! A stream that cannot be served, or that fails, is reset with the code docs/protocol.md
//! names for the cause, and a reason that says which side failed.

mod common;

use std::time::Duration;

use common::{Site, peer};
use router::{
    admin::Request,
    link::frame::{Frame, ResetCode},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn open(stream: u32, key: &str) -> Frame {
    Frame::Open {
        stream,
        routing_key: key.into(),
        origin: "evil".into(),
        dest: "west".into(),
        window: 1 << 16,
        alpn: String::new(),
    }
}

/// Site west, and a connector `db` to a backend that listens (and accepts only when asked).
async fn west_with_backend() -> (Site, tokio::net::TcpListener) {
    let west = Site::start("west", true).await;
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    west.connector("db", "db", backend.local_addr().expect("addr").port())
        .await;
    (west, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_for_a_key_with_no_connector_here_is_reset_no_route() {
    let west = Site::start("west", true).await;
    let mut evil = peer::linked_peer(&west, "evil").await;
    peer::send(&mut evil, open(1, "nothing")).await;
    let (code, reason) = peer::reset(&mut evil, 1).await;
    assert_eq!(code, ResetCode::NoRoute, "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_policy_forbids_is_reset_policy() {
    let (west, backend) = west_with_backend().await;
    let policy = serde_json::from_value(serde_json::json!({
        "allowIncomingLinks": true,
        "allowedServices": ["web"],
    }))
    .expect("policy");
    west.call(Request::PolicySet { policy })
        .await
        .expect("policy set");
    let mut evil = peer::linked_peer(&west, "evil").await;
    peer::send(&mut evil, open(1, "db")).await;
    let (code, reason) = peer::reset(&mut evil, 1).await;
    assert_eq!(code, ResetCode::Policy, "{reason}");
    let accepted = tokio::time::timeout(Duration::ZERO, backend.accept()).await;
    assert!(accepted.is_err(), "the backend saw a connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_backend_refuses_is_reset_refused() {
    let west = Site::start("west", true).await;
    // A port nothing listens on: bound, then closed.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr").port()
    };
    west.connector("db", "db", port).await;
    let mut evil = peer::linked_peer(&west, "evil").await;
    peer::send(&mut evil, open(1, "db")).await;
    let (code, reason) = peer::reset(&mut evil, 1).await;
    assert_eq!(code, ResetCode::Refused, "{reason}");
    assert!(reason.contains("connect to 127.0.0.1"), "{reason}");
}

/// The backend accepts, then resets the connection: the stream is reset `Refused`, and the
/// reason names the upstream side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_resets_mid_stream_resets_the_stream_refused_naming_upstream() {
    let (west, backend) = west_with_backend().await;
    let mut evil = peer::linked_peer(&west, "evil").await;
    peer::send(&mut evil, open(1, "db")).await;
    let (conn, _) = tokio::time::timeout(Duration::from_secs(5), backend.accept())
        .await
        .expect("the router connects in time")
        .expect("accept");
    // A byte through the relay first: it is running, so the reset is mid-stream (not a
    // failed connect()).
    let mut frames = peer::Frames::default();
    frames
        .until(&mut evil, |f| matches!(f, Frame::Window { stream: 1, .. }))
        .await;
    peer::send(
        &mut evil,
        Frame::Data {
            stream: 1,
            data: bytes::Bytes::from_static(b"x"),
        },
    )
    .await;
    let mut byte = [0u8; 1];
    let mut conn = conn;
    conn.read_exact(&mut byte).await.expect("the byte arrives");
    // Linger 0: close sends RST.
    conn.set_zero_linger().expect("linger");
    drop(conn);
    let Frame::Reset { code, reason, .. } = frames
        .until(&mut evil, |f| matches!(f, Frame::Reset { stream: 1, .. }))
        .await
    else {
        unreachable!("until returns what it was asked for")
    };
    assert_eq!(code, ResetCode::Refused, "{reason}");
    assert!(reason.starts_with("upstream"), "{reason}");
    evil.shutdown().await.ok();
}
