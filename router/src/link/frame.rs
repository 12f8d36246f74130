//! The inter-router frame codec: what travels inside a `skiff-link/1` TLS connection.
//!
//! Every frame is a 10-byte header and a payload; integers are big-endian:
//!
//! ```text
//! offset 0  type    u8   1 Hello, 2 LinkState, 3 Open, 4 Data, 5 Window, 6 Close, 7 Reset,
//!                        8 Ping, 9 Pong
//! offset 1  flags   u8   0 in version 1
//! offset 2  stream  u32  0 for Hello, LinkState, Ping, Pong; nonzero for the others
//! offset 6  length  u32  payload length, at most MAX_PAYLOAD
//! offset 10 payload
//! ```
//!
//! Strings are a `u16` byte count and that many bytes of UTF-8; lists are a `u16` item count and
//! the items. `docs/protocol.md` describes each payload and how routers use the frames.
//!
//! The decoder treats its input as hostile. It checks the whole header before it waits for a
//! payload, so a peer cannot make a router buffer more than [`MAX_PAYLOAD`] bytes for one frame,
//! and it allocates only in proportion to payload bytes that have arrived. Every error means the
//! peer is broken or hostile; the link must then be closed, as the framing can no longer be
//! trusted. Encoding is canonical: a decoded frame re-encodes to exactly the bytes it came from.
//!
//! The encoder never panics. A frame value that breaks a limit (see [`Frame::validate`]) still
//! encodes, with any count that does not fit its field saturated, into bytes that every
//! conforming decoder rejects rather than misreads.

use std::fmt;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// The ALPN id of router-to-router links in the newest version, [`VERSION`].
pub const ALPN_LINK: &[u8] = b"skiff-link/2";
/// The ALPN id of version 1 links, still spoken: version 1 has no [`Frame::Open`] `alpn`.
pub const ALPN_LINK_V1: &[u8] = b"skiff-link/1";
/// The ALPN id of token redemption, served on the same port as links.
pub const ALPN_GRANT: &[u8] = b"skiff-grant/1";
/// The newest protocol version this codec speaks, carried in `Hello` and in the ALPN suffix.
pub const VERSION: u16 = 2;

/// The protocol version a link ALPN id stands for.
#[must_use]
pub fn link_version(alpn: &[u8]) -> Option<u16> {
    match alpn {
        ALPN_LINK => Some(2),
        ALPN_LINK_V1 => Some(1),
        _ => None,
    }
}
/// The size of a frame header in bytes.
pub const HEADER_LEN: usize = 10;
/// The largest payload any frame may carry, in bytes.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// The largest string field, in bytes of UTF-8.
pub const MAX_STRING: usize = 1024;
/// The largest number of items in a list field.
pub const MAX_LIST: usize = 4096;

// The encoder relies on these: a saturated count or length is always over its limit, so the
// peer rejects it instead of reading a different frame.
const _: () = assert!(MAX_STRING < u16::MAX as usize);
const _: () = assert!(MAX_LIST < u16::MAX as usize);
const _: () = assert!(MAX_PAYLOAD < u32::MAX as usize);

/// Why bytes received from a peer, or a frame about to be sent, are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header declares a payload longer than [`MAX_PAYLOAD`].
    #[error("frame payload of {len} bytes exceeds the {limit}-byte limit")]
    PayloadTooLong { len: usize, limit: usize },
    /// The header's type is not one version 1 defines.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The header's flags are not zero.
    #[error("{frame} frame has nonzero flags {flags:#04x}")]
    NonzeroFlags { frame: &'static str, flags: u8 },
    /// A link-level frame names a stream, or a stream frame names stream 0.
    #[error("{frame} frame may not use stream {stream}")]
    BadStream { frame: &'static str, stream: u32 },
    /// The payload ends before one of its fields does.
    #[error("{frame} frame payload ends inside its {field}")]
    Truncated {
        frame: &'static str,
        field: &'static str,
    },
    /// The payload has bytes after its last field.
    #[error("{frame} frame payload has {extra} bytes after its last field")]
    TrailingBytes { frame: &'static str, extra: usize },
    /// A string field is longer than [`MAX_STRING`].
    #[error("{field} of {len} bytes exceeds the {limit}-byte string limit")]
    StringTooLong {
        field: &'static str,
        len: usize,
        limit: usize,
    },
    /// A string field is not UTF-8.
    #[error("{field} is not valid utf-8")]
    InvalidUtf8 {
        field: &'static str,
        #[source]
        source: std::str::Utf8Error,
    },
    /// A list field has more than [`MAX_LIST`] items.
    #[error("{field} of {count} items exceeds the {limit}-item limit")]
    ListTooLong {
        field: &'static str,
        count: usize,
        limit: usize,
    },
    /// A field holds a value the protocol forbids: a zero window increment, an unknown reset
    /// code, or an empty data payload.
    #[error("invalid {field} {value}")]
    BadValue { field: &'static str, value: u64 },
}

/// One router's link-state advertisement: its links and the routing keys it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    /// The advertising router's site name.
    pub origin: String,
    /// Grows with every new advertisement from `origin`; receivers keep only the highest.
    pub seq: u64,
    /// The router's live links: neighbor site name and the cost of reaching it.
    pub links: Vec<(String, u32)>,
    /// The routing keys this router has connectors for.
    pub keys: Vec<String>,
}

/// Why a stream was reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ResetCode {
    /// No reachable router serves the routing key.
    NoRoute = 1,
    /// The connector's backend refused or failed the connection.
    Refused = 2,
    /// A link the stream crossed went down.
    LinkLost = 3,
    /// Policy forbids the stream.
    Policy = 4,
    /// The router failed for a reason of its own.
    Internal = 5,
    /// The endpoint that opened or accepted the stream gave up on it.
    Cancelled = 6,
}

impl From<ResetCode> for u32 {
    fn from(code: ResetCode) -> u32 {
        code as u32
    }
}

impl TryFrom<u32> for ResetCode {
    type Error = FrameError;

    fn try_from(code: u32) -> Result<Self, FrameError> {
        Ok(match code {
            1 => Self::NoRoute,
            2 => Self::Refused,
            3 => Self::LinkLost,
            4 => Self::Policy,
            5 => Self::Internal,
            6 => Self::Cancelled,
            _ => {
                return Err(FrameError::BadValue {
                    field: "reset code",
                    value: code.into(),
                });
            }
        })
    }
}

impl fmt::Display for ResetCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoRoute => "no route",
            Self::Refused => "refused",
            Self::LinkLost => "link lost",
            Self::Policy => "policy",
            Self::Internal => "internal",
            Self::Cancelled => "cancelled",
        })
    }
}

