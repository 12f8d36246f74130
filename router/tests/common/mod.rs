//! What the in-process integration tests share: a router running in this process with its
//! state in a temporary directory, driven through the real admin API; a checksumming backend;
//! a checksummed transfer.

#![allow(dead_code)] // each test file uses its own part of this

pub mod fake_api;
pub mod peer;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use kernel_tests::Checksum;
use router::{
    admin::{self, Request},
    app,
    service::{Connector, Listener},
    site::{SiteConfig, StateDir},
    token::Token,
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// A router running in this process, with its state in a temporary directory.
pub struct Site {
    pub name: String,
    pub state: StateDir,
    task: Option<JoinHandle<()>>,
}

impl Site {
    pub async fn start(name: &str, link_access: bool) -> Self {
        Self::start_with(name, link_access, &router::site::Supplied::default()).await
    }

    /// A site whose link access is at `addr` (a fixed port survives a restart of its router).
    pub async fn start_on(name: &str, addr: &str) -> Self {
        Self::create_and_run(
            &SiteConfig {
                name: name.into(),
                link_access: Some(addr.into()),
                ..SiteConfig::default()
            },
            &router::site::Supplied::default(),
        )
        .await
    }

    pub async fn start_with(
        name: &str,
        link_access: bool,
        supplied: &router::site::Supplied,
    ) -> Self {
        Self::create_and_run(
            &SiteConfig {
                name: name.into(),
                link_access: link_access.then(|| "127.0.0.1:0".into()),
                ..SiteConfig::default()
            },
            supplied,
        )
        .await
    }

    /// A site created from `config` (and user-supplied certificates), its router running.
    pub async fn create_and_run(config: &SiteConfig, supplied: &router::site::Supplied) -> Self {
        let site = Self::uncreated(&config.name);
        site.state
            .create_with(config, supplied)
            .expect("site create");
        let mut site = site;
        site.run().await;
        site
    }

    /// A state directory of its own with no site in it yet (something else creates it), and
    /// no router running.
    pub fn uncreated(name: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "skiff-it-{}-{}-{name}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        Self {
            name: name.into(),
            state: StateDir::new(&dir),
            task: None,
        }
    }

    /// Runs the site's router on the suite's data path ([`datapath`]).
    pub async fn run(&mut self) {
        self.run_with(Some(datapath())).await;
    }

    /// Runs the site's router as `router run --datapath` would with `datapath` (the site's
    /// own choice when `None`).
    pub async fn run_with(&mut self, datapath: Option<router::datapath::Mode>) {
        let state = self.state.clone();
        self.task = Some(tokio::spawn(async move {
            // Every test router logs its flows, in its state directory (`Site::flow_log`).
            let flow_log = state.root().join("flows.jsonl").display().to_string();
            let options = app::RunOptions {
                metrics_addr: Some("127.0.0.1:0".into()),
                datapath,
                flow_log: Some(flow_log),
                ..app::RunOptions::default()
            };
            app::run(state, options).await.expect("router runs");
        }));
        for _ in 0..200 {
            if admin::call(&self.state.admin_socket(), &Request::Status)
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("router {} did not start", self.name);
    }

    /// The flow records the router wrote to its flow log so far.
    pub fn flow_log(&self) -> Vec<Value> {
        // Only whole lines: the writer may be in the middle of one.
        std::fs::read_to_string(self.state.root().join("flows.jsonl"))
            .unwrap_or_default()
            .split_inclusive('\n')
            .filter_map(|l| l.strip_suffix('\n'))
            .map(|l| serde_json::from_str(l).expect("a flow record is a JSON line"))
            .collect()
    }

    pub async fn call(&self, request: Request) -> Result<Value, admin::Error> {
        admin::call(&self.state.admin_socket(), &request).await
    }

    pub async fn stop(&mut self) {
        let _ = self.call(Request::Shutdown).await;
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("router stops")
                .expect("router task");
        }
    }

    pub async fn token(&self) -> Token {
        let value = self
            .call(Request::TokenIssue {
                redemptions: 1,
                expiry_secs: 60,
            })
            .await
            .expect("token issue");
        serde_json::from_value(value).expect("token")
    }

    /// Redeems `token` here with default link settings.
    pub async fn redeem(&self, token: Token) -> Result<Value, admin::Error> {
        self.call(Request::TokenRedeem {
            token,
            name: None,
            cost: None,
            connections: None,
        })
        .await
    }

    /// Links `self` to `to` (self redeems a token issued by `to`) and waits until it is up.
    pub async fn link_to(&self, to: &Site) {
        let token = to.token().await;
        self.redeem(token).await.expect("redeem");
        self.wait_for(
            |v| v["links"] == 1 || v["links"].as_u64() > Some(0),
            Request::Status,
        )
        .await;
    }

    pub async fn wait_for(&self, ok: impl Fn(&Value) -> bool, request: Request) -> Value {
        for _ in 0..500 {
            if let Ok(v) = self.call(request.clone()).await
                && ok(&v)
            {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{}: condition not reached for {request:?}", self.name);
    }

    pub async fn connector(&self, name: &str, key: &str, port: u16) {
        let connector = Connector {
            name: name.into(),
            host: "127.0.0.1".into(),
            port,
            routing_key: key.into(),
            tls: None,
        };
        self.call(Request::ConnectorCreate { connector })
            .await
            .expect("connector");
    }

    /// Creates a listener for `key` on an ephemeral port and waits until the key is reachable.
    pub async fn listener(&self, name: &str, key: &str) -> u16 {
        let listener = Listener {
            name: name.into(),
            host: "127.0.0.1".into(),
            port: 0,
            routing_key: key.into(),
            namespace: None,
            allow_namespaces: vec![],
            tls: None,
        };
        self.call(Request::ListenerCreate { listener })
            .await
            .expect("listener");
        self.reachable_port(name).await
    }

    /// Waits until listener `name` is reachable and returns the port it got.
    pub async fn reachable_port(&self, name: &str) -> u16 {
        let status = self
            .wait_for(
                |v| {
                    v.as_array().is_some_and(|ls| {
                        ls.iter()
                            .any(|l| l["name"] == name && l["reachable"] == true)
                    })
                },
                Request::ListenerStatus,
            )
            .await;
        let row = status
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["name"] == name))
            .expect("listener row");
        u16::try_from(row["port"].as_u64().expect("port")).expect("port fits")
    }

    pub fn dir(&self) -> PathBuf {
        self.state.root().to_owned()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let _ = std::fs::remove_dir_all(self.dir());
    }
}

