//! The data path: the sockets the router serves and the loops that move bytes between them
//! and link streams.
//!
//! [`DataPath`] is the one interface between forwarding and byte moving. Forwarding decides
//! where a connection goes; the data path binds the listeners, accepts and connects the
//! sockets, and moves the bytes: [`DataPath::proxy`] (client socket to a local backend
//! socket), [`DataPath::relay`] (a socket to a link stream) and [`DataPath::splice`] (a link
//! stream to another link stream, at an interior router). It also owns what the kernel's
//! socket redirection needs from sockets (registration before connect, flow-control guards),
//! so no other module handles a data socket's file descriptor. Two backends implement it:
//! tokio's epoll reactor ([`epoll`]) and io_uring worker threads ([`uring`]), which today move
//! local hops between plain TCP sockets; everything else runs on epoll.
//!
//! A relayed connection that fails says which side failed and why ([`Failure`]); the stream
//! peer is told with the reset code that side maps to ([`Failure::reset_code`]).

pub mod budget;
mod conn;
mod copy;
mod epoll;
mod splice;
pub mod uring;

use std::{fmt, io, net::SocketAddr, sync::Arc};

pub use conn::Conn;

use crate::{
    accel::{Accel, Backpressure, OwnSockets},
    link::{
        frame::ResetCode,
        stream::{StreamRx, StreamTx},
    },
};

/// Accept queue depth of the router's listeners; the kernel caps it at net.core.somaxconn
/// (4096 by default). Connection bursts overflow a shallow queue, and an overflowing queue
/// drops handshakes, which clients see as one-second stalls.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Read buffer per direction of a relayed connection (see docs/performance.md for how the
/// size was chosen).
pub const BUFFER_SIZE: usize = 256 * 1024;

/// Which backend moves the bytes (`skiff router run --datapath`, a Site's `datapath`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// tokio's epoll reactor.
    Epoll,
    /// io_uring workers; failing to set them up fails the start.
    Uring,
    /// io_uring where `io_uring_setup` works, else epoll with the reason logged.
    #[default]
    Auto,
}

/// The router's data path: its sockets and the byte-moving loops, with the kernel's socket
/// redirection when it is on.
#[derive(Debug, Default)]
pub struct DataPath {
    /// The io_uring workers, when that backend runs.
    uring: Option<Arc<uring::Uring>>,
    /// Which backend runs and why, for `skiff status` and the log.
    note: String,
    /// Flow control for redirected sockets. Its presence also tells a local proxy to copy
    /// rather than splice (splice cannot see redirected bytes).
    backpressure: Option<Arc<Backpressure>>,
    /// Where connections to backends register with the programs before connect().
    own_sockets: Option<Arc<OwnSockets>>,
    /// The kernel memory relayed streams' sockets may pin.
    budget: budget::ReceiveBudget,
}

/// A listening socket of the data path.
#[derive(Debug)]
pub struct Listener(tokio::net::TcpListener);

/// Why [`DataPath::connect`] did not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError<E> {
    /// The caller's check refused every address the name resolved to.
    #[error("{0}")]
    Refused(E),
    /// The name did not resolve, or no address accepted (the last error).
    #[error("{0}")]
    Failed(#[source] io::Error),
}

impl DataPath {
    /// A data path on the backend `mode` asks for, whose sockets the kernel may redirect
    /// (`accel`), or plain.
    ///
    /// # Errors
    /// [`Mode::Uring`] when io_uring cannot be set up here.
    pub fn new(mode: Mode, accel: Option<&Accel>) -> Result<Self, uring::Unavailable> {
        let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let (uring, note) = match mode {
            Mode::Epoll => (None, "epoll".to_owned()),
            Mode::Uring | Mode::Auto => match uring::Uring::start(workers) {
                Ok(uring) => {
                    let note = format!(
                        "uring ({}): local hops, links and their plain TCP streams on the rings; TLS ends and accelerated sockets on epoll",
                        uring.describe()
                    );
                    (Some(Arc::new(uring)), note)
                }
                Err(e) if mode == Mode::Auto => (None, format!("epoll: {e}")),
                Err(e) => return Err(e),
            },
        };
        Ok(Self {
            uring,
            note,
            backpressure: accel.map(Accel::backpressure),
            own_sockets: accel.map(Accel::own_sockets),
            budget: budget::ReceiveBudget::default(),
        })
    }

