//! The router's certificates: service TLS for listeners and connectors (the service CA,
//! user-supplied certificates, bundles), rotation and renewal, and revocation of the link
//! credentials this site signed.

use super::*;

impl Router {
    /// Revokes every link credential this site signed for `site` and cuts its links at once;
    /// the site's dialers are refused from then on, until it redeems a new token.
    pub(super) fn revoke(&self, site: &str) -> Result<serde_json::Value, String> {
        let (revoked, links, stopped) = {
            let mut inner = self.inner.lock().expect("router lock");
            let revoked = inner.credentials.revoke(site);
            self.state
                .write_json("credentials.json", &inner.credentials)
                .map_err(|e| format!("failed to record the revocation: {e}"))?;
            inner.revoked.insert(site.to_owned());
            self.state
                .write_json("revoked.json", &inner.revoked)
                .map_err(|e| format!("failed to record the revocation: {e}"))?;
            // Whichever side dialled: every connection to the site goes.
            let links = self.forwarding.links_to(site);
            // Links this site dials to it stop dialling.
            let mut stopped = Vec::new();
            for (name, outgoing) in &mut inner.outgoing {
                if outgoing.config.peer_site == site {
                    outgoing.tasks.drain(..).for_each(|t| t.abort());
                    outgoing.denied = Some(format!("site {site} was revoked here"));
                    stopped.push(name.clone());
                }
            }
            (revoked, links, stopped)
        };
        self.exclude_revoked();
        for link in &links {
            link.shut(format!("the site {site} was revoked"));
        }
        info!(%site, revoked, closed = links.len(), stopped = stopped.len(), "site revoked");
        Ok(json!({
            "site": site,
            "revokedCredentials": revoked,
            "closedConnections": links.len(),
            "stoppedLinks": stopped,
        }))
    }

    /// Whether `site` is revoked here.
    pub(super) fn is_revoked(&self, site: &str) -> bool {
        self.inner
            .lock()
            .expect("router lock")
            .revoked
            .contains(site)
    }

    /// Ends the revocation of `site` (invited again, or linked to anew).
    pub(super) fn unrevoke(&self, site: &str) -> Result<(), String> {
        {
            let mut inner = self.inner.lock().expect("router lock");
            if !inner.revoked.remove(site) {
                return Ok(());
            }
            self.state
                .write_json("revoked.json", &inner.revoked)
                .map_err(|e| format!("failed to record that {site} is no longer revoked: {e}"))?;
        }
        self.exclude_revoked();
        Ok(())
    }

    /// Tells routing and forwarding which sites are revoked: routing neither sends to them
    /// nor through them, forwarding refuses streams from and to them.
    pub(super) fn exclude_revoked(&self) {
        let revoked = self.inner.lock().expect("router lock").revoked.clone();
        self.forwarding.set_revoked(revoked.clone());
        self.routing.lock().expect("routing lock").exclude(revoked);
    }

    /// The TLS acceptor of a TLS listener: a certificate from the service CA for the names a
    /// workload may use to reach it, and the service CA as client CA when it checks clients.
    pub(super) fn listener_tls(
        &self,
        spec: &Listener,
        tls: &ListenerTls,
    ) -> Result<(TlsAcceptor, Option<Arc<tls::RotatingCert>>), String> {
        if let Some(bad) = tls.alpn.iter().find(|p| !(1..=255).contains(&p.len())) {
            return Err(format!(
                "listener {}: ALPN id {bad:?} must be 1-255 bytes",
                spec.name
            ));
        }
        let user = user_pair(
            tls.cert_file.as_deref(),
            tls.key_file.as_deref(),
            pki::Usage::Server,
        )
        .map_err(|e| format!("listener {}: {e}", spec.name))?;
        let identity = match &user {
            Some(pair) => pair.clone(),
            None => self.listener_identity(spec)?,
        };
        let cert = tls::RotatingCert::new(&identity)
            .map_err(|e| format!("listener {}: {e}", spec.name))?;
        // A client bundle opens only the listener it was made for.
        let clients = tls.require_client_cert.then(|| {
            (
                self.service_ca.cert_pem.as_str(),
                tls::identity::listener_uri(&self.config.name, &spec.name),
            )
        });
        let mut config = tls::service_server_config(Arc::clone(&cert), clients)
            .map_err(|e| format!("listener {}: {e}", spec.name))?;
        if !tls.alpn.is_empty() {
            // Offered in this order; the protocol agreed goes with the stream to the connector.
            let mut with_alpn = (*config).clone();
            with_alpn.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
            config = Arc::new(with_alpn);
        }
        // A user's certificate is the user's to renew; rotation replaces only ours.
        Ok((TlsAcceptor::from(config), user.is_none().then_some(cert)))
    }