/// The data-path backend the suite runs on: `SKIFF_DATAPATH` (epoll, uring, auto), as the
/// router's own flag reads it; `auto` when unset.
pub fn datapath() -> router::datapath::Mode {
    match std::env::var("SKIFF_DATAPATH").as_deref() {
        Ok("epoll") => router::datapath::Mode::Epoll,
        Ok("uring") => router::datapath::Mode::Uring,
        Ok("auto") | Err(_) => router::datapath::Mode::Auto,
        Ok(other) => panic!("SKIFF_DATAPATH={other}: use epoll, uring or auto"),
    }
}

/// A backend that reads until EOF, then answers with the checksum and byte count of what it
/// read and closes: a transfer is byte-exact and half-close is carried end to end.
pub async fn checksum_backend() -> (u16, JoinHandle<()>) {
    // As deep an accept queue as the router's: a burst of connections must not overflow it.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind((std::net::Ipv4Addr::LOCALHOST, 0).into())
        .expect("bind backend");
    let socket = socket.listen(4096).expect("listen");
    let port = socket.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        loop {
            let mut conn = match socket.accept().await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    eprintln!("checksum backend: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut sum = Checksum::default();
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => sum.update(&buf[..n]),
                        Err(_) => return,
                    }
                }
                let _ = conn.write_all(&sum.finish_bytes()).await;
            });
        }
    });
    (port, task)
}

/// Sends `len` pseudo-random bytes to `port`, half-closes, and checks the backend's answer.
pub async fn transfer(port: u16, len: u64) {
    gated_transfer(port, len, 0, None).await;
}