/// One inter-router frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The first frame each side sends on a link: protocol version and site name.
    Hello { version: u16, site: String },
    /// A flooded link-state advertisement.
    LinkState(LinkState),
    /// Opens a stream for `routing_key`, entering the network at router `origin`, to be served
    /// by router `dest`; `window` is the credit, in bytes, granted to the receiver of the Open.
    /// `alpn` is the application protocol the client agreed with a TLS listener, for the
    /// connector to ask its TLS backend for; empty for none. A non-empty `alpn` travels as an
    /// OpenAlpn frame (type 10, version 2 only).
    Open {
        stream: u32,
        routing_key: String,
        origin: String,
        dest: String,
        window: u32,
        alpn: String,
    },
    /// Stream bytes; never empty.
    Data { stream: u32, data: Bytes },
    /// Grants the receiver `increment` more bytes of credit on the stream.
    Window { stream: u32, increment: u32 },
    /// Half-closes the stream: the sender sends no more Data on it.
    Close { stream: u32 },
    /// Aborts the stream in both directions.
    Reset {
        stream: u32,
        code: ResetCode,
        reason: String,
    },
    /// Asks the peer for a Pong with the same nonce.
    Ping { nonce: u64 },
    /// Answers a Ping.
    Pong { nonce: u64 },
}

/// The frame types, as numbered on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hello = 1,
    LinkState = 2,
    Open = 3,
    Data = 4,
    Window = 5,
    Close = 6,
    Reset = 7,
    Ping = 8,
    Pong = 9,
    OpenAlpn = 10,
}

impl Kind {
    fn from_wire(ty: u8) -> Option<Self> {
        Some(match ty {
            1 => Self::Hello,
            2 => Self::LinkState,
            3 => Self::Open,
            4 => Self::Data,
            5 => Self::Window,
            6 => Self::Close,
            7 => Self::Reset,
            8 => Self::Ping,
            9 => Self::Pong,
            10 => Self::OpenAlpn,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::LinkState => "link-state",
            Self::Open => "open",
            Self::Data => "data",
            Self::Window => "window",
            Self::Close => "close",
            Self::Reset => "reset",
            Self::Ping => "ping",
            Self::Pong => "pong",
            Self::OpenAlpn => "open-alpn",
        }
    }

    fn on_stream(self) -> bool {
        matches!(
            self,
            Self::Open | Self::OpenAlpn | Self::Data | Self::Window | Self::Close | Self::Reset
        )
    }

    fn check_stream(self, stream: u32) -> Result<(), FrameError> {
        if self.on_stream() == (stream != 0) {
            Ok(())
        } else {
            Err(FrameError::BadStream {
                frame: self.name(),
                stream,
            })
        }
    }
}

impl Frame {
    /// Encodes the frame as [`Frame::encode`] does, except that a `Data` frame's payload is
    /// not copied after its header but handed back, to be written right after `dst`'s new
    /// bytes: the link writer passes it to rustls as a slice of its own.
    pub fn encode_head(self, dst: &mut BytesMut) -> Option<Bytes> {
        match self {
            Self::Data { stream, data } => {
                dst.reserve(HEADER_LEN);
                put_header(dst, Kind::Data, stream, data.len());
                Some(data)
            }
            other => {
                other.encode(dst);
                None
            }
        }
    }

    /// Appends the encoded frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let len = self.payload_len();
        dst.reserve(HEADER_LEN.saturating_add(len));
        put_header(dst, self.kind(), self.stream(), len);
        match self {
            Self::Hello { version, site } => {
                dst.put_u16(*version);
                put_string(dst, site);
            }
            Self::LinkState(ls) => {
                put_string(dst, &ls.origin);
                dst.put_u64(ls.seq);
                put_count(dst, ls.links.len());
                for (name, cost) in &ls.links {
                    put_string(dst, name);
                    dst.put_u32(*cost);
                }
                put_count(dst, ls.keys.len());
                for key in &ls.keys {
                    put_string(dst, key);
                }
            }
            Self::Open {
                routing_key,
                origin,
                dest,
                window,
                alpn,
                ..
            } => {
                put_string(dst, routing_key);
                put_string(dst, origin);
                put_string(dst, dest);
                dst.put_u32(*window);
                if !alpn.is_empty() {
                    put_string(dst, alpn);
                }
            }
            Self::Data { data, .. } => dst.put_slice(data),
            Self::Window { increment, .. } => dst.put_u32(*increment),
            Self::Close { .. } => {}
            Self::Reset { code, reason, .. } => {
                dst.put_u32((*code).into());
                put_string(dst, reason);
            }
            Self::Ping { nonce } | Self::Pong { nonce } => dst.put_u64(*nonce),
        }
    }

