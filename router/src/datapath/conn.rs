//! A connection the data path moves bytes on: plain TCP, or TLS over TCP (a TLS listener's
//! client, a TLS connector's backend). Plain TCP keeps its zero-copy paths; TLS goes through
//! rustls and a user-space copy.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{client, server};

/// A plain or TLS connection to a workload or a backend.
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    /// A workload connected to a TLS listener.
    TlsServer(Box<server::TlsStream<TcpStream>>),
    /// The router connected to a TLS backend.
    TlsClient(Box<client::TlsStream<TcpStream>>),
}

impl Conn {
    /// The TCP socket underneath (for an abortive close).
    #[must_use]
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Tcp(tcp) => tcp,
            Self::TlsServer(tls) => tls.get_ref().0,
            Self::TlsClient(tls) => tls.get_ref().0,
        }
    }
}

impl Conn {
    /// The application protocol a TLS client agreed with a TLS listener (ALPN); empty for
    /// none, for plain TCP, and for one that is not UTF-8 (not carried).
    #[must_use]
    pub fn alpn(&self) -> String {
        let protocol = match self {
            Self::TlsServer(tls) => tls.get_ref().1.alpn_protocol(),
            Self::Tcp(_) | Self::TlsClient(_) => None,
        };
        protocol
            .and_then(|p| std::str::from_utf8(p).ok())
            .unwrap_or_default()
            .to_owned()
    }
}

impl From<TcpStream> for Conn {
    fn from(tcp: TcpStream) -> Self {
        Self::Tcp(tcp)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::TlsServer(s) => Pin::new(s).poll_read(cx, buf),
            Self::TlsClient(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::TlsServer(s) => Pin::new(s).poll_write(cx, buf),
            Self::TlsClient(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::TlsServer(s) => Pin::new(s).poll_flush(cx),
            Self::TlsClient(s) => Pin::new(s).poll_flush(cx),
        }
    }

    /// For TLS this sends close_notify, then half-closes the TCP socket.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::TlsServer(s) => Pin::new(s).poll_shutdown(cx),
            Self::TlsClient(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