/// [`transfer`] in two parts: `first` bytes, then (once `go` fires, if given) `rest` more. The
/// stream is open, with bytes through it, for as long as the caller holds `go`.
pub async fn gated_transfer(
    port: u16,
    first: u64,
    rest: u64,
    go: Option<tokio::sync::oneshot::Receiver<()>>,
) {
    let len = first + rest;
    let mut conn = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect listener");
    let mut block = vec![0u8; 256 * 1024];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let (mut sum, mut sent) = (Checksum::default(), 0u64);
    let mut go = go;
    while sent < len {
        if sent >= first
            && let Some(go) = go.take()
        {
            go.await.expect("the go signal");
        }
        let limit = if sent < first { first } else { len };
        let n = usize::try_from((limit - sent).min(block.len() as u64)).expect("fits");
        kernel_tests::fill(&mut block[..n], &mut seed);
        sum.update(&block[..n]);
        conn.write_all(&block[..n]).await.expect("send");
        sent += n as u64;
    }
    conn.shutdown().await.expect("half-close");
    let expected = sum.finish_bytes();
    let mut answer = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(60), conn.read_exact(&mut answer))
        .await
        .expect("answer in time")
        .expect("answer after half-close");
    assert_eq!(answer[8..], expected[8..], "byte count");
    assert_eq!(answer[..8], expected[..8], "checksum");
}

/// This process's resident set size, in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A process a test started, killed (by PID) on drop.
pub struct Spawned(pub std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nothing listens on yet.
pub async fn free_port() -> u16 {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    socket.local_addr().expect("addr").port()
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
pub async fn wait_listening(port: u16) {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {port}");
}

/// Starts `cmd` (output discarded) and waits until it listens on `port`.
pub async fn serve(cmd: &mut std::process::Command, port: u16) -> Spawned {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start {cmd:?}: {e}"));
    let server = Spawned(child);
    wait_listening(port).await;
    server
}

/// Makes a self-signed P-256 certificate with openssl, valid one day, for `cn` (also its DNS
/// subject alternative name): `key` and `cert` are written as PEM.
pub fn self_signed(cn: &str, key: &std::path::Path, cert: &std::path::Path) {
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", &format!("/CN={cn}")])
        .args(["-addext", &format!("subjectAltName=DNS:{cn}")])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .expect("openssl runs");
    assert!(made.status.success(), "openssl req: {made:?}");
}

/// The router's Prometheus exposition, fetched over HTTP from its metrics address.
pub async fn scrape(site: &Site) -> String {
    let status = site.call(Request::Status).await.expect("status");
    let addr = status["metricsAddr"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let mut conn = TcpStream::connect(addr).await.expect("connect metrics");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
}

/// Asserts that the exposition `text` has each of `lines`.
pub fn has_lines(text: &str, lines: &[&str]) {
    for line in lines {
        assert!(text.lines().any(|l| l == *line), "no {line} in {text}");
    }
}

/// Scrapes `site` until its metrics contain `line` (counters of a connection are added when
/// it ends, a moment after its client sees the end), for at most 5 s.
pub async fn scrape_until(site: &Site, line: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(site).await;
        if text.contains(line) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {line} in {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A backend that echoes every connection's bytes back, and half-closes after its client did.
pub async fn echo_backend() -> u16 {
    let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = echo.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// Sends `len` checksummed bytes to an echo service at `port` while reading them back, both
/// directions full at once, and checks that every byte came back in order.
pub async fn echo_both_ways(port: u16, len: usize) {
    let conn = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut r, mut w) = conn.into_split();
    let writer = tokio::spawn(async move {
        let mut block = vec![0u8; 128 * 1024];
        let (mut seed, mut sum, mut sent) = (7u64, Checksum::default(), 0);
        while sent < len {
            kernel_tests::fill(&mut block, &mut seed);
            sum.update(&block);
            w.write_all(&block).await.expect("send");
            sent += block.len();
        }
        w.shutdown().await.expect("half-close");
        sum.finish_bytes()
    });
    let mut buf = vec![0u8; 256 * 1024];
    let (mut sum, mut got) = (Checksum::default(), 0);
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf))
            .await
            .expect("echo in time")
            .expect("read");
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
        got += n;
    }
    assert_eq!(got, len, "bytes echoed");
    assert_eq!(
        sum.finish_bytes(),
        writer.await.expect("writer"),
        "checksum"
    );
}

/// Connects a client to `listener`, lets `backend` accept the router's connection and reset
/// it after the first byte, and checks that the client sees a reset, not a clean end.
pub async fn backend_reset_reaches_client(backend: &TcpListener, listener: u16) {
    let mut client = TcpStream::connect(("127.0.0.1", listener))
        .await
        .expect("connect");
    client.write_all(b"x").await.expect("send");
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(5), backend.accept())
        .await
        .expect("the router connects in time")
        .expect("accept");
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte).await.expect("the byte arrives");
    conn.set_zero_linger().expect("linger");
    drop(conn);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .expect("the client hears in time");
    match read {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("a clean read of {n} bytes instead of a reset"),
    }
}
