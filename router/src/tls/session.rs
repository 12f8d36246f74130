//! A TLS 1.3 handshake driven through rustls' unbuffered API, after which skiff seals and
//! opens the records itself ([`super::records`]).
//!
//! The handshake reads into a buffer of its own and rustls says how much of it it consumed.
//! Records the peer sent right behind its last handshake message (a link's Hello) may arrive
//! in the same read; rustls opens those itself before it reports the handshake done, so
//! [`Session::received`] holds their plaintext first and the records still sealed behind it,
//! in the layout [`records::Opener::open`] continues from.

use std::sync::Arc;

use rustls::{
    ClientConfig, ExtractedSecrets, ServerConfig,
    client::{ClientConnectionData, UnbufferedClientConnection},
    pki_types::{CertificateDer, ServerName},
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{
        ConnectionState, EncodeError, InsufficientSizeError, UnbufferedConnectionCommon,
        UnbufferedStatus,
    },
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::records::{self, Kernel, Opener, Sealer};

/// The most handshake data buffered at once (a certificate chain is a few KiB).
const MAX_HANDSHAKE_BUFFER: usize = 64 * 1024;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    #[error("i/o during the TLS handshake failed")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection during the TLS handshake")]
    Closed,
    #[error("the peer's TLS handshake messages exceed {MAX_HANDSHAKE_BUFFER} bytes")]
    TooLarge,
    #[error("rustls asked for something the handshake does not do: {0}")]
    Unexpected(&'static str),
    #[error(transparent)]
    Records(#[from] records::Error),
}

impl Error {
    /// The reason the handshake metric counts this failure under.
    #[must_use]
    pub fn failure(&self) -> super::handshakes::Failure {
        use super::handshakes::Failure;
        match self {
            Self::Tls(e) => Failure::of_rustls(e),
            Self::Io(_) | Self::Closed => Failure::Connection,
            Self::TooLarge | Self::Unexpected(_) | Self::Records(_) => Failure::Protocol,
        }
    }
}

/// An established session: the record layer's two directions and what the handshake agreed.
#[derive(Debug)]
pub struct Session {
    pub sealer: Sealer,
    pub opener: Opener,
    /// Bytes received behind the handshake: `received[..plain]` is application data rustls
    /// already opened, `received[plain..]` records not yet opened.
    pub received: Vec<u8>,
    pub plain: usize,
    /// The peer sent `close_notify` right behind the handshake.
    pub closed: bool,
    /// The ALPN protocol agreed on.
    pub alpn: Option<Vec<u8>>,
    /// The peer's certificate chain, leaf first (empty when it sent none).
    pub peer_certificates: Vec<CertificateDer<'static>>,
}

/// Runs the client side of a handshake on `io`. `config` must allow secret extraction.
///
/// # Errors
/// When the handshake fails (the peer's certificate does not verify, no common protocol) or
/// the connection breaks.
pub async fn connect<S>(
    io: &mut S,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<Session, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    establish(UnbufferedClientConnection::new(config, name)?, io).await
}

/// Runs the server side of a handshake on `io`. `config` must allow secret extraction and
/// send no session tickets (a ticket would need a sealed record of its own).
///
/// # Errors
/// As [`connect`].
pub async fn accept<S>(io: &mut S, config: Arc<ServerConfig>) -> Result<Session, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    establish(UnbufferedServerConnection::new(config)?, io).await
}

/// Drives either side's handshake and hands its secrets to the record layer.
async fn establish<C: Process, S>(mut conn: C, io: &mut S) -> Result<Session, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Received {
        bytes: received,
        plain,
        closed,
    } = drive(&mut conn, io).await?;
    let (alpn, peer_certificates) = conn.agreed();
    let (secrets, kernel) = conn.into_kernel()?;
    let (sealer, opener) = records::split(secrets, kernel)?;
    Ok(Session {
        sealer,
        opener,
        received,
        plain,
        closed,
        alpn,
        peer_certificates,
    })
}

