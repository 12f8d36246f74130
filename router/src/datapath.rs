//! The data path: the loops that move bytes between sockets and streams.
//!
//! This module is the seam between routing and byte moving. Routing decides where a connection
//! goes and hands the ends to one of three functions: [`proxy`] (client socket to a local
//! backend socket), [`relay`] (a socket to a link stream) and [`splice`] (a link stream to
//! another link stream, at an interior router). Today one backend implements them on tokio's
//! epoll reactor ([`tokio_rt`]); an io_uring backend slots in behind the same functions.

mod splice;
mod tokio_rt;

pub use tokio_rt::{Copy, abort, proxy, relay, splice};

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
