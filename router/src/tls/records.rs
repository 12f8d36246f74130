//! TLS 1.3 records sealed and opened by skiff itself, with the traffic secrets rustls hands
//! over once a handshake is done (rustls' `kernel` API, built for kTLS).
//!
//! Why: rustls' buffered API copies each received record into its deframer and the
//! plaintext out again, one 16 KiB record per read. Here a link reads 256 KiB at a time into
//! one buffer, opens every record where it lies, and moves each record's plaintext down over
//! the gap the previous record's header and tag left (ring's `open_within` decrypts and moves
//! in one pass), so that the buffer's front is the link's plaintext, contiguous, and frames
//! are decoded from it. Sealing builds records straight into the buffer that is sent, several
//! per send. docs/performance.md has the per-record costs.
//!
//! What this layer does beyond application data: it answers a peer's `KeyUpdate` (new receive
//! keys from rustls; a requested update of its own before its next record), updates its own
//! keys before the cipher suite's confidentiality limit, hands a server's session tickets to
//! rustls, and treats `close_notify` as the end of the stream. A handshake message split
//! across records, an alert other than `close_notify`, or any record that does not open is
//! an error that ends the connection.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use ring::aead;
use rustls::{
    ConnectionTrafficSecrets, client::ClientConnectionData, kernel::KernelConnection,
    server::ServerConnectionData,
};

/// The record header: content type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// The AEAD tag every record carries.
const TAG_LEN: usize = 16;
/// The most plaintext one record may carry (RFC 8446 5.1).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// The longest record body a peer may send: plaintext, content type, padding, tag
/// (RFC 8446 5.2).
const MAX_BODY: usize = MAX_PLAINTEXT + 256;
/// The longest record on the wire.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_BODY;

const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;
const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;
const CLOSE_NOTIFY: u8 = 0;

/// Why a record could not be sealed or opened; each ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("a TLS record of {0} bytes, above the limit of {MAX_BODY}")]
    Oversized(usize),
    #[error("a TLS record of {0} bytes, too short to carry a tag")]
    Short(usize),
    #[error("a TLS record of outer type {0}, not application data")]
    OuterType(u8),
    #[error("a TLS record did not decrypt (tampered, or out of order)")]
    Decrypt,
    #[error("a TLS record with no content type")]
    NoContentType,
    #[error("a TLS record of content type {0}, which is not allowed after the handshake")]
    ContentType(u8),
    #[error("the peer sent TLS alert {0}")]
    Alert(u8),
    #[error("a TLS handshake message split across records (not supported after the handshake)")]
    Fragmented,
    #[error("a TLS handshake message of type {0}, not allowed after the handshake")]
    HandshakeType(u8),
    #[error("a malformed TLS KeyUpdate")]
    KeyUpdate,
    #[error("the record sequence number ran out")]
    Exhausted,
    #[error("rustls refused the key schedule step")]
    Rustls(#[from] rustls::Error),
    #[error("a cipher suite the record layer does not know")]
    Suite,
}

/// What rustls keeps after the handshake: the key schedule, for key updates, and a client's
/// session ticket store. Both directions of a connection share it.
pub enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Client(_) => "Kernel::Client",
            Self::Server(_) => "Kernel::Server",
        })
    }
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Self::Client(k) => k.update_tx_secret(),
            Self::Server(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Self::Client(k) => k.update_rx_secret(),
            Self::Server(k) => k.update_rx_secret(),
        }
    }

    /// Records a server's session ticket (clients only; a server receiving one is refused).
    fn session_ticket(&mut self, payload: &[u8]) -> Result<(), Error> {
        match self {
            Self::Client(k) => Ok(k.handle_new_session_ticket(payload)?),
            Self::Server(_) => Err(Error::HandshakeType(NEW_SESSION_TICKET)),
        }
    }

    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            Self::Client(k) => k.negotiated_cipher_suite(),
            Self::Server(k) => k.negotiated_cipher_suite(),
        };
        suite
            .tls13()
            .map_or(u64::MAX, |s| s.common.confidentiality_limit)
    }
}

/// The state both directions share.
#[derive(Debug)]
struct Shared {
    kernel: Mutex<Kernel>,
    /// Set when the peer asked for our keys to be updated; the sealer sends its KeyUpdate
    /// before its next record.
    update_requested: AtomicBool,
}

/// One direction's AEAD state: key, IV and the next record's sequence number.
struct Keys {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Self, Error> {
        use ConnectionTrafficSecrets as S;
        let (algorithm, key, iv) = match &secrets {
            S::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            S::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            S::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(Error::Suite),
        };
        let key = aead::UnboundKey::new(algorithm, key.as_ref()).map_err(|_| Error::Suite)?;
        Ok(Self {
            key: aead::LessSafeKey::new(key),
            iv: iv.as_ref().try_into().map_err(|_| Error::Suite)?,
            seq,
        })
    }