    /// The encoded size in bytes (header + payload).
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN.saturating_add(self.payload_len())
    }

    /// The frame's stream id; 0 for link-level frames.
    #[must_use]
    pub fn stream(&self) -> u32 {
        match self {
            Self::Open { stream, .. }
            | Self::Data { stream, .. }
            | Self::Window { stream, .. }
            | Self::Close { stream }
            | Self::Reset { stream, .. } => *stream,
            Self::Hello { .. } | Self::LinkState(_) | Self::Ping { .. } | Self::Pong { .. } => 0,
        }
    }

    /// Checks the frame against the limits the decoder enforces, so a router can refuse to
    /// send (or to build from its configuration) a frame its peer would reject.
    ///
    /// # Errors
    /// The error the peer's decoder would report, with the true rather than a saturated length.
    pub fn validate(&self) -> Result<(), FrameError> {
        let kind = self.kind();
        kind.check_stream(self.stream())?;
        let len = self.payload_len();
        if len > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLong {
                len,
                limit: MAX_PAYLOAD,
            });
        }
        match self {
            Self::Hello { site, .. } => check_string("site", site),
            Self::LinkState(ls) => {
                check_string("origin", &ls.origin)?;
                check_count("link list", ls.links.len())?;
                for (name, _) in &ls.links {
                    check_string("link name", name)?;
                }
                check_count("key list", ls.keys.len())?;
                ls.keys.iter().try_for_each(|key| check_string("key", key))
            }
            Self::Open {
                routing_key,
                origin,
                dest,
                alpn,
                ..
            } => {
                check_string("routing key", routing_key)?;
                check_string("origin", origin)?;
                check_string("dest", dest)?;
                check_string("alpn", alpn)
            }
            Self::Data { data, .. } => check_data(data),
            Self::Window { increment, .. } => check_increment(*increment),
            Self::Reset { reason, .. } => check_string("reason", reason),
            Self::Close { .. } | Self::Ping { .. } | Self::Pong { .. } => Ok(()),
        }
    }

    fn kind(&self) -> Kind {
        match self {
            Self::Hello { .. } => Kind::Hello,
            Self::LinkState(_) => Kind::LinkState,
            Self::Open { alpn, .. } if alpn.is_empty() => Kind::Open,
            Self::Open { .. } => Kind::OpenAlpn,
            Self::Data { .. } => Kind::Data,
            Self::Window { .. } => Kind::Window,
            Self::Close { .. } => Kind::Close,
            Self::Reset { .. } => Kind::Reset,
            Self::Ping { .. } => Kind::Ping,
            Self::Pong { .. } => Kind::Pong,
        }
    }

    fn payload_len(&self) -> usize {
        let string = |s: &str| 2 + s.len();
        match self {
            Self::Hello { site, .. } => 2 + string(site),
            Self::LinkState(ls) => {
                let links: usize = ls.links.iter().map(|(name, _)| string(name) + 4).sum();
                let keys: usize = ls.keys.iter().map(|key| string(key)).sum();
                string(&ls.origin) + 8 + 2 + links + 2 + keys
            }
            Self::Open {
                routing_key,
                origin,
                dest,
                alpn,
                ..
            } => {
                let alpn = if alpn.is_empty() { 0 } else { string(alpn) };
                string(routing_key) + string(origin) + string(dest) + 4 + alpn
            }
            Self::Data { data, .. } => data.len(),
            Self::Window { .. } => 4,
            Self::Close { .. } => 0,
            Self::Reset { reason, .. } => 4 + string(reason),
            Self::Ping { .. } | Self::Pong { .. } => 8,
        }
    }
}

/// Encodes only the header of a Data frame with `len` payload bytes, so a caller can write the
/// payload from its own buffer without copying.
///
/// The caller keeps `stream` nonzero and `len` within `1..=MAX_PAYLOAD`; otherwise the peer
/// rejects the frame.
pub fn encode_data_header(stream: u32, len: usize, dst: &mut BytesMut) {
    dst.reserve(HEADER_LEN);
    put_header(dst, Kind::Data, stream, len);
}

/// Decodes one frame from the front of `src`, consuming it; `Ok(None)` if `src` holds only part
/// of a frame (nothing consumed).
///
/// A Data frame's bytes are split out of `src` without copying. The header is checked as soon
/// as it is complete, so a bad header fails without waiting for its payload.
///
/// # Errors
/// When the bytes are not a valid frame. A bad header consumes nothing; a bad payload consumes
/// its frame. Either way the link must be closed.
pub fn decode(src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    let Some(&header) = src.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let [ty, flags, s0, s1, s2, s3, l0, l1, l2, l3] = header;
    let kind = Kind::from_wire(ty).ok_or(FrameError::UnknownType(ty))?;
    if flags != 0 {
        return Err(FrameError::NonzeroFlags {
            frame: kind.name(),
            flags,
        });
    }
    let stream = u32::from_be_bytes([s0, s1, s2, s3]);
    kind.check_stream(stream)?;
    let len = usize::try_from(u32::from_be_bytes([l0, l1, l2, l3])).unwrap_or(usize::MAX);
    if len > MAX_PAYLOAD {
        return Err(FrameError::PayloadTooLong {
            len,
            limit: MAX_PAYLOAD,
        });
    }
    // Cannot overflow: len is at most MAX_PAYLOAD.
    if src.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let mut frame = src.split_to(HEADER_LEN + len);
    frame.advance(HEADER_LEN);
    decode_payload(kind, stream, &frame.freeze()).map(Some)
}