    /// A new certificate for a TLS listener, from the service CA, for the names a workload
    /// may use to reach it.
    pub(super) fn listener_identity(&self, spec: &Listener) -> Result<CertKey, String> {
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
        let identity = pki::issue_for(
            &self.service_ca,
            &spec.routing_key,
            &sans,
            pki::Usage::Server,
            self.config.cert_lifetime(),
        )
        .map_err(|e| {
            format!(
                "listener {}: failed to issue its certificate: {e}",
                spec.name
            )
        })?;
        Ok(identity)
    }

    /// Replaces the router identity (served at link access) and every TLS listener's
    /// certificate with new ones from the same CAs. Established links and streams keep going on
    /// the certificates they were made with; new handshakes get the new ones.
    pub(super) fn rotate_certs(&self) -> Result<serde_json::Value, String> {
        let identity = pki::issue_for(
            &self.ca,
            &self.config.name,
            &site::router_sans(&self.config),
            pki::Usage::ServerAndClient,
            self.config.cert_lifetime(),
        )
        .map_err(|e| format!("failed to issue a new router identity: {e}"))?;
        self.state
            .write_cert_key("router", &identity)
            .map_err(|e| format!("failed to store the new router identity: {e}"))?;
        self.link_cert
            .set(&identity)
            .map_err(|e| format!("failed to install the new router identity: {e}"))?;
        let listeners: Vec<(Listener, Arc<tls::RotatingCert>)> = {
            let inner = self.inner.lock().expect("router lock");
            inner
                .listeners
                .values()
                .filter_map(|l| l.cert.as_ref().map(|c| (l.spec.clone(), Arc::clone(c))))
                .collect()
        };
        for (spec, cert) in &listeners {
            let new = self.listener_identity(spec)?;
            cert.set(&new)
                .map_err(|e| format!("listener {}: {e}", spec.name))?;
        }
        info!(listeners = listeners.len(), "certificates rotated");
        Ok(json!({
            "routerIdentity": pki::common_name(
                pki::certs_from_pem(&identity.cert_pem)
                    .ok()
                    .and_then(|c| c.into_iter().next())
                    .as_ref()
                    .ok_or("the new identity does not parse")?
            ),
            "listeners": listeners.len(),
        }))
    }

    /// How a TLS connector reaches its backend: the CA it trusts (the service CA, or the PEM
    /// file given) and the name the backend's certificate must carry.
    pub(super) fn connector_tls(
        &self,
        connector: &Connector,
        tls: &ConnectorTls,
    ) -> Result<crate::forward::BackendTls, String> {
        let what = |e: &dyn std::fmt::Display| format!("connector {}: {e}", connector.name);
        // With the service CA, which signs every listener's and bundle's certificate, only
        // the certificate made for this connector's backend will do; a CA of the user's own
        // is theirs to scope.
        let (ca_pem, backend_uri) = match &tls.ca_file {
            Some(path) => (
                std::fs::read_to_string(path)
                    .map_err(|e| what(&format!("failed to read the CA file {path}: {e}")))?,
                None,
            ),
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
        )
        .map_err(|e| what(&e))?;
        let config = tls::service_client_config(&ca_pem, backend_uri, client.as_ref())
            .map_err(|e| what(&e))?;
        let name = tls
            .server_name
            .clone()
            .unwrap_or_else(|| connector.host.clone());
        let server_name =
            rustls::pki_types::ServerName::try_from(name.trim_matches(['[', ']']).to_owned())
                .map_err(|e| what(&format!("{name:?} is not a valid TLS server name: {e}")))?;
        Ok(crate::forward::BackendTls {
            config,
            server_name,
        })
    }

