//! The site's certificates: the router identity served at link access, and service TLS for
//! listeners and connectors (the service CA, user-supplied certificates, bundles). Rotation
//! replaces the certificates this site issued; a user's own are the user's to renew.

use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

use tokio_rustls::TlsAcceptor;
use tracing::info;

use crate::{
    forward::BackendTls,
    pki::{self, CertKey},
    service::{Connector, ConnectorTls, Listener, ListenerTls},
    site::{self, SiteConfig, StateDir},
    tls,
};

/// A certificate that could not be issued, read, stored or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ALPN id {0:?} must be 1-255 bytes")]
    Alpn(String),
    #[error("a certificate file needs its key file, and the other way round")]
    HalfPair,
    #[error("failed to read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] pki::Error),
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("failed to issue {what}")]
    Issue {
        what: &'static str,
        #[source]
        source: pki::Error,
    },
    #[error("failed to store the new router identity")]
    Store(#[source] site::Error),
}

/// A TLS listener's acceptor, and its certificate when this site issued it (rotation
/// replaces only those).
pub struct ListenerTlsSetup {
    pub acceptor: TlsAcceptor,
    pub rotating: Option<Arc<tls::RotatingCert>>,
}

impl std::fmt::Debug for ListenerTlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTlsSetup").finish_non_exhaustive()
    }
}

/// The CAs and the router identity.
#[derive(Debug)]
pub struct Certs {
    config: SiteConfig,
    state: StateDir,
    /// The site CA: signs router identities and link credentials.
    ca: CertKey,
    /// Signs TLS listeners' certificates and the bundles for workloads and backends.
    service_ca: CertKey,
    /// The router identity served at link access (replaced on rotation).
    link_cert: Arc<tls::RotatingCert>,
    /// When the router identity expires (Unix seconds; 0 if it cannot be read).
    identity_expires_at: AtomicI64,
}

impl Certs {
    /// Reads the CAs and the router identity from `state`.
    ///
    /// # Errors
    /// When a file cannot be read or a certificate does not parse.
    pub fn load(config: &SiteConfig, state: &StateDir) -> Result<Self, crate::app::Error> {
        let ca = state.cert_key("ca")?;
        let identity = state.cert_key("router")?;
        Ok(Self {
            service_ca: state.service_ca(&config.name)?,
            link_cert: tls::RotatingCert::new(&identity)?,
            identity_expires_at: AtomicI64::new(pki::not_after(&identity.cert_pem).unwrap_or(0)),
            config: config.clone(),
            state: state.clone(),
            ca,
        })
    }

    /// The site CA.
    #[must_use]
    pub fn ca(&self) -> &CertKey {
        &self.ca
    }

    /// The TLS configuration of link access: the router identity, peers' credentials checked
    /// against the site CA.
    ///
    /// # Errors
    /// When the CA does not parse.
    pub fn link_access_config(&self) -> Result<Arc<rustls::ServerConfig>, tls::Error> {
        tls::server_config(Arc::clone(&self.link_cert), &self.ca.cert_pem)
    }

    /// When the router identity expires (Unix seconds).
    #[must_use]
    pub fn identity_expires_at(&self) -> i64 {
        self.identity_expires_at.load(Ordering::Relaxed)
    }

    /// How long until the router identity expires, in seconds (negative once it has).
    #[must_use]
    pub fn identity_left_secs(&self) -> i64 {
        self.identity_expires_at() - time::OffsetDateTime::now_utc().unix_timestamp()
    }

    /// Replaces the router identity with a new one from the site CA, stored first. Returns its
    /// common name. Established links keep the certificate they were made with.
    ///
    /// # Errors
    /// When issuing, storing or installing the new identity fails.
    pub async fn rotate_identity(&self) -> Result<String, Error> {
        let identity = pki::issue_for(
            &self.ca,
            &self.config.name,
            &site::router_sans(&self.config),
            pki::Usage::ServerAndClient,
            self.config.cert_lifetime(),
        )
        .map_err(|source| Error::Issue {
            what: "a new router identity",
            source,
        })?;
        let (state, pair) = (self.state.clone(), identity.clone());
        tokio::task::spawn_blocking(move || state.write_cert_key("router", &pair))
            .await
            .map_err(|e| {
                Error::Store(site::Error::Io {
                    path: self.state.file("router.crt"),
                    source: std::io::Error::other(e),
                })
            })?
            .map_err(Error::Store)?;
        self.link_cert.set(&identity)?;
        self.identity_expires_at.store(
            pki::not_after(&identity.cert_pem).unwrap_or(0),
            Ordering::Relaxed,
        );
        let common_name = pki::certs_from_pem(&identity.cert_pem)?
            .first()
            .and_then(pki::common_name)
            .unwrap_or_default();
        info!(identity = %common_name, "router identity rotated");
        Ok(common_name)
    }

