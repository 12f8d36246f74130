//! Drives a live link of a real router with what an authenticated peer may send: each input is
//! a sequence of frames (and raw bytes, and pauses) from `mallory`, a site holding a credential
//! redeemed from one of `west`'s tokens, sent over real TLS to west's link port.
//!
//! The network around it is real and lives for the whole fuzzing process: routers `west` and
//! `east` in this process, linked, east's listener for `echo` served by west's connector (a
//! checksumming backend). After each input the connection is dropped and the invariants the
//! reviews broke are checked:
//! - nothing panics (a panic anywhere aborts the process, which libFuzzer reports);
//! - west answers its admin API within 2 s (no wedged lock);
//! - a checksummed transfer from east's listener to west's connector still succeeds (other
//!   links are unaffected);
//! - within 6 s of the connection ending, west holds no link from mallory and no connection it
//!   opened for mallory's streams (nothing left behind);
//! - memory stays bounded: libFuzzer's `-rss_limit_mb` ends the run when it does not.
//!
//! State carries over between inputs (what mallory asserted in earlier inputs stays in west's
//! link-state database, as it would in a real network), so a crash may need the inputs before
//! it to reproduce; libFuzzer keeps them in its corpus.
#![no_main]

#[path = "../../tests/common/mod.rs"]
mod common;

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use common::{Site, peer};
use libfuzzer_sys::{
    arbitrary::{self, Arbitrary},
    fuzz_target,
};
use router::{
    admin::Request,
    link::frame::{Frame, LinkState, ResetCode},
};
use tokio::io::AsyncWriteExt as _;

/// The network every input is sent into.
struct World {
    runtime: tokio::runtime::Runtime,
    west: Site,
    east: Site,
    mallory: Arc<rustls::ClientConfig>,
    /// West's link-access address.
    west_addr: String,
    /// East's listener for `echo`.
    witness_port: u16,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        // libFuzzer's C main does not ignore SIGPIPE as Rust's does: a write to a connection
        // the router closed would end the process without a word.
        // SAFETY: setting a signal's disposition to SIG_IGN has no memory-safety precondition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (west, east, mallory, west_addr, witness_port) = runtime.block_on(async {
            let (backend, _task) = common::checksum_backend().await;
            let west = Site::start("west", true).await;
            west.connector("echo", "echo", backend).await;
            let east = Site::start("east", false).await;
            east.link_to(&west).await;
            let witness_port = east.listener("echo", "echo").await;
            let mallory = peer::credentialed(&west, "mallory").await;
            let west_addr = west.token().await.url;
            (west, east, mallory, west_addr, witness_port)
        });
        // libFuzzer ends the process with exit(): remove the routers' state directories then.
        extern "C" fn remove_state() {
            if let Some(world) = WORLD.get() {
                let _ = std::fs::remove_dir_all(world.west.dir());
                let _ = std::fs::remove_dir_all(world.east.dir());
            }
        }
        // SAFETY: `remove_state` is an `extern "C" fn()` that touches only the initialised
        // `WORLD`; registering it has no other precondition.
        unsafe { libc::atexit(remove_state) };
        World {
            runtime,
            west,
            east,
            mallory,
            west_addr,
            witness_port,
        }
    })
}

/// A site name: one of the network's, or any string.
#[derive(Arbitrary, Debug)]
enum Name {
    West,
    East,
    Mallory,
    Other(String),
}

impl Name {
    fn text(&self) -> String {
        match self {
            Self::West => "west".into(),
            Self::East => "east".into(),
            Self::Mallory => "mallory".into(),
            Self::Other(s) => bounded(s),
        }
    }
}

/// A routing key: the served one, or any string.
#[derive(Arbitrary, Debug)]
enum Key {
    Echo,
    Other(String),
}

impl Key {
    fn text(&self) -> String {
        match self {
            Self::Echo => "echo".into(),
            Self::Other(s) => bounded(s),
        }
    }
}

/// A sequence number: around the clock, at the extremes, or any.
#[derive(Arbitrary, Debug)]
enum Seq {
    Now(i32),
    Max,
    Any(u64),
}

impl Seq {
    fn value(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        match self {
            Self::Now(offset) => now.saturating_add_signed(i64::from(*offset) * 1_000_000),
            Self::Max => u64::MAX,
            Self::Any(n) => *n,
        }
    }
}

/// One thing mallory does.
#[derive(Arbitrary, Debug)]
enum Op {
    Open {
        stream: u8,
        key: Key,
        origin: Name,
        dest: Name,
        window: u32,
        alpn: bool,
    },
    Data {
        stream: u8,
        len: u16,
    },
    Window {
        stream: u8,
        increment: u32,
    },
    Close {
        stream: u8,
    },
    Reset {
        stream: u8,
        code: u8,
    },
    LinkState {
        origin: Name,
        seq: Seq,
        links: Vec<(Name, u32)>,
        keys: Vec<Key>,
    },
    Hello {
        site: Name,
    },
    Ping(u64),
    Pong(u64),
    /// Bytes as they are: broken headers, truncated frames, unknown types.
    Raw(Vec<u8>),
    /// Lets the router run for this many milliseconds (at most 50 per input in all).
    Pause(u8),
}