    /// The next record's nonce: the IV with the sequence number XORed into its tail
    /// (RFC 8446 5.3).
    fn nonce(&mut self) -> Result<aead::Nonce, Error> {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self.seq.checked_add(1).ok_or(Error::Exhausted)?;
        Ok(aead::Nonce::assume_unique_for_key(nonce))
    }
}

/// Makes the two directions of a connection from what rustls handed over.
///
/// # Errors
/// When the negotiated cipher suite is not one ring's AEADs implement here.
pub fn split(secrets: rustls::ExtractedSecrets, kernel: Kernel) -> Result<(Sealer, Opener), Error> {
    let limit = kernel.confidentiality_limit();
    let shared = Arc::new(Shared {
        kernel: Mutex::new(kernel),
        update_requested: AtomicBool::new(false),
    });
    let sealer = Sealer {
        keys: Keys::new(secrets.tx)?,
        // Half the limit leaves room for whatever the peer counts differently.
        update_at: limit / 2,
        shared: Arc::clone(&shared),
    };
    let opener = Opener {
        keys: Keys::new(secrets.rx)?,
        shared,
        closed: false,
    };
    Ok((sealer, opener))
}

/// The sending direction.
#[derive(Debug)]
pub struct Sealer {
    keys: Keys,
    /// Records sealed under one key before the keys are updated.
    update_at: u64,
    shared: Arc<Shared>,
}

impl Sealer {
    /// Appends `plaintext` (gathered from its slices) to `out` as application-data records of
    /// up to [`MAX_PLAINTEXT`] bytes each.
    ///
    /// # Errors
    /// When the keys could not be updated or the sequence number ran out.
    pub fn seal(&mut self, plaintext: &[&[u8]], out: &mut Vec<u8>) -> Result<(), Error> {
        let total: usize = plaintext.iter().map(|p| p.len()).sum();
        out.reserve(total + total.div_ceil(MAX_PLAINTEXT) * (HEADER_LEN + 1 + TAG_LEN));
        let mut parts = plaintext.iter().copied().filter(|p| !p.is_empty());
        let mut current: &[u8] = parts.next().unwrap_or_default();
        while !current.is_empty() {
            let start = out.len();
            out.extend_from_slice(&[APPLICATION_DATA, 3, 3, 0, 0]);
            let mut room = MAX_PLAINTEXT;
            while room > 0 && !current.is_empty() {
                let take = room.min(current.len());
                out.extend_from_slice(&current[..take]);
                current = &current[take..];
                room -= take;
                if current.is_empty() {
                    current = parts.next().unwrap_or_default();
                }
            }
            out.push(APPLICATION_DATA);
            self.seal_record(out, start)?;
        }
        Ok(())
    }

    /// Updates the keys before each record once `records` have been sealed under one key
    /// (tests drive key updates with it).
    #[cfg(test)]
    pub fn update_keys_after(&mut self, records: u64) {
        self.update_at = records;
    }

    /// Appends a `close_notify` alert to `out`: the end of what this side sends.
    ///
    /// # Errors
    /// As [`Sealer::seal`].
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        let start = out.len();
        out.extend_from_slice(&[APPLICATION_DATA, 3, 3, 0, 0, 1, CLOSE_NOTIFY, ALERT]);
        self.seal_record(out, start)
    }

    /// Seals the record that starts at `out[start]` (header written, plaintext and inner
    /// content type after it), updating the keys first when they are due.
    fn seal_record(&mut self, out: &mut Vec<u8>, start: usize) -> Result<(), Error> {
        if self.keys.seq >= self.update_at || self.shared.update_requested.load(Ordering::Acquire) {
            // The KeyUpdate goes before this record, sealed under the old keys; this record
            // is then sealed under the new ones.
            let pending = out.split_off(start);
            self.update_keys(out)?;
            let start = out.len();
            out.extend_from_slice(&pending);
            return self.seal_with_current(out, start);
        }
        self.seal_with_current(out, start)
    }

    fn seal_with_current(&mut self, out: &mut Vec<u8>, start: usize) -> Result<(), Error> {
        let body = out.len() - start - HEADER_LEN + TAG_LEN;
        let body = u16::try_from(body).map_err(|_| Error::Oversized(body))?;
        out[start + 3..start + 5].copy_from_slice(&body.to_be_bytes());
        let header: [u8; HEADER_LEN] = out[start..start + HEADER_LEN]
            .try_into()
            .map_err(|_| Error::Short(0))?;
        let nonce = self.keys.nonce()?;
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(
                nonce,
                aead::Aad::from(header),
                &mut out[start + HEADER_LEN..],
            )
            .map_err(|_| Error::Exhausted)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Sends a KeyUpdate (not asking the peer for one) under the current keys and moves to
    /// the next ones.
    fn update_keys(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        let start = out.len();
        out.extend_from_slice(&[APPLICATION_DATA, 3, 3, 0, 0]);
        out.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, 0, HANDSHAKE]);
        self.seal_with_current(out, start)?;
        let next = self
            .shared
            .kernel
            .lock()
            .expect("kernel lock")
            .update_tx()?;
        self.keys = Keys::new(next)?;
        self.shared.update_requested.store(false, Ordering::Release);
        Ok(())
    }
}

