//! rustls configurations for links and token redemption: TLS 1.3 only, ring as the provider.
//!
//! The link-access port serves two ALPN ids. `skiff-link/1` needs a client certificate signed
//! by this site's CA; `skiff-grant/1` (token redemption) has none yet, which is the point of
//! redeeming, and is authorised by the token's secret code instead.

use std::sync::{Arc, RwLock};

pub mod handshakes;
pub mod identity;
pub mod records;
pub mod session;

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::{CryptoProvider, ring},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    version::TLS13,
};

use crate::{
    link::frame::{ALPN_GRANT, ALPN_LINK, ALPN_LINK_V1},
    pki::{self, CertKey},
};

/// Failure to build a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pki(#[from] pki::Error),
    #[error("failed to build the TLS configuration")]
    Rustls(#[from] rustls::Error),
    #[error("failed to build the client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("failed to build the server certificate verifier")]
    ServerVerifier(#[source] rustls::client::VerifierBuilderError),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in pki::certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// A server certificate that can be replaced while the server runs: connections already
/// established keep the certificate they were made with, new handshakes get the new one. This
/// is how certificates rotate without dropping a link or a stream.
#[derive(Debug)]
pub struct RotatingCert(RwLock<Arc<CertifiedKey>>);

impl RotatingCert {
    /// Starts with `identity`.
    ///
    /// # Errors
    /// When the certificate or key does not parse.
    pub fn new(identity: &CertKey) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(Self(RwLock::new(certified(identity)?))))
    }

    /// Replaces the certificate for every handshake from now on.
    ///
    /// # Errors
    /// When the certificate or key does not parse (the old one stays).
    pub fn set(&self, identity: &CertKey) -> Result<(), Error> {
        let new = certified(identity)?;
        *self.0.write().expect("certificate lock") = new;
        Ok(())
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.read().expect("certificate lock")))
    }
}

fn certified(identity: &CertKey) -> Result<Arc<CertifiedKey>, Error> {
    let key = provider()
        .key_provider
        .load_private_key(pki::key_from_pem(&identity.key_pem)?)?;
    Ok(Arc::new(CertifiedKey::new(
        pki::certs_from_pem(&identity.cert_pem)?,
        key,
    )))
}

/// The link-access server: presents the router identity (rotatable); accepts client
/// certificates signed by `site_ca_pem` and, for token redemption only, no certificate at all.
///
/// # Errors
/// When the CA does not parse.
pub fn server_config(
    identity: Arc<RotatingCert>,
    site_ca_pem: &str,
) -> Result<Arc<ServerConfig>, Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(site_ca_pem)?, provider())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    // The acceptor's order decides: the newest link version both sides speak.
    config.alpn_protocols = vec![
        ALPN_LINK.to_vec(),
        ALPN_LINK_V1.to_vec(),
        ALPN_GRANT.to_vec(),
    ];
    // skiff seals and opens the records itself after the handshake (`records`), with the
    // secrets rustls hands over; a session ticket would need a record rustls seals.
    config.enable_secret_extraction = true;
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The dialing side of a link: trusts only the peer site's CA and presents `credential`.
///
/// # Errors
/// When a certificate or key does not parse.
pub fn link_client_config(
    peer_ca_pem: &str,
    credential: &CertKey,
) -> Result<Arc<ClientConfig>, Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .with_root_certificates(roots(peer_ca_pem)?)
        .with_client_auth_cert(
            pki::certs_from_pem(&credential.cert_pem)?,
            pki::key_from_pem(&credential.key_pem)?,
        )?;
    config.alpn_protocols = vec![ALPN_LINK.to_vec(), ALPN_LINK_V1.to_vec()];
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The redeeming side of a token: trusts only the issuer's CA from the token, no certificate.
///
/// # Errors
/// When the CA does not parse.
pub fn grant_client_config(issuer_ca_pem: &str) -> Result<Arc<ClientConfig>, Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .with_root_certificates(roots(issuer_ca_pem)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_GRANT.to_vec()];
    Ok(Arc::new(config))
}

/// A TLS listener towards workloads: presents `identity` (issued by the site's service CA,
/// rotatable); with `clients` (a CA and an identity URI), requires a client certificate signed
/// by that CA and naming that URI ([`identity`]). TLS 1.2 and 1.3, since workloads bring
/// their own TLS stacks.
///
/// # Errors
/// When a certificate or key does not parse.
pub fn service_server_config(
    identity: Arc<RotatingCert>,
    clients: Option<(&str, String)>,
) -> Result<Arc<ServerConfig>, Error> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match clients {
        Some((ca, uri)) => builder.with_client_cert_verifier(Arc::new(identity::ClientFor {
            inner: WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider()).build()?,
            uri,
        })),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_cert_resolver(identity)))
}

/// The router's side of a TLS connector: trusts only `ca_pem` for the backend's certificate
/// and, with `backend_uri`, only a certificate that names it ([`identity`]); presents `client`
/// when given.
///
/// # Errors
/// When the CA, the certificate or the key does not parse.
pub fn service_client_config(
    ca_pem: &str,
    backend_uri: Option<String>,
    client: Option<&CertKey>,
) -> Result<Arc<ClientConfig>, Error> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match backend_uri {
        Some(uri) => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots(ca_pem)?,
                provider(),
            )
            .build()
            .map_err(Error::ServerVerifier)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(identity::ServerFor { inner, uri }))
        }
        None => builder.with_root_certificates(roots(ca_pem)?),
    };
    let config = match client {
        Some(pair) => builder.with_client_auth_cert(
            pki::certs_from_pem(&pair.cert_pem)?,
            pki::key_from_pem(&pair.key_pem)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Fills `buf` from the provider's secure random source.
///
/// # Errors
/// When the system random source fails.
pub fn random(buf: &mut [u8]) -> Result<(), rustls::Error> {
    ring::default_provider()
        .secure_random
        .fill(buf)
        .map_err(|_| rustls::Error::FailedToGetRandomBytes)
}