/// Strings up to a little past the protocol's limit, so both sides of it are tried.
fn bounded(s: &str) -> String {
    s.chars().take(1100).collect()
}

/// Stream ids near both parities' first ones, so streams collide with each other and with the
/// ids west allocates.
fn stream_id(n: u8) -> u32 {
    u32::from(n % 8)
}

fn frame(op: &Op) -> Option<Frame> {
    Some(match op {
        Op::Open {
            stream,
            key,
            origin,
            dest,
            window,
            alpn,
        } => Frame::Open {
            stream: stream_id(*stream),
            routing_key: key.text(),
            origin: origin.text(),
            dest: dest.text(),
            window: *window,
            alpn: if *alpn { "h2".into() } else { String::new() },
        },
        Op::Data { stream, len } => Frame::Data {
            stream: stream_id(*stream),
            data: Bytes::from(vec![0x5a; usize::from(*len)]),
        },
        Op::Window { stream, increment } => Frame::Window {
            stream: stream_id(*stream),
            increment: *increment,
        },
        Op::Close { stream } => Frame::Close {
            stream: stream_id(*stream),
        },
        Op::Reset { stream, code } => Frame::Reset {
            stream: stream_id(*stream),
            code: ResetCode::try_from(u32::from(*code % 7)).unwrap_or(ResetCode::Internal),
            reason: "fuzz".into(),
        },
        Op::LinkState {
            origin,
            seq,
            links,
            keys,
        } => Frame::LinkState(LinkState {
            origin: origin.text(),
            seq: seq.value(),
            links: links
                .iter()
                .take(64)
                .map(|(n, c)| (n.text(), *c))
                .collect(),
            keys: keys.iter().take(64).map(Key::text).collect(),
        }),
        Op::Hello { site } => Frame::Hello {
            version: router::link::frame::VERSION,
            site: site.text(),
        },
        Op::Ping(nonce) => Frame::Ping { nonce: *nonce },
        Op::Pong(nonce) => Frame::Pong { nonce: *nonce },
        Op::Raw(_) | Op::Pause(_) => return None,
    })
}

/// Sends the ops; stops at the first write that fails (west cut the connection).
async fn send(tls: &mut peer::Tls, ops: &[Op]) {
    let mut paused = 0u32;
    for op in ops.iter().take(256) {
        let mut bytes = BytesMut::new();
        match op {
            Op::Raw(raw) => bytes.extend_from_slice(&raw[..raw.len().min(4096)]),
            Op::Pause(ms) => {
                let ms = u32::from(*ms).min(50u32.saturating_sub(paused));
                paused += ms;
                tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
            }
            other => frame(other).into_iter().for_each(|f| f.encode(&mut bytes)),
        }
        if !bytes.is_empty() && tls.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = tls.flush().await;
}

async fn check(world: &World) {
    let status = tokio::time::timeout(Duration::from_secs(2), world.west.call(Request::Status))
        .await
        .expect("west answers its admin API within 2 s (no wedged lock)")
        .expect("status");
    assert_eq!(status["site"], "west");
    tokio::time::timeout(
        Duration::from_secs(10),
        common::transfer(world.witness_port, 64 * 1024),
    )
    .await
    .expect("the east-west path still carries a transfer");
    // Nothing of mallory's is left: no link, no backend connection for its streams.
    for _ in 0..600 {
        let links = world.west.call(Request::LinkStatus).await.expect("links");
        let status = world.west.call(Request::Status).await.expect("status");
        let mallory_gone = !links
            .as_array()
            .expect("rows")
            .iter()
            .any(|row| row["peer"] == "mallory" && row["connections"] != 0);
        if mallory_gone && status["activeConnections"] == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("west still holds mallory's link or its streams' connections 6 s after it ended");
}

fuzz_target!(|ops: Vec<Op>| {
    let world = world();
    world.runtime.block_on(async {
        // Each connection is a new link connection of mallory's; the handshake is real.
        let Ok(mut tls) = peer::tls_at(&world.west_addr, Arc::clone(&world.mallory)).await else {
            panic!("mallory's credential no longer opens a link");
        };
        let first = tokio::time::timeout(Duration::from_secs(5), peer::first_frame_or_end(&mut tls))
            .await
            .expect("west's Hello in time");
        let Some(Frame::Hello { version, .. }) = first else {
            panic!("west did not say Hello first: {first:?}");
        };
        peer::send_hello(&mut tls, version, "mallory").await;
        send(&mut tls, &ops).await;
        drop(tls);
        check(world).await;
    });
    let _ = &world.east;
});
