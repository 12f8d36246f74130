//! Links at the control level: the outgoing links this site dials (and their credentials in
//! `STATE/links/`), the grants it issued and the credentials it signed for others, the sites
//! it revoked, and what happens when a link comes up, goes down or speaks.
//!
//! Its table is behind one `Mutex`, held for lookups and changes only; the state files are
//! written after it is let go, each taking turns on its own lock ([`StateFile`]). It calls
//! into forwarding and the network with the table let go, except for reads of forwarding's
//! link table (a leaf lock).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Serialize;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::{certs::Certs, network::Network};

/// How long `link revoke` waits for the revoked site's connections to be gone.
const GONE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
use crate::{
    forward::Forwarding,
    link::{
        self, Events, Link, Open,
        access::{Access, Refused},
        dial::{self, LinkConfig},
        frame::LinkState,
        stream::{StreamRx, StreamTx},
    },
    metrics,
    pki::{self, CertKey},
    policy::{self, Gate},
    service,
    site::{self, SiteConfig, StateDir, StateFile},
    tls::{
        self,
        handshakes::{self, Endpoint, Failure, Handshakes},
    },
    token::{self, Credentials, Grant, Grants, RedeemRequest, RedeemResponse, Token},
};

/// A link, token or revocation request that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this site accepts no links: create it with --link-access HOST:PORT")]
    NoLinkAccess,
    #[error("failed to draw random bytes for the token")]
    Random(#[source] rustls::Error),
    #[error(transparent)]
    Grant(#[from] token::GrantError),
    #[error("failed to record {what}")]
    Store {
        what: String,
        #[source]
        source: site::Error,
    },
    #[error("this token was issued by this site; redeem it at another site")]
    OwnToken,
    #[error(transparent)]
    Denied(#[from] policy::Denied),
    #[error(transparent)]
    Redeem(#[from] dial::Error),
    #[error("a site cannot link to itself")]
    SelfLink,
    #[error("invalid address {0:?}: expected HOST:PORT")]
    BadAddress(String),
    #[error("link {0} already exists")]
    Exists(String),
    #[error("link {name}")]
    Credential {
        name: String,
        #[source]
        source: pki::Error,
    },
    #[error("no grant {0}")]
    NoGrant(String),
    #[error("no link named {0}")]
    NotFound(String),
}

struct OutgoingRt {
    config: LinkConfig,
    tasks: Vec<AbortHandle>,
    /// Why the site policy (or a revocation) keeps this link from being dialled (no tasks run
    /// then).
    denied: Option<String>,
    /// Connections its dialers have established. Each dialer holds one at a time, so every
    /// one past the first `connections` replaces one that was lost: a reconnect.
    established: u64,
}

struct Table {
    outgoing: BTreeMap<String, OutgoingRt>,
    grants: Grants,
    /// Link credentials this site signed, and which of them are revoked.
    credentials: Credentials,
    /// Sites revoked here (`STATE/revoked.json`): no link to or from them, no stream from or
    /// to them, until they are invited again or a link to them is made anew.
    revoked: BTreeSet<String>,
}

/// Outgoing links, grants, credentials and revocations.
pub struct Links {
    site: String,
    link_access: Option<String>,
    state: StateDir,
    table: Mutex<Table>,
    grants_file: StateFile,
    credentials_file: StateFile,
    revoked_file: StateFile,
    /// The link-access address actually bound (the configured port may be 0).
    bound: OnceLock<SocketAddr>,
    /// Link connections refused after their TLS handshake (revoked, too many, policy).
    refused: AtomicU64,
    /// Link-access and dialled handshakes.
    handshakes: Arc<Handshakes>,
    /// Link connections lost and re-established, by peer and direction (kept while the router
    /// runs, so that the counters do not vanish with the peer's last connection).
    churn: Mutex<BTreeMap<(String, &'static str), Churn>>,
    forwarding: Arc<Forwarding>,
    network: Arc<Network>,
    gate: Arc<Gate>,
    certs: Arc<Certs>,
}

/// One peer and direction's link connections that ended, and the outgoing ones established to
/// replace a lost one (only the dialing side can tell a replacement from another connection).
#[derive(Debug, Default)]
struct Churn {
    lost: u64,
    reconnects: u64,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

/// One link, as `skiff link status` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkView {
    pub name: String,
    pub direction: &'static str,
    pub peer: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub connections: usize,
    /// The lowest version any connection agreed on: what the link as a whole can carry.
    pub protocol_version: Option<u16>,
    pub rtt_micros: Option<u64>,
    pub streams: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// What a revocation did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Revoked {
    pub site: String,
    pub revoked_credentials: usize,
    pub closed_connections: usize,
    pub stopped_links: Vec<String>,
}

/// What a new site policy did to the links.
#[derive(Debug, Default)]
pub struct PolicyEffect {
    pub closed: Vec<String>,
    pub stopped: Vec<String>,
    pub resumed: Vec<String>,
}

impl Links {
    /// The links of the site in `state`, with the grants, credentials and revocations stored
    /// there.
    ///
    /// # Errors
    /// When a state file cannot be read.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        config: &SiteConfig,
        state: &StateDir,
        forwarding: Arc<Forwarding>,
        network: Arc<Network>,
        gate: Arc<Gate>,
        certs: Arc<Certs>,
    ) -> Result<Self, site::Error> {
        let table = Table {
            outgoing: BTreeMap::new(),
            grants: Grants::new(state.read_json_or_default("grants.json")?),
            credentials: state.read_json_or_default("credentials.json")?,
            revoked: state.read_json_or_default("revoked.json")?,
        };
        Ok(Self {
            site: config.name.clone(),
            link_access: config.link_access.clone(),
            state: state.clone(),
            table: Mutex::new(table),
            grants_file: StateFile::new(state, "grants.json"),
            credentials_file: StateFile::new(state, "credentials.json"),
            revoked_file: StateFile::new(state, "revoked.json"),
            bound: OnceLock::new(),
            refused: AtomicU64::new(0),
            handshakes: Arc::default(),
            churn: Mutex::default(),
            forwarding,
            network,
            gate,
            certs,
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("links lock")
    }

    /// Records the address link access is bound to.
    pub fn set_bound(&self, addr: SocketAddr) {
        let _ = self.bound.set(addr);
    }

    /// Link connections refused after their handshake.
    #[must_use]
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Link connections lost and re-established so far, by peer and direction.
    #[must_use]
    pub fn churn(&self) -> Vec<metrics::LinkChurn> {
        self.churn
            .lock()
            .expect("churn lock")
            .iter()
            .map(|((peer, direction), c)| metrics::LinkChurn {
                peer: peer.clone(),
                direction,
                lost: c.lost,
                reconnects: c.reconnects,
            })
            .collect()
    }

    /// The link handshakes counted so far.
    #[must_use]
    pub fn handshakes(&self) -> [handshakes::Sample; 4] {
        self.handshakes.sample()
    }

    /// Starts the outgoing links stored in `STATE/links/`.
    pub fn restore(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(self.state.links_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".json") else {
                continue;
            };
            match self.load_link(name) {
                Ok((config, key)) => self.start_link(config, key),
                Err(e) => warn!(link = name, error = %e, "failed to restore link"),
            }
        }
    }

    fn load_link(&self, name: &str) -> Result<(LinkConfig, String), site::Error> {
        let config: LinkConfig = self.state.read_json(&format!("links/{name}.json"))?;
        let path = self.state.links_dir().join(format!("{name}.key"));
        let key =
            std::fs::read_to_string(&path).map_err(|source| site::Error::Io { path, source })?;
        Ok((config, key))
    }

    /// Starts (or restarts) the dialers of an outgoing link, unless the policy or a
    /// revocation keeps it from being dialled.
    fn start_link(self: &Arc<Self>, config: LinkConfig, key: String) {
        let events: Arc<dyn Events> = Arc::clone(self) as Arc<dyn Events>;
        let host = site::host_of(&config.url).unwrap_or(&config.url).to_owned();
        let denied = self.gate.check(|p| p.outgoing_link(&host)).err();
        if let Some(denied) = &denied {
            self.gate.denied(denied, false);
        }
        let denied = denied.map(|d| d.to_string()).or_else(|| {
            self.is_revoked(&config.peer_site)
                .then(|| format!("site {} was revoked here", config.peer_site))
        });
        let dialers = if denied.is_some() {
            0
        } else {
            config.connections.max(1)
        };
        let tasks = (0..dialers)
            .map(|_| {
                tokio::spawn(dial::maintain(
                    config.clone(),
                    key.clone(),
                    self.site.clone(),
                    Arc::clone(&events),
                    Arc::clone(&self.handshakes),
                ))
                .abort_handle()
            })
            .collect();
        let name = config.name.clone();
        let old = self.table().outgoing.insert(
            name,
            OutgoingRt {
                config,
                tasks,
                denied,
                established: 0,
            },
        );
        if let Some(old) = old {
            old.tasks.iter().for_each(AbortHandle::abort);
        }
    }

    /// Issues a token for `redemptions` redemptions within `expiry_secs`; its grant is stored
    /// before the token is handed out.
    ///
    /// # Errors
    /// When this site accepts no links, or the grant cannot be made or stored.
    pub async fn issue_token(&self, redemptions: u32, expiry_secs: u64) -> Result<Token, Error> {
        let configured = self.link_access.as_deref().ok_or(Error::NoLinkAccess)?;
        // The configured host (the name peers reach us by), with the port actually bound.
        let host = site::host_of(configured).unwrap_or(configured);
        let port = self.bound.get().map_or(0, SocketAddr::port);
        let url = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut id = [0u8; 8];
        let mut code = [0u8; 24];
        tls::random(&mut id).map_err(Error::Random)?;
        tls::random(&mut code).map_err(Error::Random)?;
        let (id, code) = (token::hex(&id), token::hex(&code));
        let grant = Grant::new(code.clone(), redemptions, expiry_secs)?;
        self.table().grants.insert(id.clone(), grant);
        if let Err(source) = self.save_grants().await {
            // Not stored, so not handed out: a restart would forget it.
            self.table().grants.remove(&id);
            return Err(Error::Store {
                what: "the grant".into(),
                source,
            });
        }
        Ok(Token {
            url,
            grant: id,
            code,
            site: self.site.clone(),
            ca: self.certs.ca().cert_pem.clone(),
        })
    }

    /// Withdraws grant `id`: tokens from it are refused from now on.
    ///
    /// # Errors
    /// When there is no such grant, or the change cannot be stored.
    pub async fn delete_grant(&self, id: &str) -> Result<(), Error> {
        if !self.table().grants.remove(id) {
            return Err(Error::NoGrant(id.to_owned()));
        }
        self.save_grants().await.map_err(|source| Error::Store {
            what: "the grants".into(),
            source,
        })
    }

    async fn save_grants(&self) -> Result<(), site::Error> {
        self.grants_file
            .write(|| self.table().grants.to_store())
            .await
    }

    async fn save_credentials(&self) -> Result<(), site::Error> {
        self.credentials_file
            .write(|| self.table().credentials.clone())
            .await
    }

    async fn save_revoked(&self) -> Result<(), site::Error> {
        self.revoked_file
            .write(|| self.table().revoked.clone())
            .await
    }

    /// Redeems `token` at its issuing site and starts the link it gives. Returns the link's
    /// name.
    ///
    /// # Errors
    /// When the token is this site's own, the policy forbids its host, the issuer refuses,
    /// or the link cannot be stored.
    pub async fn redeem_token(
        self: &Arc<Self>,
        token: Token,
        name: Option<String>,
        cost: Option<u32>,
        connections: Option<u32>,
    ) -> Result<String, Error> {
        let name = name.unwrap_or_else(|| token.site.clone());
        if token.site == self.site {
            return Err(Error::OwnToken);
        }
        let host = site::host_of(&token.url).unwrap_or(&token.url).to_owned();
        if let Err(denied) = self.gate.check(|p| p.outgoing_link(&host)) {
            self.gate.denied(&denied, false);
            return Err(denied.into());
        }
        let (mut config, key) = dial::redeem(&token, &self.site, &name).await?;
        config.cost = cost.unwrap_or(config.cost);
        config.connections = connections.unwrap_or(config.connections);
        self.store_and_start_link(config, key).await?;
        Ok(name)
    }

    /// Keeps an outgoing link in the state directory (its key 0600) and starts its dialers.
    async fn store_and_start_link(
        self: &Arc<Self>,
        mut config: LinkConfig,
        key: String,
    ) -> Result<(), Error> {
        config.cost = config.cost.max(1);
        config.connections = config
            .connections
            .clamp(1, link::MAX_CONNECTIONS_PER_PEER as u32);
        let (state, stored, secret) = (self.state.clone(), config.clone(), key.clone());
        let written = tokio::task::spawn_blocking(move || {
            let name = &stored.name;
            site::write_atomic(
                &state.links_dir().join(format!("{name}.key")),
                secret.as_bytes(),
                0o600,
            )?;
            state.write_json(&format!("links/{name}.json"), &stored)
        })
        .await
        .unwrap_or_else(|e| {
            Err(site::Error::Io {
                path: self.state.links_dir(),
                source: std::io::Error::other(e),
            })
        });
        written.map_err(|source| Error::Store {
            what: format!("link {}", config.name),
            source,
        })?;
        // The operator linked to this site anew: it is no longer revoked here.
        self.unrevoke(&config.peer_site).await?;
        self.start_link(config, key);
        Ok(())
    }

    /// Stores and starts an outgoing link whose credential came with the request (checked
    /// first), as a redeemed token's would be.
    ///
    /// # Errors
    /// When the link is to this site, its address or credential is invalid, it exists, the
    /// policy forbids it, or it cannot be stored.
    pub async fn create_link(
        self: &Arc<Self>,
        config: LinkConfig,
        key: String,
    ) -> Result<(), Error> {
        let name = config.name.clone();
        if config.peer_site == self.site {
            return Err(Error::SelfLink);
        }
        if site::host_of(&config.url).is_none() {
            return Err(Error::BadAddress(config.url));
        }
        if self.table().outgoing.contains_key(&name) {
            return Err(Error::Exists(name));
        }
        let pair = CertKey {
            cert_pem: config.cert.clone(),
            key_pem: key,
        };
        pki::validate_link_credential(&pair, &config.ca, &self.site)
            .map_err(|source| Error::Credential { name, source })?;
        let host = site::host_of(&config.url).unwrap_or(&config.url).to_owned();
        if let Err(denied) = self.gate.check(|p| p.outgoing_link(&host)) {
            self.gate.denied(&denied, false);
            return Err(denied.into());
        }
        self.store_and_start_link(config, pair.key_pem).await
    }

    /// Stops an outgoing link's dialers and removes it from the state directory.
    ///
    /// # Errors
    /// When there is no such link.
    pub fn delete_link(&self, name: &str) -> Result<(), Error> {
        let link = self
            .table()
            .outgoing
            .remove(name)
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        link.tasks.iter().for_each(AbortHandle::abort);
        let _ = std::fs::remove_file(self.state.links_dir().join(format!("{name}.json")));
        let _ = std::fs::remove_file(self.state.links_dir().join(format!("{name}.key")));
        Ok(())
    }

    /// Revokes every link credential this site signed for `site` and cuts its links at once;
    /// the site's dialers are refused from then on, until it redeems a new token. The
    /// revocation is in force before it is stored: a failure to store it is reported, and
    /// the revocation holds until the router restarts.
    ///
    /// # Errors
    /// When the revocation cannot be stored.
    pub async fn revoke(&self, site: &str) -> Result<Revoked, Error> {
        let (revoked, stopped) = {
            let mut table = self.table();
            let revoked = table.credentials.revoke(site);
            table.revoked.insert(site.to_owned());
            // Links this site dials to it stop dialling.
            let mut stopped = Vec::new();
            for (name, outgoing) in &mut table.outgoing {
                if outgoing.config.peer_site == site {
                    outgoing.tasks.drain(..).for_each(|t| t.abort());
                    outgoing.denied = Some(format!("site {site} was revoked here"));
                    stopped.push(name.clone());
                }
            }
            (revoked, stopped)
        };
        self.exclude_revoked();
        // Whichever side dialled: every connection to the site goes.
        let links = self.forwarding.links_to(site);
        for link in &links {
            link.shut(format!("the site {site} was revoked"));
        }
        self.wait_gone(site, &links).await;
        let stored = match self.save_credentials().await {
            Ok(()) => self.save_revoked().await,
            Err(e) => Err(e),
        };
        stored.map_err(|source| Error::Store {
            what: "the revocation".into(),
            source,
        })?;
        info!(%site, revoked, closed = links.len(), stopped = stopped.len(), "site revoked");
        Ok(Revoked {
            site: site.to_owned(),
            revoked_credentials: revoked,
            closed_connections: links.len(),
            stopped_links: stopped,
        })
    }

    /// Waits, up to [`GONE_WITHIN`], until none of `links` to `site` is in the forwarding
    /// table any more: a link's task takes it out once its reader (or the io_uring worker
    /// carrying it) has let go, so that what was shut is gone when the command returns.
    async fn wait_gone(&self, site: &str, links: &[Arc<Link>]) {
        let deadline = tokio::time::Instant::now() + GONE_WITHIN;
        loop {
            let left = self.forwarding.links_to(site);
            if !left.iter().any(|l| links.iter().any(|s| Arc::ptr_eq(l, s))) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                warn!(%site, connections = left.len(), "link connections still closing after the revocation");
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Whether `site` is revoked here.
    #[must_use]
    pub fn is_revoked(&self, site: &str) -> bool {
        self.table().revoked.contains(site)
    }

    /// Ends the revocation of `site` (invited again, or linked to anew).
    async fn unrevoke(&self, site: &str) -> Result<(), Error> {
        if !self.table().revoked.remove(site) {
            return Ok(());
        }
        self.exclude_revoked();
        self.save_revoked().await.map_err(|source| Error::Store {
            what: format!("that {site} is no longer revoked"),
            source,
        })
    }

    /// Tells routing and forwarding which sites are revoked: routing neither sends to them
    /// nor through them, forwarding refuses streams from and to them.
    pub fn exclude_revoked(&self) {
        let revoked = self.table().revoked.clone();
        self.forwarding.set_revoked(revoked.clone());
        self.network.exclude(revoked);
    }

    /// Applies the policy now in force: incoming links from sites it no longer allows are
    /// closed; outgoing links to hosts it no longer allows stop, and resume when allowed
    /// again.
    pub fn apply_policy(self: &Arc<Self>) -> PolicyEffect {
        let mut effect = PolicyEffect::default();
        let incoming = self
            .forwarding
            .links()
            .into_iter()
            .flat_map(|(_, links)| links)
            .filter(|l| l.direction == link::Direction::Incoming);
        for link in incoming {
            if let Err(denied) = self.gate.check(|p| p.incoming_link(&link.peer)) {
                self.gate.denied(&denied, false);
                link.shut(denied.to_string());
                effect.closed.push(link.peer.clone());
            }
        }
        let outgoing: Vec<(String, String, bool)> = self
            .table()
            .outgoing
            .iter()
            .map(|(name, o)| (name.clone(), o.config.url.clone(), o.denied.is_some()))
            .collect();
        for (name, url, was_denied) in outgoing {
            let host = site::host_of(&url).unwrap_or(&url).to_owned();
            let now_denied = self.gate.check(|p| p.outgoing_link(&host)).is_err();
            if now_denied == was_denied {
                continue;
            }
            match self.load_link(&name) {
                // start_link checks the policy again and replaces (and stops) the old tasks.
                Ok((config, key)) => self.start_link(config, key),
                Err(e) => warn!(link = %name, error = %e, "failed to reload link"),
            }
            if now_denied {
                effect.stopped.push(name);
            } else {
                effect.resumed.push(name);
            }
        }
        effect
    }

    /// Every link: one row per outgoing link, one per site that dialled in.
    #[must_use]
    pub fn views(&self) -> Vec<LinkView> {
        let links: BTreeMap<String, Vec<Arc<Link>>> = self.forwarding.links().into_iter().collect();
        let outgoing: Vec<(String, String, Option<String>)> = self
            .table()
            .outgoing
            .iter()
            .map(|(name, o)| (name.clone(), o.config.peer_site.clone(), o.denied.clone()))
            .collect();
        let mut rows = Vec::new();
        // Each row counts only its own connections: those an outgoing link dialled, or those
        // a peer dialled in, never another link's to the same peer.
        for (name, peer, denied) in outgoing {
            let own: Vec<&Arc<Link>> = links
                .get(&peer)
                .into_iter()
                .flatten()
                .filter(|l| matches!(&l.direction, link::Direction::Outgoing(n) if *n == name))
                .collect();
            let mut row = link_view(name, "outgoing", peer, &own);
            if let Some(reason) = denied {
                row.status = "denied";
                row.reason = Some(reason);
            }
            rows.push(row);
        }
        for (peer, links) in &links {
            let incoming: Vec<&Arc<Link>> = links
                .iter()
                .filter(|l| l.direction == link::Direction::Incoming)
                .collect();
            if !incoming.is_empty() {
                rows.push(link_view(peer.clone(), "incoming", peer.clone(), &incoming));
            }
        }
        rows
    }

    /// Whether a redeemer may be given a link credential for site `name`. A site's name is its
    /// identity: it must be a DNS label, not this site's own, not held by a credential this
    /// site signed and has not revoked, and not linked here now. A name known elsewhere in the
    /// network is not refused: that is how a site adds a second path (docs/security.md says
    /// what a token holder can claim).
    fn name_available(&self, name: &str) -> Result<(), String> {
        if !service::is_dns_label(name) {
            return Err(format!(
                "site name {:?} is not valid: use 1 to {} lowercase letters, digits and '-'",
                name.chars().take(40).collect::<String>(),
                service::MAX_NAME
            ));
        }
        if name == self.site {
            return Err(self.name_refused(name, "the issuing site's own"));
        }
        let linked = !self.forwarding.links_to(name).is_empty();
        match name_taken(&self.table(), linked, name) {
            Some(why) => Err(self.name_refused(name, why)),
            None => Ok(()),
        }
    }

    fn name_refused(&self, name: &str, why: &str) -> String {
        format!(
            "site name {name} is {why}: a site's name is its identity and cannot be taken over; redeem as another site, or revoke {name} at {} first",
            self.site
        )
    }

    async fn redeem_request(&self, source: SocketAddr, request: RedeemRequest) -> RedeemResponse {
        // Before the grant is spent: a name that cannot be had, or a site the policy refuses,
        // keeps nothing from trying.
        if let Err(reason) = self.name_available(&request.site) {
            return RedeemResponse::error(reason);
        }
        if let Err(denied) = self.gate.check(|p| p.incoming_link(&request.site)) {
            self.gate.denied(&denied, false);
            return RedeemResponse::error(denied.to_string());
        }
        // The code is checked before anything is signed, and the redemption is spent only
        // once the credential can be kept: a refused request costs the grant nothing.
        let authorized = self
            .table()
            .grants
            .authorize(source.ip(), &request.grant, &request.code);
        if let Err(e) = authorized {
            return RedeemResponse::error(e.to_string());
        }
        let certificate = match pki::sign_csr(self.certs.ca(), &request.csr, &request.site) {
            Ok(certificate) => certificate,
            Err(e) => {
                return RedeemResponse::error(format!("certificate signing request refused: {e}"));
            }
        };
        let Some(der) = pki::certs_from_pem(&certificate)
            .ok()
            .and_then(|certs| certs.into_iter().next())
        else {
            return RedeemResponse::error("the signed certificate could not be read back");
        };
        let fingerprint = pki::fingerprint(&der);
        {
            // One lock for the second name check, the spend and the record: of two
            // redemptions racing for one name or one grant's last use, the second is refused.
            let linked = !self.forwarding.links_to(&request.site).is_empty();
            let mut table = self.table();
            if let Some(why) = name_taken(&table, linked, &request.site) {
                return RedeemResponse::error(self.name_refused(&request.site, why));
            }
            if let Err(e) = table.grants.spend(&request.grant) {
                return RedeemResponse::error(e.to_string());
            }
            table.credentials.issued(fingerprint.clone(), &request.site);
        }
        // The credential is recorded before the grant's use is: a failure leaves neither.
        if let Err(e) = self.save_credentials().await {
            let mut table = self.table();
            table.credentials.forget(&fingerprint);
            table.grants.refund(&request.grant);
            return RedeemResponse::error(format!(
                "failed to record the credential: {}",
                crate::node::error_chain(&e)
            ));
        }
        if let Err(e) = self.save_grants().await {
            warn!(error = %crate::node::error_chain(&e), "failed to persist grants");
        }
        // Invited again: no longer revoked here.
        if let Err(e) = self.unrevoke(&request.site).await {
            return RedeemResponse::error(crate::node::error_chain(&e));
        }
        RedeemResponse::Ok {
            certificate,
            ca: self.certs.ca().cert_pem.clone(),
            site: self.site.clone(),
        }
    }
}

/// Why `name` is held by a site this one knows, if it is.
fn name_taken(table: &Table, linked: bool, name: &str) -> Option<&'static str> {
    if table.credentials.holds(name) {
        Some("held by a credential this site signed")
    } else if linked {
        Some("linked to this site")
    } else {
        None
    }
}

fn link_view(
    name: String,
    direction: &'static str,
    peer: String,
    links: &[&Arc<Link>],
) -> LinkView {
    let open = || links.iter().filter(|l| !l.is_closed());
    let up = open().count();
    let sum = |f: fn(&Link) -> u64| links.iter().map(|l| f(l)).sum::<u64>();
    LinkView {
        name,
        direction,
        peer,
        status: if up > 0 { "up" } else { "down" },
        reason: None,
        connections: up,
        protocol_version: open().map(|l| l.version).min(),
        rtt_micros: links
            .iter()
            .map(|l| l.stats.rtt_us.load(Ordering::Relaxed))
            .min(),
        streams: links.iter().map(|l| l.stream_count()).sum(),
        bytes_in: sum(|l| l.stats.bytes_in.load(Ordering::Relaxed)),
        bytes_out: sum(|l| l.stats.bytes_out.load(Ordering::Relaxed)),
    }
}

impl Events for Links {
    fn link_up(&self, link: &Arc<Link>) {
        if self.is_revoked(&link.peer) {
            link.shut(format!("the site {} was revoked here", link.peer));
            return;
        }
        // admit_link counts before the handshake ends; connections racing past it stop here.
        let first = match self.forwarding.add_link(link) {
            Ok(first) => first,
            Err(e) => {
                link.shut(e.to_string());
                return;
            }
        };
        let (cost, reconnect) = match &link.direction {
            link::Direction::Outgoing(name) => {
                let mut table = self.table();
                table.outgoing.get_mut(name).map_or((1, false), |o| {
                    o.established += 1;
                    (
                        o.config.cost,
                        o.established > u64::from(o.config.connections.max(1)),
                    )
                })
            }
            link::Direction::Incoming => (1, false),
        };
        self.network.link_up(link, cost, first);
        let mut churn = self.churn.lock().expect("churn lock");
        let c = churn
            .entry((link.peer.clone(), link.direction.label()))
            .or_default();
        if reconnect {
            c.reconnects += 1;
        }
    }

    fn link_down(&self, link: &Arc<Link>) {
        if self.forwarding.remove_link(link) {
            self.network.link_down(&link.peer);
            let mut churn = self.churn.lock().expect("churn lock");
            churn
                .entry((link.peer.clone(), link.direction.label()))
                .or_default()
                .lost += 1;
        }
    }

    fn link_state(self: Arc<Self>, from: &Arc<Link>, state: LinkState) {
        self.network.receive(from, state);
    }

    fn open(self: Arc<Self>, _link: &Arc<Link>, open: Open, tx: StreamTx, rx: StreamRx) {
        let forwarding = Arc::clone(&self.forwarding);
        tokio::spawn(async move { forwarding.serve_stream(open, tx, rx).await });
    }

    fn carrier(&self) -> Option<Arc<dyn link::Carrier>> {
        self.forwarding.datapath().carrier()
    }

    fn dial<'a>(
        &'a self,
        url: &'a str,
    ) -> futures::future::BoxFuture<'a, std::io::Result<tokio::net::TcpStream>> {
        Box::pin(self.forwarding.datapath().dial(url))
    }
}

impl Access for Links {
    fn site_name(&self) -> &str {
        &self.site
    }

    fn handshake(&self, outcome: Result<(), Failure>) {
        self.handshakes.count(Endpoint::LinkAccess, outcome);
    }

    fn admit_link(&self, peer_site: &str, fingerprint: &str) -> Result<(), Refused> {
        let admitted = (|| {
            {
                let table = self.table();
                if table.credentials.is_revoked(fingerprint) || table.revoked.contains(peer_site) {
                    return Err(Refused::Revoked(peer_site.to_owned()));
                }
            }
            let open = self.forwarding.links_to(peer_site).len();
            if open >= link::MAX_CONNECTIONS_PER_PEER {
                return Err(Refused::TooMany {
                    site: peer_site.to_owned(),
                    open,
                });
            }
            self.gate
                .check(|p| p.incoming_link(peer_site))
                .map_err(|denied| {
                    self.gate.denied(&denied, false);
                    Refused::Denied(denied)
                })
        })();
        if admitted.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    fn redeem(
        &self,
        source: SocketAddr,
        request: RedeemRequest,
    ) -> impl Future<Output = RedeemResponse> + Send {
        self.redeem_request(source, request)
    }
}
