//! The link-access endpoint: one TLS port for links (`skiff-link/1`, client certificate
//! required) and token redemption (`skiff-grant/1`, secret code required).
//!
//! Every connection is handled in its own task; a bad one (plaintext, garbage, a certificate
//! from another CA, no certificate on a link, a malformed frame) is logged in one line and
//! dropped, and nothing else is disturbed.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::ServerConfig;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{info, warn};

use super::{Direction, Events, frame, transport};
use crate::{
    pki,
    tls::{handshakes::Failure, records, session},
    token,
};

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest redemption request line (a CSR is well under 2 KiB).
const MAX_REQUEST: usize = 16 * 1024;

/// Why a link connection was refused after its handshake.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the link credential of site {0} was revoked")]
    Revoked(String),
    #[error("site {site} already has {open} link connections here, the most one site may hold")]
    TooMany { site: String, open: usize },
    #[error(transparent)]
    Denied(#[from] crate::policy::Denied),
}

/// What the access endpoint needs from the router.
pub trait Access: Events {
    /// This router's site name.
    fn site_name(&self) -> &str;
    /// Whether site `peer_site`, presenting the credential with `fingerprint`, may link here
    /// (not revoked, not over its connection limit, allowed by the site policy).
    ///
    /// # Errors
    /// Why it may not.
    fn admit_link(&self, peer_site: &str, fingerprint: &str) -> Result<(), Refused>;
    /// Counts a link-access handshake's outcome.
    fn handshake(&self, outcome: Result<(), Failure>);

    /// Handles a redemption request from `source`.
    fn redeem(
        &self,
        source: SocketAddr,
        request: token::RedeemRequest,
    ) -> impl Future<Output = token::RedeemResponse> + Send;
}

/// Accepts connections on `listener` until the task is aborted; aborting it also ends every
/// connection it accepted, links included.
pub async fn serve<A: Access>(listener: TcpListener, config: Arc<ServerConfig>, router: Arc<A>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "link-access accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let config = Arc::clone(&config);
        let router = Arc::clone(&router);
        connections.spawn(async move {
            if let Err(reason) = handle(tcp, peer, config, router).await {
                warn!(%peer, reason, "link-access connection refused");
            }
        });
    }
}

async fn handle<A: Access>(
    mut tcp: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    router: Arc<A>,
) -> Result<(), String> {
    super::tune(&tcp);
    let handshake =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, session::accept(&mut tcp, config)).await;
    router.handshake(match &handshake {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.failure()),
        Err(_) => Err(Failure::Timeout),
    });
    let session = handshake
        .map_err(|_| "tls handshake timed out".to_owned())?
        .map_err(|e| format!("tls handshake failed: {}", crate::node::error_chain(&e)))?;
    let peer_cert = session.peer_certificates.first().cloned();
    let cert_name = peer_cert.as_ref().and_then(pki::common_name);
    let alpn = session.alpn.clone();
    let version = alpn.as_deref().and_then(frame::link_version);
    match alpn.as_deref() {
        Some(_) if let Some(version) = version => {
            let peer_site = cert_name.ok_or("link attempt without a client certificate")?;
            let fingerprint = peer_cert.as_ref().map(pki::fingerprint).unwrap_or_default();
            router
                .admit_link(&peer_site, &fingerprint)
                .map_err(|e| e.to_string())?;
            let events: Arc<dyn Events> = router.clone();
            let transport = transport::tls(tcp, session)
                .map_err(|e| format!("a TLS record from {peer_site} was refused: {e}"))?;
            super::run(
                transport,
                version,
                router.site_name(),
                peer_site,
                Direction::Incoming,
                events,
            )
            .await
            .map_err(|e| e.to_string())
        }
        Some(frame::ALPN_GRANT) => redeem(tcp, session, peer, router.as_ref()).await,
        _ => Err("no supported ALPN protocol".to_owned()),
    }
}

/// Serves one redemption: a request line in, a response line out, then `close_notify`.
async fn redeem<A: Access>(
    mut tcp: TcpStream,
    session: session::Session,
    peer: SocketAddr,
    router: &A,
) -> Result<(), String> {
    let session::Session {
        mut sealer,
        mut opener,
        received,
        plain,
        closed,
        ..
    } = session;
    // Bytes, not a String: a request that is not UTF-8 gets a one-line refusal like any other
    // malformed one, instead of a dropped connection.
    let line = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_line(&mut tcp, &mut opener, received, plain, closed),
    )
    .await
    .map_err(|_| "redemption request timed out".to_owned())?
    .map_err(|e| format!("failed to read redemption request: {e}"))?;
    let response = match serde_json::from_slice::<token::RedeemRequest>(&line) {
        Ok(request) => router.redeem(peer, request).await,
        Err(e) => token::RedeemResponse::error(format!("malformed redemption request: {e}")),
    };
    if let token::RedeemResponse::Error { error: reason } = &response {
        warn!(%peer, reason, "token redemption refused");
    } else {
        info!(%peer, "token redeemed");
    }
    let mut line = serde_json::to_vec(&response).map_err(|e| e.to_string())?;
    line.push(b'\n');
    let mut out = Vec::new();
    sealer
        .seal(&[&line], &mut out)
        .and_then(|()| sealer.close_notify(&mut out))
        .map_err(|e| e.to_string())?;
    tcp.write_all(&out).await.map_err(|e| e.to_string())?;
    tcp.shutdown().await.map_err(|e| e.to_string())
}

/// Reads plaintext up to and including the first newline, at most [`MAX_REQUEST`] bytes.
async fn read_line(
    tcp: &mut TcpStream,
    opener: &mut records::Opener,
    mut buf: Vec<u8>,
    mut plain: usize,
    mut closed: bool,
) -> Result<Vec<u8>, String> {
    let mut sealed = plain;
    loop {
        if !closed {
            let opened = opener
                .open(&mut buf, plain, sealed)
                .map_err(|e| e.to_string())?;
            (plain, sealed, closed) = (opened.plain, opened.sealed, opened.closed);
            // The opened records' headers and tags go, so that the buffer holds at most the
            // request and one partial record however many (empty) records the peer sends.
            buf.drain(plain..sealed);
            sealed = plain;
        }
        if let Some(end) = buf[..plain].iter().position(|&b| b == b'\n') {
            buf.truncate(end + 1);
            return Ok(buf);
        }
        if plain > MAX_REQUEST || closed {
            // A line too long, or the peer's end: what came is the request.
            buf.truncate(plain.min(MAX_REQUEST));
            return Ok(buf);
        }
        let mut chunk = [0; 4096];
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            buf.truncate(plain);
            return Ok(buf);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