fn agreed<D>(
    conn: &UnbufferedConnectionCommon<D>,
) -> (Option<Vec<u8>>, Vec<CertificateDer<'static>>) {
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let certs = conn
        .peer_certificates()
        .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    (alpn, certs)
}

/// What the handshake needs of either side: rustls has a client and a server version of each.
trait Process {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// The ALPN protocol agreed and the peer's certificate chain.
    fn agreed(&self) -> (Option<Vec<u8>>, Vec<CertificateDer<'static>>);
    /// The traffic secrets and what rustls keeps for key updates.
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

impl Process for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn agreed(&self) -> (Option<Vec<u8>>, Vec<CertificateDer<'static>>) {
        agreed(self)
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Client(kernel)))
    }
}

impl Process for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn agreed(&self) -> (Option<Vec<u8>>, Vec<CertificateDer<'static>>) {
        agreed(self)
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Server(kernel)))
    }
}

/// What arrived behind the handshake (see [`Session::received`]).
struct Received {
    bytes: Vec<u8>,
    plain: usize,
    closed: bool,
}

/// Drives the handshake to its end; returns the bytes received behind it.
async fn drive<C: Process, S>(conn: &mut C, io: &mut S) -> Result<Received, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut incoming = vec![0; 16 * 1024];
    let mut used = 0;
    let mut outgoing = vec![0; 16 * 1024];
    let mut queued = 0;
    // Application data rustls opened behind the handshake, before it reported it done.
    let mut plaintext = Vec::new();
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..used]);
        let (mut done, mut closed) = (false, false);
        match state? {
            ConnectionState::EncodeTlsData(mut encode) => {
                let written = match encode.encode(&mut outgoing[queued..]) {
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        outgoing.resize(queued + required_size, 0);
                        encode
                            .encode(&mut outgoing[queued..])
                            .map_err(|_| Error::Unexpected("encoding twice"))?
                    }
                    Err(_) => return Err(Error::Unexpected("encoding twice")),
                    Ok(written) => written,
                };
                queued += written;
            }
            ConnectionState::TransmitTlsData(transmit) => {
                io.write_all(&outgoing[..queued]).await?;
                io.flush().await?;
                queued = 0;
                transmit.done();
            }
            ConnectionState::BlockedHandshake => {
                if used == incoming.len() {
                    if incoming.len() >= MAX_HANDSHAKE_BUFFER {
                        return Err(Error::TooLarge);
                    }
                    incoming.resize(incoming.len() * 2, 0);
                }
                let n = io.read(&mut incoming[used..]).await?;
                if n == 0 {
                    return Err(Error::Closed);
                }
                used += n;
            }
            // The handshake is over and rustls opened the application-data record that came
            // with its last flight (it opens one before it says so): its plaintext is kept,
            // and the records behind it are left sealed. Stopping here matters: a KeyUpdate
            // rustls opened would be answered by a message it keeps to itself until its own
            // next write, which never comes.
            ConnectionState::ReadTraffic(mut read) => {
                while let Some(record) = read.next_record() {
                    let record = record?;
                    plaintext.extend_from_slice(record.payload);
                    discard += record.discard;
                }
                done = true;
            }
            // The handshake is over and nothing more is buffered that rustls would open: the
            // rest, if any, is left for the record layer.
            ConnectionState::WriteTraffic(_) => done = true,
            // The peer sent data and `close_notify` right behind its handshake.
            ConnectionState::PeerClosed => (done, closed) = (true, true),
            ConnectionState::Closed => return Err(Error::Closed),
            ConnectionState::ReadEarlyData(_) => return Err(Error::Unexpected("early data")),
            _ => return Err(Error::Unexpected("an unknown handshake state")),
        }
        if done {
            // Anything rustls encoded and has not yet asked to be sent goes out before the
            // record layer takes over the connection.
            if queued > 0 {
                io.write_all(&outgoing[..queued]).await?;
                io.flush().await?;
            }
            return Ok(finish(plaintext, incoming, discard, used, closed));
        }
        if discard > 0 {
            incoming.copy_within(discard..used, 0);
            used -= discard;
        }
    }
}