    /// The backend that runs (`uring` or `epoll`).
    #[must_use]
    pub fn backend(&self) -> &'static str {
        if self.uring.is_some() {
            "uring"
        } else {
            "epoll"
        }
    }

    /// Connections the io_uring workers have moved (none on epoll).
    #[must_use]
    pub fn uring_connections(&self) -> u64 {
        self.uring.as_ref().map_or(0, |u| u.connections())
    }

    /// Receives on the io_uring workers that found a buffer ring empty (none on epoll).
    #[must_use]
    pub fn uring_starved(&self) -> u64 {
        self.uring.as_ref().map_or(0, |u| u.starved())
    }

    /// Which backend runs, and why (for a fallback), in one line.
    #[must_use]
    pub fn note(&self) -> &str {
        &self.note
    }

    /// Binds a TCP listener on `addr` (`host:port`; the first address it resolves to) with a
    /// [`LISTEN_BACKLOG`]-deep accept queue.
    ///
    /// # Errors
    /// When `addr` does not resolve, or the address cannot be bound.
    pub async fn listen(&self, addr: &str) -> io::Result<Listener> {
        let resolved = tokio::net::lookup_host(addr)
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "resolves to nothing"))?;
        let socket = if resolved.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(resolved)?;
        socket.listen(LISTEN_BACKLOG).map(Listener)
    }

    /// Connects to `addr` (`host:port`: each address it resolves to in turn, until one
    /// answers) with Nagle off. `check` sees each address before its socket connects and may
    /// refuse it (the router checks backends' addresses against the site policy so). With
    /// acceleration on, the socket is registered with the programs before connect(), so that
    /// sock_ops redirects this connection and no other process's to the same backend.
    ///
    /// # Errors
    /// [`ConnectError::Refused`] when `check` refused every address; otherwise
    /// [`ConnectError::Failed`] with the last error.
    pub async fn connect<E>(
        &self,
        addr: &str,
        check: impl FnMut(SocketAddr) -> Result<(), E>,
    ) -> Result<Conn, ConnectError<E>> {
        self.connect_tcp(addr, check, true).await.map(Conn::Tcp)
    }

    /// Connects a link connection to `addr` (`host:port`), as [`Self::connect`] does, but
    /// never registered with acceleration: a link leaves the node, and its bytes are the
    /// records the router seals.
    ///
    /// # Errors
    /// When the name does not resolve, or no address accepts (the last error).
    pub async fn dial(&self, addr: &str) -> io::Result<tokio::net::TcpStream> {
        self.connect_tcp(addr, |_| Ok::<(), std::convert::Infallible>(()), false)
            .await
            .map_err(|e| match e {
                ConnectError::Failed(e) => e,
                ConnectError::Refused(never) => match never {},
            })
    }

    async fn connect_tcp<E>(
        &self,
        addr: &str,
        mut check: impl FnMut(SocketAddr) -> Result<(), E>,
        accelerate: bool,
    ) -> Result<tokio::net::TcpStream, ConnectError<E>> {
        let mut last = None;
        let mut refused = None;
        let resolved = tokio::net::lookup_host(addr)
            .await
            .map_err(ConnectError::Failed)?;
        for resolved in resolved {
            if let Err(e) = check(resolved) {
                refused = Some(e);
                continue;
            }
            let socket = if resolved.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            };
            let socket = match socket {
                Ok(socket) => socket,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let registered = self
                .own_sockets
                .as_ref()
                .filter(|_| accelerate)
                .and_then(|o| o.register(&socket));
            let connected = socket.connect(resolved).await;
            drop(registered);
            match connected {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match (last, refused) {
            (Some(e), _) => ConnectError::Failed(e),
            (None, Some(refused)) => ConnectError::Refused(refused),
            (None, None) => ConnectError::Failed(io::Error::new(
                io::ErrorKind::NotFound,
                "resolves to nothing",
            )),
        })
    }

    /// Moves bytes between a client socket and a local backend socket until both directions
    /// end; each direction half-closes the other side when it ends. A failure closes both
    /// sockets with RST.
    pub async fn proxy(&self, client: Conn, backend: Conn) -> Outcome {
        match (&self.uring, client, backend, &self.backpressure) {
            // Redirected sockets need the epoll copy's flow control.
            (Some(uring), Conn::Tcp(client), Conn::Tcp(backend), None) => {
                uring.proxy(client, backend).await
            }
            (_, client, backend, accel) => epoll::proxy(client, backend, accel.as_deref()).await,
        }
    }

    /// Relays between a connection (`side` says which kind) and a link stream until both
    /// directions end. A failure closes the socket with RST and resets the stream with the
    /// code the failing side maps to.
    pub async fn relay(&self, conn: Conn, side: Side, tx: StreamTx, rx: StreamRx) -> Outcome {
        let _share = self.budget.enter(socket2::SockRef::from(conn.tcp()));
        match (&self.uring, conn, &self.backpressure) {
            // The worker that carries the link serves a plain socket too; redirected sockets
            // need the epoll copy's flow control.
            (Some(uring), Conn::Tcp(tcp), None) if uring.carries(tx.link()) => {
                uring.relay(tcp, side, tx, rx).await
            }
            (_, conn, accel) => epoll::relay(conn, side, tx, rx, accel.as_deref()).await,
        }
    }

    /// What carries link connections off tokio: the io_uring workers, when they run.
    #[must_use]
    pub fn carrier(&self) -> Option<Arc<dyn crate::link::Carrier>> {
        self.uring
            .as_ref()
            .map(|u| Arc::clone(u) as Arc<dyn crate::link::Carrier>)
    }

    /// The receive budget of relayed streams' sockets, and what the live ones hold of it, in
    /// bytes.
    #[must_use]
    pub fn receive_budget(&self) -> (usize, usize) {
        (self.budget.bytes(), self.budget.allotted())
    }

    /// Link connections the io_uring workers carried, and link streams they served.
    #[must_use]
    pub fn uring_carried(&self) -> (u64, u64) {
        self.uring.as_ref().map_or((0, 0), |u| u.carried())
    }

    /// Splices two link streams at an interior router until both directions end; a reset on
    /// either is passed on to the other with its code.
    pub async fn splice(&self, a: (StreamTx, StreamRx), b: (StreamTx, StreamRx)) -> Outcome {
        epoll::splice(a.0, a.1, b.0, b.1).await
    }

    /// Whether sockets may be redirected by the kernel (acceleration is on).
    #[must_use]
    pub fn accelerated(&self) -> bool {
        self.backpressure.is_some()
    }
}