    /// The acceptor of a TLS listener: a certificate from the service CA for the names a
    /// workload may use to reach it (or the user's own), and the service CA as client CA when
    /// it checks clients.
    ///
    /// # Errors
    /// When an ALPN id is empty or too long, the user's files do not read or validate, or
    /// issuing fails.
    pub fn listener_tls(
        &self,
        spec: &Listener,
        tls: &ListenerTls,
    ) -> Result<ListenerTlsSetup, Error> {
        if let Some(bad) = tls.alpn.iter().find(|p| !(1..=255).contains(&p.len())) {
            return Err(Error::Alpn(bad.clone()));
        }
        let user = user_pair(
            tls.cert_file.as_deref(),
            tls.key_file.as_deref(),
            pki::Usage::Server,
        )?;
        let identity = match &user {
            Some(pair) => pair.clone(),
            None => self.listener_identity(spec)?,
        };
        let cert = tls::RotatingCert::new(&identity)?;
        // A client bundle opens only the listener it was made for.
        let clients = tls.require_client_cert.then(|| {
            (
                self.service_ca.cert_pem.as_str(),
                tls::identity::listener_uri(&self.config.name, &spec.name),
            )
        });
        let mut config = tls::service_server_config(Arc::clone(&cert), clients)?;
        if !tls.alpn.is_empty() {
            // Offered in this order; the protocol agreed goes with the stream to the connector.
            let mut with_alpn = (*config).clone();
            with_alpn.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
            config = Arc::new(with_alpn);
        }
        Ok(ListenerTlsSetup {
            acceptor: TlsAcceptor::from(config),
            rotating: user.is_none().then_some(cert),
        })
    }

    /// A new certificate for a TLS listener, from the service CA, for the names a workload
    /// may use to reach it.
    ///
    /// # Errors
    /// When issuing fails.
    pub fn listener_identity(&self, spec: &Listener) -> Result<CertKey, Error> {
        let mut sans = vec![
            spec.routing_key.clone(),
            spec.name.clone(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        if !matches!(spec.host.as_str(), "0.0.0.0" | "::" | "[::]") {
            sans.push(spec.host.trim_matches(['[', ']']).to_owned());
        }
        sans.sort();
        sans.dedup();
        pki::issue_for(
            &self.service_ca,
            &spec.routing_key,
            &sans,
            pki::Usage::Server,
            self.config.cert_lifetime(),
        )
        .map_err(|source| Error::Issue {
            what: "its certificate",
            source,
        })
    }

    /// How a TLS connector reaches its backend: the CA it trusts (the service CA, or the PEM
    /// file given) and the name the backend's certificate must carry.
    ///
    /// # Errors
    /// When a file does not read, the user's pair does not validate, or the server name is
    /// not one.
    pub fn connector_tls(
        &self,
        connector: &Connector,
        tls: &ConnectorTls,
    ) -> Result<BackendTls, Error> {
        // With the service CA, which signs every listener's and bundle's certificate, only
        // the certificate made for this connector's backend will do; a CA of the user's own
        // is theirs to scope.
        let (ca_pem, backend_uri) = match &tls.ca_file {
            Some(path) => (read(path)?, None),
            None => (
                self.service_ca.cert_pem.clone(),
                Some(tls::identity::connector_uri(
                    &self.config.name,
                    &connector.name,
                )),
            ),
        };
        let client = user_pair(
            tls.cert_file.as_deref(),
            tls.key_file.as_deref(),
            pki::Usage::Client,
        )?;
        let config = tls::service_client_config(&ca_pem, backend_uri, client.as_ref())?;
        let name = tls
            .server_name
            .clone()
            .unwrap_or_else(|| connector.host.clone());
        let server_name =
            rustls::pki_types::ServerName::try_from(name.trim_matches(['[', ']']).to_owned())
                .map_err(|_| Error::ServerName(name))?;
        Ok(BackendTls {
            config,
            server_name,
        })
    }

    /// A bundle for a workload that is a client of TLS listener `listener`: the service CA,
    /// and a new certificate and key signed by it. The key is handed over, never kept.
    ///
    /// # Errors
    /// When issuing fails.
    pub fn client_bundle(&self, listener: &Listener) -> Result<Bundle, Error> {
        let pair = pki::issue_with_uri(
            &self.service_ca,
            &format!("client of {}", listener.routing_key),
            &[],
            &tls::identity::listener_uri(&self.config.name, &listener.name),
            pki::Usage::Client,
        );
        self.bundle(pair)
    }

    /// A bundle for the backend (the server) of TLS connector `connector`.
    ///
    /// # Errors
    /// When issuing fails.
    pub fn server_bundle(&self, connector: &Connector) -> Result<Bundle, Error> {
        let mut sans = vec![connector.host.trim_matches(['[', ']']).to_owned()];
        if let Some(n) = connector.tls.as_ref().and_then(|t| t.server_name.clone()) {
            sans.push(n);
        }
        let pair = pki::issue_with_uri(
            &self.service_ca,
            &sans[0],
            &sans,
            &tls::identity::connector_uri(&self.config.name, &connector.name),
            pki::Usage::Server,
        );
        self.bundle(pair)
    }

    fn bundle(&self, pair: Result<CertKey, pki::Error>) -> Result<Bundle, Error> {
        let pair = pair.map_err(|source| Error::Issue {
            what: "the bundle's certificate",
            source,
        })?;
        Ok(Bundle {
            ca: self.service_ca.cert_pem.clone(),
            cert: pair.cert_pem,
            key: pair.key_pem,
        })
    }
}

/// A service CA, certificate and key, for a workload or backend.
#[derive(Debug, serde::Serialize)]
pub struct Bundle {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

fn read(path: &str) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads and validates a user-supplied certificate and key (both files, or neither).
fn user_pair(
    cert: Option<&str>,
    key: Option<&str>,
    usage: pki::Usage,
) -> Result<Option<CertKey>, Error> {
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        _ => return Err(Error::HalfPair),
    };
    let pair = CertKey {
        cert_pem: read(cert)?,
        key_pem: read(key)?,
    };
    pki::validate_service(&pair, usage)?;
    Ok(Some(pair))
}