/// Lays out what came behind the handshake: the opened plaintext, then the sealed rest.
fn finish(
    mut plaintext: Vec<u8>,
    incoming: Vec<u8>,
    discard: usize,
    used: usize,
    closed: bool,
) -> Received {
    let plain = plaintext.len();
    plaintext.extend_from_slice(&incoming[discard..used]);
    Received {
        bytes: plaintext,
        plain,
        closed,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::*;
    use crate::{pki, tls};

    /// The link's own configurations: a server (the accepting router) and a client (the
    /// dialing one) whose credential the server's CA signed.
    fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let ca = pki::new_ca("east").expect("CA");
        let identity = pki::issue(
            &ca,
            "east",
            &["localhost".to_owned()],
            pki::Usage::ServerAndClient,
        )
        .expect("identity");
        let credential = pki::issue(&ca, "west", &[], pki::Usage::Client).expect("credential");
        let server = tls::server_config(
            tls::RotatingCert::new(&identity).expect("identity"),
            &ca.cert_pem,
        )
        .expect("server config");
        let client = tls::link_client_config(&ca.cert_pem, &credential).expect("client config");
        (server, client)
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("localhost").expect("name")
    }

    /// Continues from what the handshake received: reads from `io` and opens records until
    /// `want` bytes of plaintext are there or the peer closed.
    async fn receive(
        io: &mut DuplexStream,
        session: &mut Session,
        want: usize,
    ) -> Result<Vec<u8>, records::Error> {
        let mut buf = std::mem::take(&mut session.received);
        let (mut plain, mut sealed, mut closed) = (session.plain, session.plain, session.closed);
        loop {
            if !closed {
                let opened = session.opener.open(&mut buf, plain, sealed)?;
                (plain, sealed, closed) = (opened.plain, opened.sealed, opened.closed);
            }
            if plain >= want || closed {
                buf.truncate(plain);
                return Ok(buf);
            }
            let mut chunk = vec![0; 64 * 1024];
            let n = io.read(&mut chunk).await.expect("read");
            assert_ne!(n, 0, "the peer closed with {plain} of {want} bytes here");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn records_sealed_here_open_in_rustls_and_the_other_way() {
        let (server, client) = configs();
        let (mut ours, theirs) = tokio::io::duplex(1 << 20);
        let peer = tokio::spawn(async move {
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(name(), theirs)
                .await
                .expect("rustls handshake");
            // Sent at once behind the handshake, as a link's Hello is.
            tls.write_all(&pattern(300_000)).await.expect("write");
            tls.flush().await.expect("flush");
            let mut back = vec![0; 200_000];
            tls.read_exact(&mut back).await.expect("read");
            back
        });
        let mut session = accept(&mut ours, server).await.expect("handshake");
        assert_eq!(session.alpn.as_deref(), Some(crate::link::frame::ALPN_LINK));
        let got = receive(&mut ours, &mut session, 300_000)
            .await
            .expect("open");
        assert!(got == pattern(300_000), "plaintext differs");
        let mut out = Vec::new();
        let data = pattern(200_000);
        session
            .sealer
            .seal(&[&data[..1], &data[1..70_000], &data[70_000..]], &mut out)
            .expect("seal");
        ours.write_all(&out).await.expect("send");
        assert!(peer.await.expect("peer") == data, "rustls read other bytes");
    }

    #[tokio::test]
    async fn a_key_update_from_rustls_is_followed_and_answered() {
        let (server, client) = configs();
        let (mut ours, theirs) = tokio::io::duplex(1 << 20);
        let peer = tokio::spawn(async move {
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(name(), theirs)
                .await
                .expect("rustls handshake");
            tls.write_all(b"before").await.expect("write");
            // rustls asks for the peer's keys to be updated too.
            tls.get_mut().1.refresh_traffic_keys().expect("key update");
            tls.write_all(b"after").await.expect("write");
            tls.flush().await.expect("flush");
            let mut back = vec![0; 5];
            tls.read_exact(&mut back)
                .await
                .expect("read after our update");
            back
        });
        let mut session = accept(&mut ours, server).await.expect("handshake");
        let got = receive(&mut ours, &mut session, 11)
            .await
            .expect("open across the update");
        assert_eq!(got, b"beforeafter");
        let mut out = Vec::new();
        session.sealer.seal(&[b"reply"], &mut out).expect("seal");
        ours.write_all(&out).await.expect("send");
        assert_eq!(peer.await.expect("peer"), b"reply");
    }

    #[tokio::test]
    async fn both_ends_here_update_keys_on_their_own() {
        let (server, client) = configs();
        let (mut east, mut west) = tokio::io::duplex(1 << 20);
        let dialer =
            tokio::spawn(
                async move { connect(&mut west, client, name()).await.map(|s| (s, west)) },
            );
        let mut accepted = accept(&mut east, server).await.expect("accept");
        let (mut dialed, mut west) = dialer.await.expect("task").expect("connect");
        // Past the limit at once: every record sealed from here on is preceded by a
        // KeyUpdate.
        dialed.sealer.update_keys_after(0);
        let mut out = Vec::new();
        let data = pattern(100_000);
        dialed.sealer.seal(&[&data], &mut out).expect("seal");
        west.write_all(&out).await.expect("send");
        let got = receive(&mut east, &mut accepted, data.len())
            .await
            .expect("open across updates");
        assert!(got == data, "plaintext differs");
    }

    #[tokio::test]
    async fn a_tampered_record_is_refused() {
        let (server, client) = configs();
        let (mut ours, theirs) = tokio::io::duplex(1 << 20);
        let (handshaken, go) = tokio::sync::oneshot::channel::<()>();
        let peer = tokio::spawn(async move {
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(name(), theirs)
                .await
                .expect("rustls handshake");
            // Sent only after our handshake is over, so that the record reaches the record
            // layer sealed rather than being opened by rustls with the handshake's last flight.
            go.await.expect("go");
            tls.write_all(&[1; 1000]).await.expect("write");
            tls.flush().await.expect("flush");
            tls
        });
        let mut session = accept(&mut ours, server).await.expect("handshake");
        handshaken.send(()).expect("peer");
        let _tls = peer.await.expect("peer");
        assert_eq!(session.plain, 0, "nothing was sent with the handshake");
        let mut buf = session.received.clone();
        let mut chunk = vec![0; 4096];
        while buf.len() < 5 + 1000 + 17 {
            let n = ours.read(&mut chunk).await.expect("read");
            buf.extend_from_slice(&chunk[..n]);
        }
        buf[100] ^= 1;
        let refused = session.opener.open(&mut buf, 0, 0);
        assert!(
            matches!(refused, Err(records::Error::Decrypt)),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn an_oversized_record_is_refused_before_it_is_read() {
        let (server, client) = configs();
        let (mut ours, theirs) = tokio::io::duplex(1 << 20);
        let peer = tokio::spawn(async move {
            tokio_rustls::TlsConnector::from(client)
                .connect(name(), theirs)
                .await
                .expect("rustls handshake")
        });
        let mut session = accept(&mut ours, server).await.expect("handshake");
        let _tls = peer.await.expect("peer");
        // A header announcing 65,535 bytes: refused on the header alone.
        let mut buf = vec![23, 3, 3, 0xff, 0xff];
        let refused = session.opener.open(&mut buf, 0, 0);
        assert!(
            matches!(refused, Err(records::Error::Oversized(65_535))),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn close_notify_from_rustls_ends_the_stream() {
        let (server, client) = configs();
        let (mut ours, theirs) = tokio::io::duplex(1 << 20);
        let peer = tokio::spawn(async move {
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(name(), theirs)
                .await
                .expect("rustls handshake");
            tls.write_all(b"last words").await.expect("write");
            tls.shutdown().await.expect("close_notify");
            tls
        });
        let mut session = accept(&mut ours, server).await.expect("handshake");
        let _tls = peer.await.expect("peer");
        let got = receive(&mut ours, &mut session, usize::MAX)
            .await
            .expect("open");
        assert_eq!(got, b"last words");
    }
}
