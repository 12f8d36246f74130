//! The link-access endpoint: one TLS port for links (`skiff-link/1`, client certificate
//! required) and token redemption (`skiff-grant/1`, secret code required).
//!
//! Every connection is handled in its own task; a bad one (plaintext, garbage, a certificate
//! from another CA, no certificate on a link, a malformed frame) is logged in one line and
//! dropped, and nothing else is disturbed.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::{info, warn};

use super::{Direction, Events, frame};
use crate::{pki, token};

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest redemption request line (a CSR is well under 2 KiB).
const MAX_REQUEST: u64 = 16 * 1024;

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
    /// Handles a redemption request from `source`.
    fn redeem(
        &self,
        source: SocketAddr,
        request: token::RedeemRequest,
    ) -> impl Future<Output = token::RedeemResponse> + Send;
}

/// Accepts connections on `listener` until the task is aborted; aborting it also ends every
/// connection it accepted, links included.
pub async fn serve<A: Access>(listener: TcpListener, acceptor: TlsAcceptor, router: Arc<A>) {
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
        let acceptor = acceptor.clone();
        let router = Arc::clone(&router);
        connections.spawn(async move {
            if let Err(reason) = handle(tcp, peer, acceptor, router).await {
                warn!(%peer, reason, "link-access connection refused");
            }
        });
    }
}

async fn handle<A: Access>(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    router: Arc<A>,
) -> Result<(), String> {
    super::tune(&tcp);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| "tls handshake timed out".to_owned())?
        .map_err(|e| format!("tls handshake failed: {e}"))?;
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let peer_cert = session
        .peer_certificates()
        .and_then(|certs| certs.first())
        .cloned();
    let cert_name = peer_cert.as_ref().and_then(pki::common_name);
    let version = alpn.as_deref().and_then(frame::link_version);
    match alpn.as_deref() {
        Some(_) if let Some(version) = version => {
            let peer_site = cert_name.ok_or("link attempt without a client certificate")?;
            let fingerprint = peer_cert.as_ref().map(pki::fingerprint).unwrap_or_default();
            router
                .admit_link(&peer_site, &fingerprint)
                .map_err(|e| e.to_string())?;
            let events: Arc<dyn Events> = router.clone();
            let mut tls = tls;
            tls.get_mut()
                .1
                .set_buffer_limit(Some(super::TLS_BUFFER_LIMIT));
            super::run(
                tls,
                version,
                router.site_name(),
                peer_site,
                Direction::Incoming,
                events,
            )
            .await
            .map_err(|e| e.to_string())
        }
        Some(frame::ALPN_GRANT) => redeem(tls, peer, router.as_ref()).await,
        _ => Err("no supported ALPN protocol".to_owned()),
    }
}

async fn redeem<A: Access>(
    tls: TlsStream<TcpStream>,
    peer: SocketAddr,
    router: &A,
) -> Result<(), String> {
    let mut stream = BufReader::new(tls);
    // Bytes, not a String: a request that is not UTF-8 gets a one-line refusal like any other
    // malformed one, instead of a dropped connection.
    let mut line = Vec::new();
    let mut limited = (&mut stream).take(MAX_REQUEST);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, limited.read_until(b'\n', &mut line))
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
    let mut out = serde_json::to_vec(&response).map_err(|e| e.to_string())?;
    out.push(b'\n');
    let tls = stream.get_mut();
    tls.write_all(&out).await.map_err(|e| e.to_string())?;
    tls.shutdown().await.map_err(|e| e.to_string())
}
