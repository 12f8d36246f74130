//! The data path: the loops that move bytes between sockets and streams.
//!
//! This module is the seam between routing and byte moving. Routing decides where a connection
//! goes and hands the ends to one of three functions: [`proxy`] (client socket to a local
//! backend socket), [`relay`] (a socket to a link stream) and [`splice`] (a link stream to
//! another link stream, at an interior router). Today one backend implements them on tokio's
//! epoll reactor ([`tokio_rt`]); an io_uring backend slots in behind the same functions.

mod conn;
mod copy;
mod splice;
mod tokio_rt;

pub use conn::Conn;
pub use tokio_rt::{abort, proxy, relay, splice};

/// Accept queue depth of the router's listeners; the kernel caps it at net.core.somaxconn
/// (4096 by default). Connection bursts overflow a shallow queue, and an overflowing queue
/// drops handshakes, which clients see as one-second stalls.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener on `addr` (`host:port`; the first address it resolves to) with a
/// [`LISTEN_BACKLOG`]-deep accept queue.
///
/// # Errors
/// When `addr` does not resolve, or the address cannot be bound.
pub async fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let resolved = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the address resolves to nothing",
        )
    })?;
    let socket = if resolved.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(resolved)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Connects to `addr` (`host:port`: each address it resolves to in turn, until one answers).
/// `before` sees each socket and the address it is for before its connect(): an error skips
/// that address, and what it returns is kept until connect() has returned (the router checks
/// the address against its policy and registers its own sockets with the eBPF programs so).
///
/// # Errors
/// When `addr` does not resolve, or no address accepts the connection (the last error).
pub async fn connect<G>(
    addr: &str,
    mut before: impl FnMut(&tokio::net::TcpSocket, std::net::SocketAddr) -> std::io::Result<G>,
) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = None;
    for resolved in tokio::net::lookup_host(addr).await? {
        let socket = if resolved.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        let guard = match before(&socket, resolved) {
            Ok(guard) => guard,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let connected = socket.connect(resolved).await;
        drop(guard);
        match connected {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the address resolves to nothing",
        )
    }))
}

/// Read buffer per direction of a relayed connection. On this machine a relay with tokio's
/// default 8 KiB buffers reached 29% of direct loopback throughput, with 256 KiB 58%.
pub const BUFFER_SIZE: usize = 256 * 1024;

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

/// How a relayed connection ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes from the socket (or first stream) towards the other end.
    pub bytes_out: u64,
    /// Bytes from the other end towards the socket (or first stream).
    pub bytes_in: u64,
    /// The side that failed, if the connection did not end cleanly.
    pub failed: Option<Side>,
}