fn decode_payload(kind: Kind, stream: u32, payload: &Bytes) -> Result<Frame, FrameError> {
    let mut r = Reader {
        buf: payload,
        frame: kind.name(),
    };
    let frame = match kind {
        Kind::Hello => {
            let version = r.u16("version")?;
            let site = r.string("site")?;
            Frame::Hello { version, site }
        }
        Kind::LinkState => {
            let origin = r.string("origin")?;
            let seq = r.u64("sequence number")?;
            // Smallest item: empty name + cost.
            let count = r.count("link list", 2 + 4)?;
            let mut links = Vec::with_capacity(count);
            for _ in 0..count {
                let name = r.string("link name")?;
                let cost = r.u32("link cost")?;
                links.push((name, cost));
            }
            // Smallest item: empty key.
            let count = r.count("key list", 2)?;
            let mut keys = Vec::with_capacity(count);
            for _ in 0..count {
                keys.push(r.string("key")?);
            }
            Frame::LinkState(LinkState {
                origin,
                seq,
                links,
                keys,
            })
        }
        Kind::Open | Kind::OpenAlpn => {
            let routing_key = r.string("routing key")?;
            let origin = r.string("origin")?;
            let dest = r.string("dest")?;
            let window = r.u32("window")?;
            let alpn = if kind == Kind::OpenAlpn {
                let alpn = r.string("alpn")?;
                // An empty one travels as a plain Open: one encoding per frame.
                if alpn.is_empty() {
                    return Err(FrameError::BadValue {
                        field: "alpn length",
                        value: 0,
                    });
                }
                alpn
            } else {
                String::new()
            };
            Frame::Open {
                stream,
                routing_key,
                origin,
                dest,
                window,
                alpn,
            }
        }
        Kind::Data => {
            check_data(payload)?;
            // The payload is the data: hand out the shared buffer instead of copying it.
            return Ok(Frame::Data {
                stream,
                data: payload.clone(),
            });
        }
        Kind::Window => {
            let increment = r.u32("increment")?;
            check_increment(increment)?;
            Frame::Window { stream, increment }
        }
        Kind::Close => Frame::Close { stream },
        Kind::Reset => {
            let code = ResetCode::try_from(r.u32("reset code")?)?;
            let reason = r.string("reason")?;
            Frame::Reset {
                stream,
                code,
                reason,
            }
        }
        Kind::Ping => Frame::Ping {
            nonce: r.u64("nonce")?,
        },
        Kind::Pong => Frame::Pong {
            nonce: r.u64("nonce")?,
        },
    };
    r.finish()?;
    Ok(frame)
}

/// A cursor over one payload that turns every shortfall into a [`FrameError`].
struct Reader<'a> {
    buf: &'a [u8],
    frame: &'static str,
}

impl<'a> Reader<'a> {
    fn truncated(&self, field: &'static str) -> FrameError {
        FrameError::Truncated {
            frame: self.frame,
            field,
        }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FrameError> {
        let (head, tail) = self
            .buf
            .split_at_checked(n)
            .ok_or_else(|| self.truncated(field))?;
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FrameError> {
        let (head, tail) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or_else(|| self.truncated(field))?;
        self.buf = tail;
        Ok(*head)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        self.array(field).map(u64::from_be_bytes)
    }

    fn string(&mut self, field: &'static str) -> Result<String, FrameError> {
        let len = usize::from(self.u16(field)?);
        if len > MAX_STRING {
            return Err(FrameError::StringTooLong {
                field,
                len,
                limit: MAX_STRING,
            });
        }
        let bytes = self.take(len, field)?;
        let s = std::str::from_utf8(bytes)
            .map_err(|source| FrameError::InvalidUtf8 { field, source })?;
        Ok(s.to_owned())
    }

    /// Reads a list count, and fails early if the rest of the payload cannot hold that many
    /// items, so the caller may reserve capacity for them without trusting the peer.
    fn count(&mut self, field: &'static str, min_item: usize) -> Result<usize, FrameError> {
        let count = usize::from(self.u16(field)?);
        check_count(field, count)?;
        if count * min_item > self.buf.len() {
            return Err(self.truncated(field));
        }
        Ok(count)
    }

    fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::TrailingBytes {
                frame: self.frame,
                extra: self.buf.len(),
            })
        }
    }
}

fn check_string(field: &'static str, s: &str) -> Result<(), FrameError> {
    if s.len() > MAX_STRING {
        return Err(FrameError::StringTooLong {
            field,
            len: s.len(),
            limit: MAX_STRING,
        });
    }
    Ok(())
}

fn check_count(field: &'static str, count: usize) -> Result<(), FrameError> {
    if count > MAX_LIST {
        return Err(FrameError::ListTooLong {
            field,
            count,
            limit: MAX_LIST,
        });
    }
    Ok(())
}

fn check_increment(increment: u32) -> Result<(), FrameError> {
    if increment == 0 {
        // A zero grant changes nothing; a peer sending one is looping or broken.
        return Err(FrameError::BadValue {
            field: "window increment",
            value: 0,
        });
    }
    Ok(())
}

fn check_data(data: &[u8]) -> Result<(), FrameError> {
    if data.is_empty() {
        // Close ends a stream; an empty Data frame would only cost the receiver work.
        return Err(FrameError::BadValue {
            field: "data length",
            value: 0,
        });
    }
    Ok(())
}