/// The receiving direction.
#[derive(Debug)]
pub struct Opener {
    keys: Keys,
    shared: Arc<Shared>,
    /// The peer sent `close_notify`; nothing after it is read.
    closed: bool,
}

/// What [`Opener::open`] left in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// `buf[..plain]` is plaintext, every byte of it application data.
    pub plain: usize,
    /// `buf[sealed..]` is records not yet opened (at most part of one, unless the peer
    /// closed).
    pub sealed: usize,
    /// The peer sent `close_notify`.
    pub closed: bool,
}

impl Opener {
    /// Opens every whole record in `buf[sealed..]`, moving its application data to
    /// `buf[plain..]`, so that the plaintext stays contiguous at the buffer's front.
    ///
    /// # Errors
    /// When a record is malformed, does not decrypt, or carries something this layer refuses
    /// (see the module documentation).
    pub fn open(&mut self, buf: &mut [u8], plain: usize, sealed: usize) -> Result<Opened, Error> {
        let (mut plain, mut sealed) = (plain, sealed);
        while !self.closed {
            let Some(header) = buf.get(sealed..sealed + HEADER_LEN) else {
                break;
            };
            let header: [u8; HEADER_LEN] = header.try_into().map_err(|_| Error::Short(0))?;
            if header[0] != APPLICATION_DATA {
                return Err(Error::OuterType(header[0]));
            }
            let body = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if body > MAX_BODY {
                return Err(Error::Oversized(body));
            }
            if body < TAG_LEN + 1 {
                return Err(Error::Short(body));
            }
            let end = sealed + HEADER_LEN + body;
            if end > buf.len() {
                break;
            }
            let nonce = self.keys.nonce()?;
            let opened = self
                .keys
                .key
                .open_within(
                    nonce,
                    aead::Aad::from(header),
                    &mut buf[plain..end],
                    sealed + HEADER_LEN - plain..,
                )
                .map_err(|_| Error::Decrypt)?;
            // The inner content type is the last byte that is not padding.
            let typed = opened
                .iter()
                .rposition(|&b| b != 0)
                .ok_or(Error::NoContentType)?;
            let content = opened[typed];
            if typed > MAX_PLAINTEXT {
                return Err(Error::Oversized(typed));
            }
            sealed = end;
            match content {
                APPLICATION_DATA => plain += typed,
                HANDSHAKE => {
                    let message = buf[plain..plain + typed].to_vec();
                    self.handshake(&message)?;
                }
                ALERT => match buf[plain..plain + typed] {
                    [_, CLOSE_NOTIFY] => self.closed = true,
                    [_, description] => return Err(Error::Alert(description)),
                    _ => return Err(Error::Alert(0xff)),
                },
                other => return Err(Error::ContentType(other)),
            }
        }
        Ok(Opened {
            plain,
            sealed,
            closed: self.closed,
        })
    }

    /// Handles the post-handshake messages of one record.
    fn handshake(&mut self, mut messages: &[u8]) -> Result<(), Error> {
        while !messages.is_empty() {
            let [kind, a, b, c, rest @ ..] = messages else {
                return Err(Error::Fragmented);
            };
            let len = usize::try_from(u32::from_be_bytes([0, *a, *b, *c]))
                .map_err(|_| Error::Fragmented)?;
            if rest.len() < len {
                return Err(Error::Fragmented);
            }
            let (body, next) = rest.split_at(len);
            messages = next;
            match (*kind, body) {
                (KEY_UPDATE, [request]) if *request <= 1 => {
                    let next = self
                        .shared
                        .kernel
                        .lock()
                        .expect("kernel lock")
                        .update_rx()?;
                    self.keys = Keys::new(next)?;
                    if *request == 1 {
                        self.shared.update_requested.store(true, Ordering::Release);
                    }
                }
                (KEY_UPDATE, _) => return Err(Error::KeyUpdate),
                (NEW_SESSION_TICKET, ticket) => self
                    .shared
                    .kernel
                    .lock()
                    .expect("kernel lock")
                    .session_ticket(ticket)?,
                (other, _) => return Err(Error::HandshakeType(other)),
            }
        }
        Ok(())
    }
}
