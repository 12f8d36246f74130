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
            } => decode_plain(buf, plain, sealed),
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
                make_room(buf, plain, sealed);
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

/// A TLS link connection taken off tokio, for a thread that drives its socket itself (an
/// io_uring worker): the socket, and the record layer's two directions with what was already
/// received.
#[derive(Debug)]
pub struct Detached {
    pub fd: std::os::fd::OwnedFd,
    pub reader: Reader,
    pub writer: Writer,
}

/// Takes a link connection off tokio; hands it back when it has no record layer (a plain
/// byte stream stays where it is).
///
/// # Errors
/// The two directions again, when they cannot be detached.
pub fn detach(inbound: Inbound, outbound: Outbound) -> Result<Detached, (Inbound, Outbound)> {
    match (inbound.0, outbound.0) {
        (
            In::Tls {
                tcp: read,
                opener,
                buf,
                plain,
                sealed,
                closed,
            },
            Out::Tls {
                tcp: write, sealer, ..
            },
        ) => {
            let fd = read
                .reunite(write)
                .map_err(io::Error::other)
                .and_then(TcpStream::into_std)
                .map(std::os::fd::OwnedFd::from);
            let fd = match fd {
                Ok(fd) => fd,
                // The halves came from one stream; into_std fails only if tokio's reactor is
                // gone, and then the link cannot run anywhere: let tokio's side report it.
                Err(e) => {
                    tracing::warn!(error = %e, "link connection could not leave tokio");
                    return Err((
                        Inbound(In::Plain {
                            io: Box::new(tokio::io::empty()),
                            buf: BytesMut::new(),
                        }),
                        Outbound(Out::Plain(Box::new(tokio::io::sink()))),
                    ));
                }
            };
            Ok(Detached {
                fd,
                reader: Reader {
                    opener,
                    buf,
                    plain,
                    sealed,
                    closed,
                },
                writer: Writer { sealer },
            })
        }
        (inbound, outbound) => Err((Inbound(inbound), Outbound(outbound))),
    }
}

/// The receiving direction of a detached link connection: records received into
/// [`Reader::space`] are opened in place by [`Reader::filled`], and frames are decoded from
/// the plaintext at the buffer's front, as [`Inbound`] does.
#[derive(Debug)]
pub struct Reader {
    opener: Box<Opener>,
    buf: BytesMut,
    plain: usize,
    sealed: usize,
    closed: bool,
}

impl Reader {
    /// Where the next receive may write: room for at least [`READ_LOW`] bytes behind what
    /// the buffer holds, up to [`READ_SIZE`] and more. The memory stays valid and unmoved
    /// until [`Reader::filled`] or [`Reader::frame`] is called.
    pub fn space(&mut self) -> (*mut u8, usize) {
        make_room(&mut self.buf, &mut self.plain, &mut self.sealed);
        let spare = self.buf.spare_capacity_mut();
        (spare.as_mut_ptr().cast(), spare.len())
    }

    /// Takes in `n` bytes the kernel wrote at [`Reader::space`] and opens the whole records
    /// among them. Returns whether the peer has closed (`close_notify`).
    ///
    /// # Errors
    /// When a record is refused.
    ///
    /// # Safety
    /// `n` bytes at the last [`Reader::space`] must have been written (a receive's result).
    pub unsafe fn filled(&mut self, n: usize) -> Result<bool, records::Error> {
        let len = self.buf.len() + n;
        // SAFETY: the caller says the kernel initialised these bytes of the spare capacity.
        unsafe { self.buf.set_len(len) };
        let opened = self.opener.open(&mut self.buf, self.plain, self.sealed)?;
        self.plain = opened.plain;
        self.sealed = opened.sealed;
        self.closed = opened.closed;
        Ok(self.closed)
    }

    /// Whether the peer has closed its side (`close_notify`).
    #[must_use]
    pub const fn closed(&self) -> bool {
        self.closed
    }

    /// The next whole frame received, if there is one; a Data frame's payload shares the
    /// buffer.
    ///
    /// # Errors
    /// When the bytes received are not a valid frame.
    pub fn frame(&mut self) -> Result<Option<Frame>, FrameError> {
        decode_plain(&mut self.buf, &mut self.plain, &mut self.sealed)
    }
}

/// Decodes a frame from the plaintext at the front of a record layer's buffer (`buf[..plain]`
/// plaintext, `buf[plain..sealed]` spent, `buf[sealed..]` records not yet whole).
fn decode_plain(
    buf: &mut BytesMut,
    plain: &mut usize,
    sealed: &mut usize,
) -> Result<Option<Frame>, FrameError> {
    // Splitting the plaintext off and joining the rest back on is O(1), the two halves being
    // adjacent.
    let mut front = buf.split_to(*plain);
    let decoded = frame::decode(&mut front);
    let consumed = *plain - front.len();
    front.unsplit(std::mem::take(buf));
    *buf = front;
    *plain -= consumed;
    *sealed -= consumed;
    decoded
}

/// Makes room for a receive of at least [`READ_LOW`] bytes behind what a record layer's
/// buffer holds; the spent bytes go first, so that they are not carried into a new
/// allocation (at most one partial record moves).
fn make_room(buf: &mut BytesMut, plain: &mut usize, sealed: &mut usize) {
    if buf.capacity() - buf.len() < READ_LOW {
        buf.copy_within(*sealed.., *plain);
        buf.truncate(buf.len() - (*sealed - *plain));
        *sealed = *plain;
        buf.reserve(READ_SIZE);
    }
}

/// The sending direction of a detached link connection.
#[derive(Debug)]
pub struct Writer {
    sealer: Box<Sealer>,
}

impl Writer {
    /// Appends `plaintext` (gathered from its slices) to `out` as sealed records.
    ///
    /// # Errors
    /// When the keys could not be updated or the sequence number ran out.
    pub fn seal(&mut self, plaintext: &[&[u8]], out: &mut Vec<u8>) -> Result<(), records::Error> {
        self.sealer.seal(plaintext, out)
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