impl Listener {
    /// The next client: its connection (Nagle off) and address.
    ///
    /// # Errors
    /// What accept(2) returns (out of descriptors, for one).
    pub async fn accept(&self) -> io::Result<(Conn, SocketAddr)> {
        let (tcp, peer) = self.0.accept().await?;
        let _ = tcp.set_nodelay(true);
        Ok((Conn::Tcp(tcp), peer))
    }

    /// The address actually bound (the requested port may be 0).
    ///
    /// # Errors
    /// When the socket has no address (never, once bound).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    /// The tokio listener, for the control-plane servers (link access) that run TLS on it.
    #[must_use]
    pub fn into_tokio(self) -> tokio::net::TcpListener {
        self.0
    }
}

/// Runs the TLS handshake of a workload connected to a TLS listener.
///
/// # Errors
/// When the handshake fails, or `conn` is TLS already.
pub async fn tls_server(conn: Conn, acceptor: &tokio_rustls::TlsAcceptor) -> io::Result<Conn> {
    match conn {
        Conn::Tcp(tcp) => Ok(Conn::TlsServer(Box::new(acceptor.accept(tcp).await?))),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "already TLS")),
    }
}

/// Runs the TLS handshake with a TLS backend as `name`.
///
/// # Errors
/// When the handshake fails, or `conn` is TLS already.
pub async fn tls_client(
    conn: Conn,
    connector: &tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
) -> io::Result<Conn> {
    match conn {
        Conn::Tcp(tcp) => Ok(Conn::TlsClient(Box::new(
            connector.connect(name, tcp).await?,
        ))),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "already TLS")),
    }
}