fn put_header(dst: &mut BytesMut, kind: Kind, stream: u32, len: usize) {
    dst.put_u8(kind as u8);
    dst.put_u8(0);
    dst.put_u32(stream);
    dst.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

fn put_string(dst: &mut BytesMut, s: &str) {
    put_count(dst, s.len());
    dst.put_slice(s.as_bytes());
}

fn put_count(dst: &mut BytesMut, n: usize) {
    dst.put_u16(u16::try_from(n).unwrap_or(u16::MAX));
}

#[cfg(test)]
mod tests {
    use proptest::{collection::vec, prelude::*, sample::Index};

    use super::*;

    fn encoded(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        buf
    }

    /// A header and `payload`, with the length taken from `payload`.
    fn raw(ty: u8, stream: u32, payload: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u8(ty);
        buf.put_u8(0);
        buf.put_u32(stream);
        buf.put_u32(u32::try_from(payload.len()).expect("test payloads are small"));
        buf.put_slice(payload);
        buf
    }

    fn string_field(s: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(s.len())
            .expect("short")
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(s);
        out
    }

    /// Decodes `bytes` as one frame and checks that it is rejected with nothing left to wait for.
    fn rejected(mut bytes: BytesMut) -> FrameError {
        match decode(&mut bytes) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: VERSION,
                site: "west".into(),
            },
            Frame::Hello {
                version: u16::MAX,
                site: String::new(),
            },
            Frame::LinkState(LinkState {
                origin: "west".into(),
                seq: u64::MAX,
                links: vec![("east".into(), 1), ("nörth".into(), u32::MAX)],
                keys: vec!["db".into(), String::new(), "web".into()],
            }),
            Frame::LinkState(LinkState {
                origin: String::new(),
                seq: 0,
                links: vec![],
                keys: vec![],
            }),
            Frame::Open {
                stream: 1,
                routing_key: "db".into(),
                origin: "west".into(),
                dest: "east".into(),
                window: 256 * 1024,
                alpn: String::new(),
            },
            Frame::Open {
                stream: u32::MAX,
                routing_key: String::new(),
                origin: String::new(),
                dest: String::new(),
                window: 0,
                alpn: String::new(),
            },
            Frame::Open {
                stream: 5,
                routing_key: "grpc".into(),
                origin: "west".into(),
                dest: "east".into(),
                window: 1,
                alpn: "h2".into(),
            },
            Frame::Data {
                stream: 2,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream: 3,
                data: Bytes::from_static(&[0]),
            },
            Frame::Window {
                stream: 4,
                increment: 1,
            },
            Frame::Window {
                stream: 5,
                increment: u32::MAX,
            },
            Frame::Close { stream: 6 },
            Frame::Reset {
                stream: 7,
                code: ResetCode::NoRoute,
                reason: "no router serves routing key db".into(),
            },
            Frame::Reset {
                stream: 8,
                code: ResetCode::Cancelled,
                reason: String::new(),
            },
            Frame::Ping { nonce: 0 },
            Frame::Pong { nonce: u64::MAX },
        ]
    }

    #[test]
    fn a_frame_encoded_as_head_and_payload_is_the_same_bytes() {
        for frame in samples() {
            let mut head = BytesMut::new();
            let payload = frame.clone().encode_head(&mut head);
            head.extend_from_slice(payload.as_deref().unwrap_or_default());
            assert_eq!(head, encoded(&frame), "{frame:?}");
        }
    }

    #[test]
    fn every_variant_round_trips() {
        for frame in samples() {
            let mut buf = encoded(&frame);
            assert_eq!(buf.len(), frame.encoded_len(), "{frame:?}");
            assert_eq!(frame.validate(), Ok(()));
            assert_eq!(decode(&mut buf), Ok(Some(frame)));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn every_reset_code_round_trips() {
        for code in [
            ResetCode::NoRoute,
            ResetCode::Refused,
            ResetCode::LinkLost,
            ResetCode::Policy,
            ResetCode::Internal,
            ResetCode::Cancelled,
        ] {
            let frame = Frame::Reset {
                stream: 1,
                code,
                reason: code.to_string(),
            };
            assert_eq!(decode(&mut encoded(&frame)), Ok(Some(frame)));
            assert_eq!(ResetCode::try_from(u32::from(code)), Ok(code));
        }
    }

    #[test]
    fn fields_at_their_limits_round_trip() {
        // Two-byte characters, so the limit is counted in bytes, not characters.
        let long = "é".repeat(MAX_STRING / 2);
        assert_eq!(long.len(), MAX_STRING);
        let frames = [
            Frame::Hello {
                version: 1,
                site: long.clone(),
            },
            Frame::LinkState(LinkState {
                origin: long.clone(),
                seq: 1,
                links: (0..MAX_LIST).map(|i| (i.to_string(), 1)).collect(),
                keys: (0..MAX_LIST).map(|i| i.to_string()).collect(),
            }),
            Frame::Data {
                stream: 1,
                data: Bytes::from(vec![7; MAX_PAYLOAD]),
            },
        ];
        for frame in frames {
            assert_eq!(frame.validate(), Ok(()));
            assert_eq!(decode(&mut encoded(&frame)), Ok(Some(frame)));
        }
    }

    #[test]
    fn encoding_matches_the_documented_layout() {
        let open = Frame::Open {
            stream: 3,
            routing_key: "db".into(),
            origin: "west".into(),
            dest: "ea".into(),
            window: 0x0004_0000,
            alpn: String::new(),
        };
        let expected: &[u8] = &[
            3, 0, 0, 0, 0, 3, 0, 0, 0, 18, // header: type, flags, stream, length
            0, 2, b'd', b'b', // routing key
            0, 4, b'w', b'e', b's', b't', // origin
            0, 2, b'e', b'a', // dest
            0, 4, 0, 0, // window
        ];
        assert_eq!(&encoded(&open)[..], expected);

        let reset = Frame::Reset {
            stream: 0x0102_0304,
            code: ResetCode::Policy,
            reason: "no".into(),
        };
        let expected: &[u8] = &[7, 0, 1, 2, 3, 4, 0, 0, 0, 8, 0, 0, 0, 4, 0, 2, b'n', b'o'];
        assert_eq!(&encoded(&reset)[..], expected);

        let hello = Frame::Hello {
            version: 1,
            site: "a".into(),
        };
        let expected: &[u8] = &[1, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 1, 0, 1, b'a'];
        assert_eq!(&encoded(&hello)[..], expected);
    }

    #[test]
    fn back_to_back_frames_decode_in_order() {
        let frames = samples();
        let mut buf = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut buf);
        }
        for frame in frames {
            assert_eq!(decode(&mut buf), Ok(Some(frame)));
        }
        assert_eq!(decode(&mut buf), Ok(None));
    }

    #[test]
    fn partial_input_consumes_nothing() {
        for frame in samples() {
            let full = encoded(&frame);
            for cut in 0..full.len() {
                let mut src = BytesMut::from(&full[..cut]);
                assert_eq!(decode(&mut src), Ok(None), "{frame:?} cut at {cut}");
                assert_eq!(&src[..], &full[..cut], "{frame:?} cut at {cut}");
                src.extend_from_slice(&full[cut..]);
                assert_eq!(decode(&mut src), Ok(Some(frame.clone())));
                assert!(src.is_empty());
            }
        }
    }

    #[test]
    fn oversized_length_is_rejected_from_the_header_alone() {
        let mut src = BytesMut::new();
        encode_data_header(1, MAX_PAYLOAD + 1, &mut src);
        assert_eq!(src.len(), HEADER_LEN);
        assert_eq!(
            decode(&mut src),
            Err(FrameError::PayloadTooLong {
                len: MAX_PAYLOAD + 1,
                limit: MAX_PAYLOAD
            })
        );
        assert_eq!(src.len(), HEADER_LEN, "a header error consumes nothing");
        assert_eq!(
            FrameError::PayloadTooLong {
                len: 2_000_000,
                limit: MAX_PAYLOAD
            }
            .to_string(),
            "frame payload of 2000000 bytes exceeds the 1048576-byte limit"
        );
    }

    #[test]
    fn largest_payload_is_awaited_without_reserving_for_it() {
        let mut src = BytesMut::new();
        encode_data_header(1, MAX_PAYLOAD, &mut src);
        let capacity = src.capacity();
        assert_eq!(decode(&mut src), Ok(None));
        assert_eq!(src.capacity(), capacity);
    }

    #[test]
    fn open_alpn_with_an_empty_protocol_is_rejected() {
        // routing key "k", origin "o", dest "d", window 1, alpn "": canonically a plain Open.
        let payload = [0, 1, b'k', 0, 1, b'o', 0, 1, b'd', 0, 0, 0, 1, 0, 0];
        assert_eq!(
            rejected(raw(10, 1, &payload)),
            FrameError::BadValue {
                field: "alpn length",
                value: 0
            }
        );
        let mut plain = raw(3, 1, &payload[..13]);
        assert!(matches!(
            decode(&mut plain),
            Ok(Some(Frame::Open { alpn, .. })) if alpn.is_empty()
        ));
    }

    #[test]
    fn unknown_types_are_rejected() {
        for ty in [0, 11, 255] {
            assert_eq!(rejected(raw(ty, 0, &[])), FrameError::UnknownType(ty));
        }
    }

    #[test]
    fn nonzero_flags_are_rejected() {
        for flags in [0x01, 0x80] {
            let mut buf = encoded(&Frame::Ping { nonce: 1 });
            buf[1] = flags;
            assert_eq!(
                rejected(buf),
                FrameError::NonzeroFlags {
                    frame: "ping",
                    flags
                }
            );
        }
    }

    #[test]
    fn link_frames_on_a_stream_are_rejected() {
        for frame in samples().into_iter().filter(|f| f.stream() == 0) {
            let mut buf = encoded(&frame);
            buf[2..6].copy_from_slice(&5u32.to_be_bytes());
            assert!(
                matches!(rejected(buf), FrameError::BadStream { stream: 5, .. }),
                "{frame:?}"
            );
        }
    }

    #[test]
    fn stream_frames_on_stream_zero_are_rejected() {
        let mut checked = 0;
        for frame in samples().into_iter().filter(|f| f.stream() != 0) {
            let mut buf = encoded(&frame);
            buf[2..6].copy_from_slice(&0u32.to_be_bytes());
            assert!(
                matches!(rejected(buf), FrameError::BadStream { stream: 0, .. }),
                "{frame:?}"
            );
            checked += 1;
        }
        assert_eq!(checked, 10);
        let open_on_zero = Frame::Open {
            stream: 0,
            routing_key: "db".into(),
            origin: "west".into(),
            dest: "east".into(),
            window: 1,
            alpn: String::new(),
        };
        assert_eq!(
            open_on_zero.validate(),
            Err(FrameError::BadStream {
                frame: "open",
                stream: 0
            })
        );
    }

    #[test]
    fn short_payloads_are_truncated() {
        let cases = [
            (raw(5, 1, &[0, 0, 1]), "window", "increment"),
            (raw(1, 0, &[0]), "hello", "version"),
            (raw(8, 0, &[0; 7]), "ping", "nonce"),
            // The routing key claims 10 bytes and has 3.
            (raw(3, 1, &[0, 10, b'a', b'b', b'c']), "open", "routing key"),
            (raw(7, 1, &[0, 0, 0, 1]), "reset", "reason"),
        ];
        for (buf, frame, field) in cases {
            assert_eq!(rejected(buf), FrameError::Truncated { frame, field });
        }
    }

    #[test]
    fn list_counts_beyond_the_payload_are_rejected_before_reading_items() {
        let mut payload = string_field(b"west");
        payload.extend_from_slice(&1u64.to_be_bytes());
        // Claims 3 links and carries one.
        payload.extend_from_slice(&3u16.to_be_bytes());
        payload.extend_from_slice(&string_field(b"east"));
        payload.extend_from_slice(&1u32.to_be_bytes());
        payload.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(
            rejected(raw(2, 0, &payload)),
            FrameError::Truncated {
                frame: "link-state",
                field: "link list"
            }
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let cases = [
            (raw(8, 0, &[0; 9]), "ping"),
            (raw(6, 1, &[0]), "close"),
            (raw(5, 1, &[0, 0, 0, 1, 0, 0]), "window"),
        ];
        for (buf, frame) in cases {
            assert!(
                matches!(rejected(buf), FrameError::TrailingBytes { frame: f, .. } if f == frame),
                "{frame}"
            );
        }
        let mut hello = encoded(&Frame::Hello {
            version: 1,
            site: "west".into(),
        })
        .to_vec();
        hello.push(b'!');
        let mut buf = raw(1, 0, &hello[HEADER_LEN..]);
        assert_eq!(
            decode(&mut buf),
            Err(FrameError::TrailingBytes {
                frame: "hello",
                extra: 1
            })
        );
    }

    #[test]
    fn long_strings_are_rejected() {
        let mut payload = VERSION.to_be_bytes().to_vec();
        payload.extend_from_slice(&string_field(&[b'a'; MAX_STRING + 1]));
        assert_eq!(
            rejected(raw(1, 0, &payload)),
            FrameError::StringTooLong {
                field: "site",
                len: MAX_STRING + 1,
                limit: MAX_STRING
            }
        );
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        let mut payload = VERSION.to_be_bytes().to_vec();
        payload.extend_from_slice(&string_field(&[b'a', 0xff]));
        let err = rejected(raw(1, 0, &payload));
        assert!(
            matches!(err, FrameError::InvalidUtf8 { field: "site", .. }),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "site is not valid utf-8");
    }

    #[test]
    fn long_lists_are_rejected() {
        // Every item is present and valid, so only the count check can fail.
        let items = |n: usize, item: &[u8]| {
            let mut out = u16::try_from(n).expect("short").to_be_bytes().to_vec();
            for _ in 0..n {
                out.extend_from_slice(item);
            }
            out
        };
        let mut link = string_field(b"x");
        link.extend_from_slice(&1u32.to_be_bytes());
        let key = string_field(b"k");
        let mut prefix = string_field(b"west");
        prefix.extend_from_slice(&1u64.to_be_bytes());

        let mut too_many_links = prefix.clone();
        too_many_links.extend(items(MAX_LIST + 1, &link));
        too_many_links.extend(items(0, &key));
        assert_eq!(
            rejected(raw(2, 0, &too_many_links)),
            FrameError::ListTooLong {
                field: "link list",
                count: MAX_LIST + 1,
                limit: MAX_LIST
            }
        );

        let mut too_many_keys = prefix;
        too_many_keys.extend(items(0, &link));
        too_many_keys.extend(items(MAX_LIST + 1, &key));
        assert_eq!(
            rejected(raw(2, 0, &too_many_keys)),
            FrameError::ListTooLong {
                field: "key list",
                count: MAX_LIST + 1,
                limit: MAX_LIST
            }
        );
    }

    #[test]
    fn zero_window_increment_is_rejected() {
        assert_eq!(
            rejected(raw(5, 1, &[0, 0, 0, 0])),
            FrameError::BadValue {
                field: "window increment",
                value: 0
            }
        );
    }

    #[test]
    fn unknown_reset_codes_are_rejected() {
        for code in [0, 7, u32::MAX] {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(&string_field(b""));
            assert_eq!(
                rejected(raw(7, 1, &payload)),
                FrameError::BadValue {
                    field: "reset code",
                    value: code.into()
                }
            );
        }
    }

    #[test]
    fn empty_data_is_rejected() {
        let err = rejected(raw(4, 1, &[]));
        assert_eq!(
            err,
            FrameError::BadValue {
                field: "data length",
                value: 0
            }
        );
        assert_eq!(err.to_string(), "invalid data length 0");
    }

    #[test]
    fn header_errors_consume_nothing_and_payload_errors_consume_their_frame() {
        let mut src = raw(5, 1, &[0, 0, 0, 0]);
        src.extend_from_slice(&encoded(&Frame::Ping { nonce: 9 }));
        assert!(decode(&mut src).is_err());
        assert_eq!(decode(&mut src), Ok(Some(Frame::Ping { nonce: 9 })));

        let mut src = raw(0, 0, &[1, 2, 3]);
        let before = src.clone();
        assert!(decode(&mut src).is_err());
        assert_eq!(src, before);
    }

    #[test]
    fn data_header_matches_the_data_frame_encoding() {
        let frame = Frame::Data {
            stream: 77,
            data: Bytes::from_static(b"payload"),
        };
        let mut buf = BytesMut::new();
        encode_data_header(77, 7, &mut buf);
        buf.put_slice(b"payload");
        assert_eq!(buf, encoded(&frame));
    }

    #[test]
    fn data_is_split_out_without_copying() {
        let mut src = encoded(&Frame::Data {
            stream: 1,
            data: Bytes::from_static(b"abcdef"),
        });
        let start = src.as_ptr() as usize;
        let Ok(Some(Frame::Data { data, .. })) = decode(&mut src) else {
            panic!("expected a data frame");
        };
        assert_eq!(data.as_ptr() as usize, start + HEADER_LEN);
    }

    #[test]
    fn frames_that_break_a_limit_fail_validation_and_the_peer_rejects_them() {
        let long = |n: usize| "a".repeat(n);
        let frames = [
            Frame::Hello {
                version: 1,
                site: long(MAX_STRING + 1),
            },
            // Longer than a u16 count: the saturated count must still be rejected.
            Frame::Hello {
                version: 1,
                site: long(70_000),
            },
            Frame::LinkState(LinkState {
                origin: "west".into(),
                seq: 1,
                links: vec![(String::new(), 1); MAX_LIST + 1],
                keys: vec![],
            }),
            Frame::LinkState(LinkState {
                origin: "west".into(),
                seq: 1,
                links: vec![],
                keys: vec![String::new(); 70_000],
            }),
            // Each field within its bound, the whole over the payload limit.
            Frame::LinkState(LinkState {
                origin: "west".into(),
                seq: 1,
                links: vec![],
                keys: vec![long(MAX_STRING); 1100],
            }),
            Frame::Open {
                stream: 1,
                routing_key: "db".into(),
                origin: "west".into(),
                dest: long(MAX_STRING + 1),
                window: 1,
                alpn: String::new(),
            },
            Frame::Reset {
                stream: 1,
                code: ResetCode::Internal,
                reason: long(MAX_STRING + 1),
            },
            Frame::Data {
                stream: 1,
                data: Bytes::from(vec![0; MAX_PAYLOAD + 1]),
            },
            Frame::Data {
                stream: 1,
                data: Bytes::new(),
            },
            Frame::Window {
                stream: 1,
                increment: 0,
            },
            Frame::Close { stream: 0 },
        ];
        for frame in frames {
            let invalid = frame.validate().expect_err("frame breaks a limit");
            let rejected = decode(&mut encoded(&frame)).expect_err("peer rejects it");
            assert_eq!(
                std::mem::discriminant(&invalid),
                std::mem::discriminant(&rejected),
                "{invalid} / {rejected}"
            );
        }
    }

    /// A string of at most [`MAX_STRING`] bytes, now and then close to the limit.
    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => vec(any::<char>(), 0..16),
            1 => vec(any::<char>(), 250..400),
        ]
        .prop_map(|chars| {
            let mut s = String::new();
            for c in chars {
                if s.len() + c.len_utf8() > MAX_STRING {
                    break;
                }
                s.push(c);
            }
            s
        })
    }

    fn arb_reset_code() -> impl Strategy<Value = ResetCode> {
        prop::sample::select(vec![
            ResetCode::NoRoute,
            ResetCode::Refused,
            ResetCode::LinkLost,
            ResetCode::Policy,
            ResetCode::Internal,
            ResetCode::Cancelled,
        ])
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let stream = 1..=u32::MAX;
        prop_oneof![
            (any::<u16>(), arb_string()).prop_map(|(version, site)| Frame::Hello { version, site }),
            (
                arb_string(),
                any::<u64>(),
                vec((arb_string(), any::<u32>()), 0..8),
                vec(arb_string(), 0..8),
            )
                .prop_map(|(origin, seq, links, keys)| {
                    Frame::LinkState(LinkState {
                        origin,
                        seq,
                        links,
                        keys,
                    })
                }),
            (
                stream.clone(),
                arb_string(),
                arb_string(),
                arb_string(),
                any::<u32>(),
                arb_string(),
            )
                .prop_map(|(stream, routing_key, origin, dest, window, alpn)| {
                    Frame::Open {
                        stream,
                        routing_key,
                        origin,
                        dest,
                        window,
                        alpn,
                    }
                }),
            (stream.clone(), vec(any::<u8>(), 1..2048)).prop_map(|(stream, data)| Frame::Data {
                stream,
                data: data.into(),
            }),
            (stream.clone(), 1..=u32::MAX)
                .prop_map(|(stream, increment)| Frame::Window { stream, increment }),
            stream.clone().prop_map(|stream| Frame::Close { stream }),
            (stream, arb_reset_code(), arb_string()).prop_map(|(stream, code, reason)| {
                Frame::Reset {
                    stream,
                    code,
                    reason,
                }
            }),
            any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        ]
    }

    /// Decodes until the input runs out or fails, checking what each call leaves behind.
    fn drain(src: &mut BytesMut) -> Result<(), TestCaseError> {
        loop {
            let before = src.clone();
            match decode(src) {
                Ok(Some(frame)) => {
                    let used = before.len() - src.len();
                    prop_assert!(used >= HEADER_LEN);
                    // Canonical: the frame re-encodes to exactly the bytes it came from.
                    prop_assert_eq!(&encoded(&frame)[..], &before[..used]);
                    prop_assert_eq!(frame.validate(), Ok(()));
                }
                Ok(None) => {
                    prop_assert_eq!(&src[..], &before[..]);
                    return Ok(());
                }
                Err(first) => {
                    let consumed = src.len() != before.len();
                    let again = decode(src);
                    if !consumed {
                        prop_assert_eq!(again, Err(first));
                    }
                    return Ok(());
                }
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_frames_round_trip(frame in arb_frame()) {
            prop_assert_eq!(frame.validate(), Ok(()));
            let mut buf = encoded(&frame);
            prop_assert_eq!(buf.len(), frame.encoded_len());
            prop_assert_eq!(decode(&mut buf), Ok(Some(frame)));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn frame_sequences_decode_whatever_the_read_boundaries(
            frames in vec(arb_frame(), 1..6),
            cuts in vec(any::<Index>(), 0..4),
        ) {
            let mut all = BytesMut::new();
            for frame in &frames {
                frame.encode(&mut all);
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(all.len() + 1)).collect();
            cuts.push(all.len());
            cuts.sort_unstable();
            let mut src = BytesMut::new();
            let mut decoded = Vec::new();
            let mut at = 0;
            for cut in cuts {
                src.extend_from_slice(&all[at..cut]);
                at = cut;
                while let Some(frame) = decode(&mut src)? {
                    decoded.push(frame);
                }
            }
            prop_assert_eq!(decoded, frames);
            prop_assert!(src.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in vec(any::<u8>(), 0..512)) {
            drain(&mut BytesMut::from(&bytes[..]))?;
        }

        #[test]
        fn corrupted_frames_never_panic_the_decoder(
            frames in vec(arb_frame(), 1..4),
            flips in vec((any::<Index>(), any::<u8>()), 1..4),
            cut in any::<Index>(),
        ) {
            let mut buf = BytesMut::new();
            for frame in &frames {
                frame.encode(&mut buf);
            }
            for (at, xor) in flips {
                let at = at.index(buf.len());
                buf[at] ^= xor;
            }
            buf.truncate(cut.index(buf.len() + 1));
            drain(&mut buf)?;
        }
    }
}
