//! Drives a real router's token redemption (`skiff-grant/1` over real TLS) with what a token
//! holder, or anyone who reaches the port, may send: redemption requests whose grant, code,
//! site name and certificate signing request are each right, wrong or arbitrary, or arbitrary
//! bytes in place of the request line, from sources spread over 127.0.0.0/8 (so the per-source
//! rate limit does not end the search after five failures).
//!
//! Each input gets a fresh token of three redemptions from `west` (a router in this process).
//! Checked after every request:
//! - west answers one line that is a redemption response, within 5 s, and keeps answering its
//!   admin API (no panic, no wedged lock);
//! - a refusal is one line under 1 KiB and costs the grant nothing (its `redemptionsLeft` in
//!   `STATE/grants.json` is unchanged);
//! - a credential is given only for the right grant and code, while a redemption was left, to
//!   a name not already held; it names the requested site (whatever the CSR's subject said)
//!   and uses exactly one redemption.
#![no_main]

#[path = "../../tests/common/mod.rs"]
mod common;

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use common::Site;
use libfuzzer_sys::{
    arbitrary::{self, Arbitrary},
    fuzz_target,
};
use router::{
    admin::Request,
    token::{RedeemRequest, RedeemResponse, Token},
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

struct World {
    runtime: tokio::runtime::Runtime,
    west: Site,
    /// Names west has given credentials for (and its own, and its linked peer's).
    taken: Mutex<HashSet<String>>,
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
        let west = runtime.block_on(Site::start("west", true));
        extern "C" fn remove_state() {
            if let Some(world) = WORLD.get() {
                let _ = std::fs::remove_dir_all(world.west.dir());
            }
        }
        // SAFETY: `remove_state` is an `extern "C" fn()` that touches only the initialised
        // `WORLD`; registering it has no other precondition.
        unsafe { libc::atexit(remove_state) };
        World {
            runtime,
            west,
            taken: Mutex::new(HashSet::from(["west".to_owned()])),
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Field {
    Right,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum SiteName {
    /// A name from a small set, so that names collide with earlier credentials.
    Pick(u8),
    West,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Csr {
    /// A well-formed CSR whose subject is the requested site.
    ForSite,
    /// A well-formed CSR whose subject is another name.
    ForName(SiteName),
    Text(String),
    Empty,
}

#[derive(Arbitrary, Debug)]
struct Req {
    grant: Field,
    code: Field,
    site: SiteName,
    csr: Csr,
    /// Sent instead of the JSON request when present.
    raw: Option<Vec<u8>>,
    /// The low 24 bits pick the source address in 127.0.0.0/8.
    source: u32,
}

impl SiteName {
    fn text(&self) -> String {
        match self {
            Self::Pick(n) => format!("site-{}", n % 16),
            Self::West => "west".into(),
            Self::Other(s) => s.chars().take(1100).collect(),
        }
    }
}

fn text(field: &Field, right: &str) -> String {
    match field {
        Field::Right => right.to_owned(),
        Field::Other(s) => s.chars().take(2000).collect(),
    }
}

/// The grant's redemptions left as west last persisted them (0 when it dropped the grant).
fn left(west: &Site, grant: &str) -> u64 {
    let path = west.dir().join("grants.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return 0;
    };
    let grants: serde_json::Value = serde_json::from_str(&text).expect("grants.json is JSON");
    grants[grant]["redemptionsLeft"].as_u64().unwrap_or(0)
}

/// Sends `line` from `source` and returns west's one-line answer.
async fn exchange(token: &Token, source: u32, line: &[u8]) -> String {
    let a = Ipv4Addr::from(0x7f00_0000 | (source & 0x00ff_ffff));
    let a = if a.octets()[3] == 0 || a.octets()[3] == 255 {
        Ipv4Addr::new(127, 0, 0, 2)
    } else {
        a
    };
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((a, 0)))
        .expect("bind in 127/8");
    let addr: SocketAddr = token.url.parse().expect("the token's address");
    let tcp = socket.connect(addr).await.expect("west's link port");
    let config = router::tls::grant_client_config(&token.ca).expect("grant config");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("west's certificate chains to the token's CA");
    // West may stop reading past its request limit and answer early: writing may fail then.
    let _ = tls.write_all(line).await;
    let _ = tls.shutdown().await;
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::BufReader::new(tls)
            .take(64 * 1024)
            .read_line(&mut answer),
    )
    .await
    .expect("an answer within 5 s")
    .expect("an answer line");
    answer
}

async fn redeem(world: &World, token: &Token, req: &Req) {
    let site = req.site.text();
    let line = if let Some(raw) = &req.raw {
        raw[..raw.len().min(20 * 1024)].to_vec()
    } else {
        let csr = match &req.csr {
            Csr::ForSite => router::pki::new_csr(&site).map(|(csr, _)| csr).unwrap_or_default(),
            Csr::ForName(name) => router::pki::new_csr(&name.text())
                .map(|(csr, _)| csr)
                .unwrap_or_default(),
            Csr::Text(s) => s.chars().take(4000).collect(),
            Csr::Empty => String::new(),
        };
        let request = RedeemRequest {
            grant: text(&req.grant, &token.grant),
            code: text(&req.code, &token.code),
            site: site.clone(),
            csr,
        };
        let mut line = serde_json::to_vec(&request).expect("json");
        line.push(b'\n');
        line
    };
    let before = left(&world.west, &token.grant);
    let answer = exchange(token, req.source, &line).await;
    assert!(answer.ends_with('\n'), "one whole line: {answer:?}");
    let response: RedeemResponse =
        serde_json::from_str(&answer).expect("the answer is a redemption response");
    let after = left(&world.west, &token.grant);
    match response {
        RedeemResponse::Error { error } => {
            assert!(!error.contains('\n') && error.len() < 1024, "one line: {error:?}");
            assert_eq!(before, after, "a refusal ({error}) cost the grant a redemption");
        }
        RedeemResponse::Ok { certificate, .. } => {
            assert!(req.raw.is_none(), "a credential for raw bytes");
            assert!(
                matches!((&req.grant, &req.code), (Field::Right, Field::Right)),
                "a credential without the grant's code"
            );
            assert!(before > 0, "a credential from a used-up grant");
            assert_eq!(after + 1, before, "a credential used other than one redemption");
            let der = router::pki::certs_from_pem(&certificate).expect("a certificate")[0].clone();
            assert_eq!(
                router::pki::common_name(&der).as_deref(),
                Some(site.as_str()),
                "the credential names the requested site"
            );
            let mut taken = world.taken.lock().expect("taken");
            assert!(taken.insert(site.clone()), "{site:?} was given out twice");
        }
    }
}

fuzz_target!(|reqs: Vec<Req>| {
    let world = world();
    world.runtime.block_on(async {
        let value = world
            .west
            .call(Request::TokenIssue {
                redemptions: 3,
                expiry_secs: 600,
            })
            .await
            .expect("token issue");
        let token: Token = serde_json::from_value(value).expect("token");
        for req in reqs.iter().take(4) {
            redeem(world, &token, req).await;
        }
        tokio::time::timeout(Duration::from_secs(2), world.west.call(Request::Status))
            .await
            .expect("west answers its admin API within 2 s")
            .expect("status");
    });
});