/// Closes the connection with RST instead of FIN: the client sees a reset at once, not a
/// clean end and not a hang.
pub fn reject(conn: Conn) {
    epoll::abort(conn.tcp());
}

/// Which side of a relayed connection failed. Used as a log field and metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The client that connected to a listener.
    Downstream,
    /// The backend a connector connected to.
    Upstream,
    /// The link stream (reset by the peer, or the link died).
    Link,
}

impl Side {
    /// Every side, in [`Side::index`] order.
    pub const ALL: [Self; 3] = [Self::Downstream, Self::Upstream, Self::Link];

    /// The side's place in [`Side::ALL`].
    #[must_use]
    pub const fn index(self) -> usize {
        match self {
            Self::Downstream => 0,
            Self::Upstream => 1,
            Self::Link => 2,
        }
    }

    /// A lowercase name for logs and metric labels.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Downstream => "downstream",
            Self::Upstream => "upstream",
            Self::Link => "link",
        }
    }
}

/// Why a side failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// A socket call failed (reset by the peer, for one).
    Io(io::ErrorKind),
    /// The stream's peer reset it, with this code.
    Reset(ResetCode),
    /// The link the stream runs on died.
    LinkLost,
    /// Refused before a byte moved, for the reason this code names (no route, the policy, a
    /// backend that cannot be reached, a TLS handshake that failed).
    Refused(ResetCode),
}

/// The side of a relayed connection that failed, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    pub side: Side,
    pub cause: Cause,
}

impl Failure {
    pub(crate) fn io(side: Side, error: &io::Error) -> Self {
        Self {
            side,
            cause: Cause::Io(error.kind()),
        }
    }

    /// The code the stream's peer is reset with when this ends a relay: a backend that failed
    /// is `Refused`, a client that went away `Cancelled`. A failure of the link itself sends
    /// nothing (the peer reset the stream, or there is no link to send on).
    #[must_use]
    pub const fn reset_code(&self) -> Option<ResetCode> {
        match self.side {
            Side::Upstream => Some(ResetCode::Refused),
            Side::Downstream => Some(ResetCode::Cancelled),
            Side::Link => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = self.side.as_str();
        match self.cause {
            Cause::Io(kind) => write!(f, "{side}: {kind}"),
            Cause::Reset(code) => write!(f, "{side}: reset by the peer ({code})"),
            Cause::LinkLost => write!(f, "{side}: the link went down"),
            Cause::Refused(code) => write!(f, "{side}: refused ({code})"),
        }
    }
}

/// How a relayed connection ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes from the socket (or first stream) towards the other end.
    pub bytes_out: u64,
    /// Bytes from the other end towards the socket (or first stream).
    pub bytes_in: u64,
    /// The side that failed and why, if the connection did not end cleanly.
    pub failed: Option<Failure>,
    /// When the first byte of the answer passed this router: written to the client (a local
    /// hop, or a listener's relay), or read from the backend (a connector's relay).
    pub first_response: Option<std::time::Instant>,
}

/// Where a one-way copy notes when its first byte moved; shared by reference between the
/// two directions' futures, hence a `OnceLock`.
pub type FirstByte = std::sync::OnceLock<std::time::Instant>;

/// Notes now as the first byte's time, unless one is noted already.
pub(crate) fn first_byte(first: &FirstByte) {
    if first.get().is_none() {
        let _ = first.set(std::time::Instant::now());
    }
}

impl Outcome {
    /// A connection refused before a byte moved, blaming `side`.
    #[must_use]
    pub const fn refused(side: Side, code: ResetCode) -> Self {
        Self {
            bytes_out: 0,
            bytes_in: 0,
            failed: Some(Failure {
                side,
                cause: Cause::Refused(code),
            }),
            first_response: None,
        }
    }
}
