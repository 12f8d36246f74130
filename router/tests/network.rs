//! In-process integration tests: several routers in one process, on loopback, every port bound
//! on :0. Real TLS, real sockets, the real admin API.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

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
struct Site {
    name: String,
    state: StateDir,
    task: Option<JoinHandle<()>>,
}

impl Site {
    async fn start(name: &str, link_access: bool) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "skiff-it-{}-{}-{name}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let state = StateDir::new(&dir);
        state
            .create(&SiteConfig {
                name: name.into(),
                link_access: link_access.then(|| "127.0.0.1:0".into()),
            })
            .expect("site create");
        let mut site = Self {
            name: name.into(),
            state,
            task: None,
        };
        site.run().await;
        site
    }

    async fn run(&mut self) {
        let state = self.state.clone();
        self.task = Some(tokio::spawn(async move {
            app::run(state).await.expect("router runs");
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

    async fn call(&self, request: Request) -> Result<Value, admin::Error> {
        admin::call(&self.state.admin_socket(), &request).await
    }

    async fn stop(&mut self) {
        let _ = self.call(Request::Shutdown).await;
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("router stops")
                .expect("router task");
        }
    }

    async fn token(&self) -> Token {
        let value = self
            .call(Request::TokenIssue {
                redemptions: 1,
                expiry_secs: 60,
            })
            .await
            .expect("token issue");
        serde_json::from_value(value).expect("token")
    }

    /// Links `self` to `to` (self redeems a token issued by `to`) and waits until it is up.
    async fn link_to(&self, to: &Site) {
        let token = to.token().await;
        self.call(Request::TokenRedeem { token, name: None })
            .await
            .expect("redeem");
        self.wait_for(
            |v| v["links"] == 1 || v["links"].as_u64() > Some(0),
            Request::Status,
        )
        .await;
    }

    async fn wait_for(&self, ok: impl Fn(&Value) -> bool, request: Request) -> Value {
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

    async fn connector(&self, name: &str, key: &str, port: u16) {
        let connector = Connector {
            name: name.into(),
            host: "127.0.0.1".into(),
            port,
            routing_key: key.into(),
        };
        self.call(Request::ConnectorCreate { connector })
            .await
            .expect("connector");
    }

    /// Creates a listener for `key` on an ephemeral port and waits until the key is reachable.
    async fn listener(&self, name: &str, key: &str) -> u16 {
        let listener = Listener {
            name: name.into(),
            host: "127.0.0.1".into(),
            port: 0,
            routing_key: key.into(),
        };
        self.call(Request::ListenerCreate { listener })
            .await
            .expect("listener");
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

    fn dir(&self) -> PathBuf {
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

/// A word-at-a-time streaming checksum: cheap enough to run over a gigabyte in a debug build,
/// and independent of how the bytes are split into reads.
#[derive(Default)]
struct Checksum {
    hash: u64,
    pending: Vec<u8>,
    total: u64,
}

impl Checksum {
    fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if !self.pending.is_empty() {
            let take = (8 - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == 8 {
                let word = std::mem::take(&mut self.pending);
                self.mix(&word);
            }
        }
        let whole = data.len() / 8 * 8;
        for word in data[..whole].chunks_exact(8) {
            self.mix(word);
        }
        self.pending.extend_from_slice(&data[whole..]);
    }

    fn mix(&mut self, word: &[u8]) {
        let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        self.hash = (self.hash ^ word)
            .wrapping_mul(0x0100_0000_01b3)
            .rotate_left(5);
    }

    fn finish(mut self) -> (u64, u64) {
        let tail = std::mem::take(&mut self.pending);
        for byte in tail {
            self.hash = (self.hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        (self.hash, self.total)
    }
}

/// A backend that reads until EOF, then answers with the checksum and byte count of what it
/// read and closes: a transfer is byte-exact and half-close is carried end to end.
async fn checksum_backend() -> (u16, JoinHandle<()>) {
    let socket = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let port = socket.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = socket.accept().await else {
                return;
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
                let (sum, total) = sum.finish();
                let mut answer = [0u8; 16];
                answer[..8].copy_from_slice(&sum.to_le_bytes());
                answer[8..].copy_from_slice(&total.to_le_bytes());
                let _ = conn.write_all(&answer).await;
            });
        }
    });
    (port, task)
}

/// Sends `len` pseudo-random bytes to `port`, half-closes, and checks the backend's answer.
async fn transfer(port: u16, len: u64) {
    let mut conn = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect listener");
    let mut block = vec![0u8; 256 * 1024];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let (mut sum, mut sent) = (Checksum::default(), 0u64);
    while sent < len {
        let n = usize::try_from((len - sent).min(block.len() as u64)).expect("fits");
        for word in block[..n].chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let bytes = seed.to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
        sum.update(&block[..n]);
        conn.write_all(&block[..n]).await.expect("send");
        sent += n as u64;
    }
    conn.shutdown().await.expect("half-close");
    let (sum, _) = sum.finish();
    let mut answer = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(60), conn.read_exact(&mut answer))
        .await
        .expect("answer in time")
        .expect("answer after half-close");
    assert_eq!(
        u64::from_le_bytes(answer[8..].try_into().expect("8")),
        len,
        "byte count"
    );
    assert_eq!(
        u64::from_le_bytes(answer[..8].try_into().expect("8")),
        sum,
        "checksum"
    );
}

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