    /// A bundle for a workload (a client of TLS listener `name`) or a backend (the server of
    /// TLS connector `name`): the service CA, and a new certificate and key signed by it. The
    /// key is handed over, never kept.
    pub(super) fn service_bundle(
        &self,
        kind: admin::BundleKind,
        name: &str,
    ) -> Result<serde_json::Value, String> {
        let inner = self.inner.lock().expect("router lock");
        let pair = match kind {
            admin::BundleKind::Client => {
                let listener = inner
                    .listeners
                    .get(name)
                    .ok_or_else(|| format!("no listener named {name}"))?;
                pki::issue_with_uri(
                    &self.service_ca,
                    &format!("client of {}", listener.spec.routing_key),
                    &[],
                    &tls::identity::listener_uri(&self.config.name, name),
                    pki::Usage::Client,
                )
            }
            admin::BundleKind::Server => {
                let connector = inner
                    .connectors
                    .get(name)
                    .ok_or_else(|| format!("no connector named {name}"))?;
                let mut sans = vec![connector.host.trim_matches(['[', ']']).to_owned()];
                if let Some(n) = connector.tls.as_ref().and_then(|t| t.server_name.clone()) {
                    sans.push(n);
                }
                pki::issue_with_uri(
                    &self.service_ca,
                    &sans[0],
                    &sans,
                    &tls::identity::connector_uri(&self.config.name, name),
                    pki::Usage::Server,
                )
            }
        }
        .map_err(|e| format!("failed to issue the bundle's certificate: {e}"))?;
        Ok(json!({
            "ca": self.service_ca.cert_pem,
            "cert": pair.cert_pem,
            "key": pair.key_pem,
        }))
    }
}

/// Reads and validates a user-supplied certificate and key (both files, or neither).
fn user_pair(
    cert: Option<&str>,
    key: Option<&str>,
    usage: pki::Usage,
) -> Result<Option<CertKey>, String> {
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        _ => return Err("a certificate file needs its key file, and the other way round".into()),
    };
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|e| format!("failed to read {path}: {e}"))
    };
    let pair = CertKey {
        cert_pem: read(cert)?,
        key_pem: read(key)?,
    };
    pki::validate_service(&pair, usage).map_err(|e| e.to_string())?;
    Ok(Some(pair))
}

/// Renews the router identity and TLS listeners' certificates (`rotate_certs`) whenever the
/// identity has less than a third of the site's certificate lifetime left, including at start
/// when it is already that old (or expired: a router down for a long time comes back valid).
pub(super) async fn renew_certificates(router: Arc<Router>) {
    let lifetime = router.config.cert_lifetime().whole_seconds().max(3);
    // Look ten times per lifetime, but never more than once a second or less than hourly.
    let every = Duration::from_secs(u64::try_from(lifetime / 10).unwrap_or(1).clamp(1, 3_600));
    loop {
        let expires = router
            .state
            .cert_key("router")
            .ok()
            .and_then(|identity| pki::not_after(&identity.cert_pem));
        let left = expires.map_or(0, |t| t - time::OffsetDateTime::now_utc().unix_timestamp());
        if left < lifetime / 3 {
            match router.rotate_certs() {
                Ok(_) => info!(left_secs = left, "certificates renewed before expiry"),
                Err(e) => warn!(error = %e, "certificate renewal failed; retrying"),
            }
        }
        tokio::time::sleep(every).await;
    }
}
