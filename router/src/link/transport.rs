//! A link connection's two directions: frames in and frames out, over TLS records skiff
//! seals and opens itself ([`crate::tls::records`]), or over a plain byte stream (the link's
//! unit tests, which exercise the protocol and not the encryption).

use std::io::{self, IoSlice};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::frame::{self, Frame, FrameError};
use crate::tls::{
    records::{self, Opener, Sealer},
    session::Session,
};

/// Bytes read per receive at most: many records per syscall.
pub const READ_SIZE: usize = 256 * 1024;
/// Room below which the receive buffer grows before the next read.
const READ_LOW: usize = 64 * 1024;

/// Why a receive ended the link.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("link connection read failed")]
    Io(#[from] io::Error),
    #[error("a TLS record was refused")]
    Record(#[from] records::Error),
}

/// Makes the two directions of an established TLS session on `tcp`, opening the whole records
/// that arrived with the handshake (the peer may send nothing more until they are answered).
///
/// # Errors
/// When one of those records is refused.
pub fn tls(tcp: TcpStream, session: Session) -> Result<(Inbound, Outbound), records::Error> {
    let Session {
        sealer,
        mut opener,
        received,
        plain,
        mut closed,
        ..
    } = session;
    let (read, write) = tcp.into_split();
    let mut buf = BytesMut::with_capacity(READ_SIZE.max(received.len()));
    buf.extend_from_slice(&received);
    let (mut plain, mut sealed) = (plain, plain);
    if !closed {
        let opened = opener.open(&mut buf, plain, sealed)?;
        (plain, sealed, closed) = (opened.plain, opened.sealed, opened.closed);
    }
    let inbound = Inbound(In::Tls {
        tcp: read,
        opener: Box::new(opener),
        buf,
        plain,
        sealed,
        closed,
    });
    let outbound = Outbound(Out::Tls {
        tcp: write,
        sealer: Box::new(sealer),
        out: Vec::with_capacity(READ_SIZE),
    });
    Ok((inbound, outbound))
}

/// Makes the two directions of a plain byte stream (no record layer).
pub fn plain<S>(io: S) -> (Inbound, Outbound)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(io);
    (
        Inbound(In::Plain {
            io: Box::new(read),
            buf: BytesMut::with_capacity(READ_SIZE),
        }),
        Outbound(Out::Plain(Box::new(write))),
    )
}

/// The receiving direction of a link connection.
#[derive(Debug)]
pub struct Inbound(In);

enum In {
    Tls {
        tcp: OwnedReadHalf,
        /// Boxed: ring's key schedule is large, and the plain variant is small.
        opener: Box<Opener>,
        /// `buf[..plain]`: plaintext not yet decoded; `buf[plain..sealed]`: spent (headers
        /// and tags of opened records); `buf[sealed..]`: records not yet whole.
        buf: BytesMut,
        plain: usize,
        sealed: usize,
        closed: bool,
    },
    Plain {
        io: Box<dyn AsyncRead + Send + Unpin>,
        buf: BytesMut,
    },
}

impl std::fmt::Debug for In {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tls { plain, sealed, .. } => f
                .debug_struct("Tls")
                .field("plain", plain)
                .field("sealed", sealed)
                .finish_non_exhaustive(),
            Self::Plain { buf, .. } => f
                .debug_struct("Plain")
                .field("buffered", &buf.len())
                .finish(),
        }
    }
}

impl Inbound {
    /// The next whole frame received, if there is one.
    ///
    /// # Errors
    /// When the bytes received are not a valid frame.
    pub fn frame(&mut self) -> Result<Option<Frame>, FrameError> {
        match &mut self.0 {
            In::Plain { buf, .. } => frame::decode(buf),
            In::Tls {
                buf, plain, sealed, ..
            } => {
                // Frames are decoded from the plaintext at the front only; splitting it off
                // and joining the rest back on is O(1), the two halves being adjacent.
                let mut front = buf.split_to(*plain);
                let decoded = frame::decode(&mut front);
                let consumed = *plain - front.len();
                front.unsplit(std::mem::take(buf));
                *buf = front;
                *plain -= consumed;
                *sealed -= consumed;
                decoded
            }
        }
    }

    /// Receives more from the wire; returns how many bytes were read.
    ///
    /// # Errors
    /// [`ReceiveError::Closed`] when the peer closed (after `close_notify` or not); a read
    /// failure; a record the record layer refuses.
    pub async fn receive(&mut self) -> Result<usize, ReceiveError> {
        match &mut self.0 {
            In::Plain { io, buf } => {
                if buf.capacity() - buf.len() < READ_LOW {
                    buf.reserve(READ_SIZE);
                }
                match io.read_buf(buf).await? {
                    0 => Err(ReceiveError::Closed),
                    n => Ok(n),
                }
            }
            In::Tls {
                tcp,
                opener,
                buf,
                plain,
                sealed,
                closed,
            } => {
                if *closed {
                    return Err(ReceiveError::Closed);
                }
                if buf.capacity() - buf.len() < READ_LOW {
                    // Drop the spent bytes first, so that they are not carried into the
                    // next allocation (at most one partial record moves).
                    buf.copy_within(*sealed.., *plain);
                    buf.truncate(buf.len() - (*sealed - *plain));
                    *sealed = *plain;
                    buf.reserve(READ_SIZE);
                }
                let n = tcp.read_buf(buf).await?;
                let opened = opener.open(buf, *plain, *sealed)?;
                *plain = opened.plain;
                *sealed = opened.sealed;
                *closed = opened.closed;
                if n == 0 && !opened.closed {
                    return Err(ReceiveError::Closed);
                }
                Ok(n)
            }
        }
    }
}

/// The sending direction of a link connection.
#[derive(Debug)]
pub struct Outbound(Out);

enum Out {
    Tls {
        tcp: OwnedWriteHalf,
        /// Boxed, as the opener is.
        sealer: Box<Sealer>,
        /// The records of one batch, sent with one write.
        out: Vec<u8>,
    },
    Plain(Box<dyn AsyncWrite + Send + Unpin>),
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tls { .. } => "Tls",
            Self::Plain(_) => "Plain",
        })
    }
}

impl Outbound {
    /// Sends every slice, sealed into records when the connection has a record layer.
    ///
    /// # Errors
    /// When the write fails or the records cannot be sealed.
    pub async fn send(&mut self, slices: &mut [IoSlice<'_>]) -> io::Result<()> {
        match &mut self.0 {
            Out::Plain(io) => {
                super::write_all_vectored(io, slices).await?;
                io.flush().await
            }
            Out::Tls { tcp, sealer, out } => {
                let parts: Vec<&[u8]> = slices.iter().map(|s| &**s).collect();
                sealer.seal(&parts, out).map_err(io::Error::other)?;
                let sent = tcp.write_all(out).await;
                out.clear();
                sent
            }
        }
    }
}
