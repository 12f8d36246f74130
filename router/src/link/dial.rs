//! The dialing side: redeeming a token for link credentials, and keeping an outgoing link up
//! with exponential backoff and jitter.

use std::{sync::Arc, time::Duration};

use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use super::{Direction, Events, frame, transport};
use crate::{
    pki::{self, CertKey},
    site,
    tls::{
        self,
        handshakes::{Endpoint, Failure, Handshakes},
        session::{self, Session},
    },
    token::{RedeemRequest, RedeemResponse, Token},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A link that stayed up this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// How a redemption the issuer answered with a refusal begins, as the error reads: the token
/// will not work again, unlike one whose issuer could not be reached.
pub const REFUSED: &str = "the issuing site refused the token";

/// Failure to redeem a token or dial a link.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out connecting to {0}")]
    Timeout(String),
    #[error("the TLS handshake with {0} timed out")]
    HandshakeTimeout(String),
    #[error("tls handshake with {url} failed")]
    Tls {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tls handshake with {url} failed")]
    Handshake {
        url: String,
        #[source]
        source: session::Error,
    },
    #[error("invalid address {0:?}: expected HOST:PORT")]
    Address(String),
    #[error("{REFUSED}: {0}")]
    Refused(String),
    #[error("the issuing site answered something that is not a redemption response")]
    BadResponse,
    #[error("peer certificate names {certified:?}, expected site {expected:?}")]
    WrongPeer { certified: String, expected: String },
    #[error("the peer agreed on no link protocol version this router speaks")]
    NoLinkProtocol,
    #[error("a TLS record from the peer was refused")]
    Record(#[from] tls::records::Error),
    #[error(transparent)]
    TlsConfig(#[from] tls::Error),
    #[error(transparent)]
    Pki(#[from] pki::Error),
    #[error("i/o with the issuing site failed")]
    Io(#[from] std::io::Error),
}

/// An outgoing link as stored in `links/NAME.json` (the key lives in `links/NAME.key`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LinkConfig {
    pub name: String,
    /// `HOST:PORT` of the peer's link-access endpoint.
    pub url: String,
    /// The peer's site name; its router certificate must name it.
    pub peer_site: String,
    /// The peer site's CA (PEM): the only CA this link trusts.
    pub ca: String,
    /// Our credential for this link (PEM), signed by the peer's CA.
    pub cert: String,
    #[serde(default = "default_cost")]
    pub cost: u32,
    /// Parallel TLS connections for this link.
    #[serde(default = "default_connections")]
    pub connections: u32,
}

fn default_cost() -> u32 {
    1
}

fn default_connections() -> u32 {
    1
}

/// Connects to `url` for a token redemption (tokio makes the socket: it carries one request
/// and its answer, on the control plane).
async fn connect_tcp(url: &str) -> Result<(ServerName<'static>, TcpStream), Error> {
    connect_with(url, TcpStream::connect(url)).await
}

/// Waits for `connecting`, a connection to `url`, and tunes it for a link.
async fn connect_with(
    url: &str,
    connecting: impl Future<Output = std::io::Result<TcpStream>>,
) -> Result<(ServerName<'static>, TcpStream), Error> {
    let host = site::host_of(url).ok_or_else(|| Error::Address(url.to_owned()))?;
    let server_name =
        ServerName::try_from(host.to_owned()).map_err(|_| Error::Address(url.to_owned()))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| Error::Timeout(url.to_owned()))?
        .map_err(|source| Error::Connect {
            url: url.to_owned(),
            source,
        })?;
    super::tune(&tcp);
    Ok((server_name, tcp))
}

async fn connect_tls(
    url: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Error> {
    let (server_name, tcp) = connect_tcp(url).await?;
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        TlsConnector::from(config).connect(server_name, tcp),
    )
    .await
    .map_err(|_| Error::Timeout(url.to_owned()))?
    .map_err(|source| Error::Tls {
        url: url.to_owned(),
        source,
    })
}

/// Redeems `token` for site `me`: returns the link configuration and its private key.
///
/// # Errors
/// When the issuer cannot be reached, its certificate does not chain to the token's CA, or it
/// refuses the token (expired, used, wrong code, rate-limited).
pub async fn redeem(token: &Token, me: &str, name: &str) -> Result<(LinkConfig, String), Error> {
    let (csr, key_pem) = pki::new_csr(me)?;
    let request = RedeemRequest {
        grant: token.grant.clone(),
        code: token.code.clone(),
        site: me.to_owned(),
        csr,
    };
    match exchange(token, &request).await? {
        RedeemResponse::Error { error } => Err(Error::Refused(error)),
        RedeemResponse::Ok {
            certificate,
            ca,
            site,
        } => Ok((
            LinkConfig {
                name: name.to_owned(),
                url: token.url.clone(),
                peer_site: site,
                ca,
                cert: certificate,
                cost: default_cost(),
                connections: default_connections(),
            },
            key_pem,
        )),
    }
}

/// Sends one redemption request to the issuer `token` names and returns its answer.
///
/// # Errors
/// When the issuer cannot be reached or verified, or its answer is not a redemption response.
pub async fn exchange(token: &Token, request: &RedeemRequest) -> Result<RedeemResponse, Error> {
    let mut tls = connect_tls(&token.url, tls::grant_client_config(&token.ca)?).await?;
    let mut line = serde_json::to_vec(request).map_err(|_| Error::BadResponse)?;
    line.push(b'\n');
    tls.write_all(&line).await?;
    tls.flush().await?;
    let mut answer = String::new();
    BufReader::new(tls)
        .take(64 * 1024)
        .read_line(&mut answer)
        .await?;
    serde_json::from_str(&answer).map_err(|_| Error::BadResponse)
}

/// Dials the link once and runs it until it ends.
async fn dial_once(
    config: &LinkConfig,
    client: Arc<rustls::ClientConfig>,
    me: &str,
    events: Arc<dyn Events>,
    handshakes: &Handshakes,
) -> Result<(), Error> {
    let handshake = async {
        let (tcp, session) = connect_link(&config.url, client, events.as_ref()).await?;
        let certified = session
            .peer_certificates
            .first()
            .and_then(pki::common_name)
            .unwrap_or_default();
        if certified != config.peer_site {
            return Err(Error::WrongPeer {
                certified,
                expected: config.peer_site.clone(),
            });
        }
        let version = session
            .alpn
            .as_deref()
            .and_then(frame::link_version)
            .ok_or(Error::NoLinkProtocol)?;
        Ok((tcp, session, certified, version))
    }
    .await;
    let failure = match &handshake {
        Ok(_) => Some(Ok(())),
        Err(Error::Handshake { source, .. }) => Some(Err(source.failure())),
        Err(Error::HandshakeTimeout(_)) => Some(Err(Failure::Timeout)),
        Err(Error::WrongPeer { .. }) => Some(Err(Failure::Certificate)),
        Err(Error::NoLinkProtocol) => Some(Err(Failure::Incompatible)),
        // Not a handshake: the TCP connection was not made.
        Err(_) => None,
    };
    if let Some(outcome) = failure {
        handshakes.count(Endpoint::LinkDial, outcome);
    }
    let (tcp, session, certified, version) = handshake?;
    let direction = Direction::Outgoing(config.name.clone());
    // The link's own end is logged by super::run.
    let transport = transport::tls(tcp, session)?;
    let _ = super::run(transport, version, me, certified, direction, events).await;
    Ok(())
}

/// Connects to `url` through the router's data path and runs a link's TLS handshake, after
/// which skiff seals and opens the records itself.
async fn connect_link(
    url: &str,
    config: Arc<rustls::ClientConfig>,
    events: &dyn Events,
) -> Result<(TcpStream, Session), Error> {
    let (server_name, mut tcp) = connect_with(url, events.dial(url)).await?;
    let session = tokio::time::timeout(
        CONNECT_TIMEOUT,
        session::connect(&mut tcp, config, server_name),
    )
    .await
    .map_err(|_| Error::HandshakeTimeout(url.to_owned()))?
    .map_err(|source| Error::Handshake {
        url: url.to_owned(),
        source,
    })?;
    Ok((tcp, session))
}

/// Keeps one connection of an outgoing link up, forever (abort the task to stop it).
///
/// # Errors
/// Only when the stored credential does not parse; connection failures are retried.
pub async fn maintain(
    config: LinkConfig,
    key_pem: String,
    me: String,
    events: Arc<dyn Events>,
    handshakes: Arc<Handshakes>,
) -> Result<(), Error> {
    let credential = CertKey {
        cert_pem: config.cert.clone(),
        key_pem,
    };
    let client = tls::link_client_config(&config.ca, &credential)?;
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = tokio::time::Instant::now();
        match dial_once(
            &config,
            Arc::clone(&client),
            &me,
            Arc::clone(&events),
            &handshakes,
        )
        .await
        {
            Ok(()) => {}
            Err(e) => warn!(link = %config.name, error = %e, "link dial failed"),
        }
        if started.elapsed() >= STABLE_AFTER {
            backoff = BACKOFF_MIN;
        }
        let wait = jitter(backoff);
        info!(link = %config.name, retry_in = ?wait, "link will be retried");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// `base` scaled by a random factor in [0.5, 1.5), so that many routers do not retry in step.
fn jitter(base: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let factor = if tls::random(&mut byte).is_ok() {
        0.5 + f64::from(byte[0]) / 256.0
    } else {
        1.0
    };
    base.mul_f64(factor)
}
