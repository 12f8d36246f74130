//! Linking sites through the API, so that linking two clusters is `kubectl apply` on both
//! sides: an AccessGrant becomes a grant in this site's router, and its token an AccessToken
//! manifest (`token.yaml`) in the Secret `skiff-token-<grant>`, ready to apply at the other
//! site; an AccessToken is redeemed once, for a link named as a Listener would be
//! (`NS-NAME`); a Link is made from the credential in its `tlsCredentials` Secret. Deleting
//! a resource undoes it: the grant is withdrawn (its token refused from then on) and its
//! Secret deleted, the link deleted.
//!
//! What came of each resource is kept by uid in `STATE/access.json`, so a token is redeemed
//! once however often the controller restarts, a resource made again under the same name is
//! a new one, and only what the controller made is ever deleted. A redemption the issuer
//! refused is final for that generation of the AccessToken (a used token stays used); one
//! that did not reach the issuer is tried again after a wait that doubles from 5 s to 5 min.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{DeleteParams, PostParams},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

use super::{
    reconcile::router_name,
    secrets::{MANAGED_BY, managed, owner},
    status::Verdict,
};
use crate::{
    admin::{self, Request},
    link::dial,
    node::error_chain,
    resource::kinds::{self, AccessTokenSpec},
    site::{self, StateDir},
    token::{self, Token},
};

/// The key of a token Secret that holds the AccessToken manifest.
pub const TOKEN_KEY: &str = "token.yaml";
/// The record of what came of each resource, in the state directory.
const RECORD: &str = "access.json";
/// The first wait before a redemption that did not reach its issuer is tried again.
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// The longest wait between two tries.
const LAST_RETRY: Duration = Duration::from_secs(300);

/// The Secret that carries the token of AccessGrant `grant`.
#[must_use]
pub fn token_secret(grant: &str) -> String {
    format!("skiff-token-{grant}")
}

/// The resources of the served namespaces that link sites.
#[derive(Clone, Debug, Default)]
pub struct Wanted {
    pub grants: Vec<Arc<kinds::AccessGrant>>,
    pub tokens: Vec<Arc<kinds::AccessToken>>,
    pub links: Vec<Arc<kinds::Link>>,
}

/// Each resource with what the pass concluded about it.
#[derive(Debug, Default)]
pub struct Outcome {
    pub grants: Vec<(Arc<kinds::AccessGrant>, Verdict)>,
    pub tokens: Vec<(Arc<kinds::AccessToken>, Verdict)>,
    pub links: Vec<(Arc<kinds::Link>, Verdict)>,
}

/// A grant issued for an AccessGrant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Issued {
    namespace: String,
    name: String,
    generation: i64,
    /// The grant's id in the router.
    grant: String,
    redemptions: u32,
    /// Unix seconds.
    expires: u64,
}

/// What redeeming an AccessToken came to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Redeemed {
    generation: i64,
    /// The issuing site.
    site: String,
    /// The link it gave, or the issuer's refusal.
    outcome: Result<String, String>,
}

/// A link made from a Link resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Made {
    generation: i64,
    /// The credential Secret's resourceVersion when the link was made from it.
    secret_version: String,
    link: String,
}

/// `STATE/access.json`, by resource uid.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    grants: BTreeMap<String, Issued>,
    tokens: BTreeMap<String, Redeemed>,
    links: BTreeMap<String, Made>,
}

impl Record {
    /// The router links this record says the controller made.
    fn links(&self) -> BTreeSet<&str> {
        let redeemed = self
            .tokens
            .values()
            .filter_map(|r| r.outcome.as_deref().ok());
        let made = self.links.values().map(|m| m.link.as_str());
        redeemed.chain(made).collect()
    }
}

/// A redemption to try again.
#[derive(Clone, Debug)]
struct Retry {
    at: Instant,
    wait: Duration,
    error: String,
}

/// The controller's side of linking.
pub struct Access {
    client: Client,
    state: StateDir,
    socket: PathBuf,
    record: Record,
    retries: HashMap<String, Retry>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

fn generation<K: Resource>(object: &K) -> i64 {
    object.meta().generation.unwrap_or(0)
}

fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{unix} (Unix time)"))
}

impl Access {
    /// The linking side of the controller of the router whose state directory is `state`.
    ///
    /// # Errors
    /// When `STATE/access.json` is there but cannot be read.
    pub fn new(client: Client, state: StateDir) -> Result<Self, site::Error> {
        let record = state.read_json_or_default(RECORD)?;
        Ok(Self {
            client,
            socket: state.admin_socket(),
            state,
            record,
            retries: HashMap::new(),
        })
    }

    /// How long until a redemption is due to be tried again, if one is.
    #[must_use]
    pub fn next_retry(&self) -> Option<Duration> {
        let now = Instant::now();
        self.retries
            .values()
            .map(|r| r.at.saturating_duration_since(now))
            .min()
    }

    async fn call(&self, request: &Request) -> Result<Value, admin::Error> {
        admin::call(&self.socket, request).await
    }

    /// Makes the router's grants and links what `wanted` declares, with the router running.
    pub async fn sync(&mut self, wanted: &Wanted) -> Outcome {
        let before = self.record.clone();
        // Deletes first: a resource deleted and made again under its name (a new uid) wants
        // the link name the old one held.
        self.delete_unwanted(wanted).await;
        let links_now: BTreeSet<String> = match self.call(&Request::LinkStatus).await {
            Ok(rows) => rows
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["direction"] == "outgoing")
                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                .collect(),
            Err(e) => {
                warn!(error = %error_chain(&e), "failed to list the router's links");
                BTreeSet::new()
            }
        };
        let mut outcome = Outcome::default();
        for object in &wanted.grants {
            let verdict = self.grant(object).await;
            outcome.grants.push((object.clone(), verdict));
        }
        for object in &wanted.tokens {
            let verdict = self.token(object, &links_now).await;
            outcome.tokens.push((object.clone(), verdict));
        }
        for object in &wanted.links {
            let verdict = self.link(object, &links_now).await;
            outcome.links.push((object.clone(), verdict));
        }
        if self.record != before
            && let Err(e) = self.state.write_json(RECORD, &self.record)
        {
            warn!(error = %error_chain(&e), "failed to store what the controller linked");
        }
        outcome
    }

    /// A grant for one AccessGrant, its token in a Secret.
    async fn grant(&mut self, object: &kinds::AccessGrant) -> Verdict {
        let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
        let uid = object.uid().unwrap_or_default();
        if let Err(reason) = kinds::validate_grant(&name, &object.spec) {
            return Verdict::not_ready("Refused", reason);
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        let secret_name = token_secret(&name);
        let existing = match secrets.get_opt(&secret_name).await {
            Ok(existing) => existing,
            Err(e) => return Verdict::not_ready("SecretFailed", error_chain(&e)),
        };
        if let Some(s) = &existing
            && !managed(s)
        {
            return Verdict::not_ready(
                "Conflict",
                format!("Secret {secret_name} exists and was not made by skiff: left alone"),
            );
        }
        let issued = self
            .record
            .grants
            .get(&uid)
            .filter(|i| i.generation == generation(object) && existing.is_some());
        if let Some(issued) = issued {
            return grant_verdict(issued, &secret_name);
        }
        // New, changed, or its Secret gone: a new grant, and the old one withdrawn.
        if let Some(old) = self.record.grants.remove(&uid) {
            self.withdraw(&old).await;
        }
        let redemptions = object
            .spec
            .redemptions_allowed
            .unwrap_or(token::DEFAULT_REDEMPTIONS);
        let expiry = object
            .spec
            .expiration_window
            .as_deref()
            .map_or(Ok(token::DEFAULT_EXPIRY), token::parse_duration)
            .unwrap_or(token::DEFAULT_EXPIRY);
        let answer = self
            .call(&Request::TokenIssue {
                redemptions,
                expiry_secs: expiry.as_secs(),
            })
            .await;
        let token: Token = match answer.map(serde_json::from_value) {
            Ok(Ok(token)) => token,
            Ok(Err(e)) => return Verdict::not_ready("Refused", e.to_string()),
            Err(e) => return Verdict::not_ready("Refused", error_chain(&e)),
        };
        let issued = Issued {
            namespace: namespace.clone(),
            name: name.clone(),
            generation: generation(object),
            grant: token.grant.clone(),
            redemptions,
            expires: token::now_secs().saturating_add(expiry.as_secs()),
        };
        let secret = match token_secret_for(object, &token, existing.as_ref()) {
            Ok(secret) => secret,
            Err(e) => {
                self.withdraw(&issued).await;
                return Verdict::not_ready("SecretFailed", e);
            }
        };
        let written = match &existing {
            Some(_) => {
                secrets
                    .replace(&secret_name, &PostParams::default(), &secret)
                    .await
            }
            None => secrets.create(&PostParams::default(), &secret).await,
        };
        if let Err(e) = written {
            // Not handed out, so not kept: nobody can redeem it.
            self.withdraw(&issued).await;
            return Verdict::not_ready("SecretFailed", error_chain(&e));
        }
        info!(%namespace, grant = %name, secret = %secret_name, "token issued into its Secret");
        let verdict = grant_verdict(&issued, &secret_name);
        self.record.grants.insert(uid, issued);
        verdict
    }

    /// Withdraws a grant in the router; a grant already gone is no failure.
    async fn withdraw(&self, issued: &Issued) {
        let request = Request::GrantDelete {
            grant: issued.grant.clone(),
        };
        match self.call(&request).await {
            Ok(_) => info!(namespace = %issued.namespace, grant = %issued.name, "grant withdrawn"),
            Err(admin::Error::Router(m)) if m.starts_with("no grant") => {}
            Err(e) => warn!(
                namespace = %issued.namespace, grant = %issued.name, error = %error_chain(&e),
                "failed to withdraw a grant; it lapses when it expires"
            ),
        }
    }

    /// One AccessToken, redeemed once, for the link `NS-NAME`.
    async fn token(
        &mut self,
        object: &kinds::AccessToken,
        links_now: &BTreeSet<String>,
    ) -> Verdict {
        let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
        let uid = object.uid().unwrap_or_default();
        let token = &object.spec.0;
        if let Err(reason) = kinds::validate_token(&name, token) {
            return Verdict::not_ready("Refused", reason);
        }
        let link = match router_name(&namespace, &name) {
            Ok(link) => link,
            Err(verdict) => return verdict,
        };
        if let Some(done) = self.record.tokens.get(&uid) {
            if done.generation == generation(object) {
                return token_verdict(done);
            }
            // A changed token: the link from the old one goes, the new one is redeemed.
            let old = self.record.tokens.remove(&uid);
            if let Some(Ok(old_link)) = old.map(|r| r.outcome) {
                self.delete_link(&old_link).await;
            }
        }
        if links_now.contains(&link) && !self.record.links().contains(link.as_str()) {
            return Verdict::not_ready(
                "Conflict",
                format!("the router already has link {link}, not made by the controller"),
            );
        }
        if let Some(retry) = self.retries.get(&uid)
            && retry.at > Instant::now()
        {
            return retrying(retry);
        }
        let answer = self
            .call(&Request::TokenRedeem {
                token: token.clone(),
                name: Some(link.clone()),
                cost: None,
                connections: None,
            })
            .await;
        let outcome = match answer {
            Ok(_) => Ok(link),
            Err(admin::Error::Router(m)) if m.contains(dial::REFUSED) => Err(m),
            Err(e) => {
                let message = error_chain(&e);
                let wait = self
                    .retries
                    .get(&uid)
                    .map_or(FIRST_RETRY, |r| (r.wait * 2).min(LAST_RETRY));
                warn!(%namespace, token = %name, error = %message, ?wait, "redemption failed; trying again");
                let retry = Retry {
                    at: Instant::now() + wait,
                    wait,
                    error: message,
                };
                let verdict = retrying(&retry);
                self.retries.insert(uid, retry);
                return verdict;
            }
        };
        self.retries.remove(&uid);
        match &outcome {
            Ok(link) => {
                info!(%namespace, token = %name, %link, site = %token.site, "token redeemed")
            }
            Err(e) => warn!(%namespace, token = %name, error = %e, "the issuer refused the token"),
        }
        let done = Redeemed {
            generation: generation(object),
            site: token.site.clone(),
            outcome,
        };
        let verdict = token_verdict(&done);
        self.record.tokens.insert(uid, done);
        verdict
    }

    /// One Link, made from its credential Secret; made again when either changes.
    async fn link(&mut self, object: &kinds::Link, links_now: &BTreeSet<String>) -> Verdict {
        let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
        let uid = object.uid().unwrap_or_default();
        let spec = &object.spec;
        if let Err(reason) = kinds::validate_link(&name, spec) {
            return Verdict::not_ready("Refused", reason);
        }
        let link = match router_name(&namespace, &name) {
            Ok(link) => link,
            Err(verdict) => return verdict,
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        let secret = match secrets.get_opt(&spec.tls_credentials).await {
            Ok(Some(secret)) => secret,
            Ok(None) => {
                return Verdict::not_ready(
                    "SecretMissing",
                    format!(
                        "no Secret {} in namespace {namespace}",
                        spec.tls_credentials
                    ),
                );
            }
            Err(e) => return Verdict::not_ready("SecretFailed", error_chain(&e)),
        };
        let version = secret.metadata.resource_version.clone().unwrap_or_default();
        let made_now = self
            .record
            .links
            .get(&uid)
            .is_some_and(|m| m.generation == generation(object) && m.secret_version == version);
        if made_now && links_now.contains(&link) {
            return Verdict::ready("Applied", format!("link {link} to site {}", spec.peer_site));
        }
        let ours = self.record.links().contains(link.as_str());
        if links_now.contains(&link) && !ours {
            return Verdict::not_ready(
                "Conflict",
                format!("the router already has link {link}, not made by the controller"),
            );
        }
        let data = secret.data.unwrap_or_default();
        let pem = |key: &str| -> Result<String, Verdict> {
            data.get(key)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
                .ok_or_else(|| {
                    Verdict::not_ready(
                        "Refused",
                        format!("Secret {} has no {key}", spec.tls_credentials),
                    )
                })
        };
        let (ca, cert, key) = match (pem("ca.crt"), pem("tls.crt"), pem("tls.key")) {
            (Ok(ca), Ok(cert), Ok(key)) => (ca, cert, key),
            (Err(v), ..) | (_, Err(v), _) | (.., Err(v)) => return v,
        };
        if links_now.contains(&link) {
            self.delete_link(&link).await;
        }
        self.record.links.remove(&uid);
        let created = self
            .call(&Request::LinkCreate {
                name: link.clone(),
                url: spec.url.clone(),
                peer_site: spec.peer_site.clone(),
                ca,
                cert,
                key,
                cost: spec.cost,
                connections: None,
            })
            .await;
        match created {
            Ok(_) => {
                info!(%namespace, %name, %link, "link made from its Link resource");
                self.record.links.insert(
                    uid,
                    Made {
                        generation: generation(object),
                        secret_version: version,
                        link: link.clone(),
                    },
                );
                Verdict::ready("Applied", format!("link {link} to site {}", spec.peer_site))
            }
            Err(e) => Verdict::not_ready("Refused", error_chain(&e)),
        }
    }

    /// Undoes what the controller made for resources that are gone.
    async fn delete_unwanted(&mut self, wanted: &Wanted) {
        fn uids<K: Resource>(objects: &[Arc<K>]) -> BTreeSet<String> {
            objects
                .iter()
                .filter_map(|o| o.meta().uid.clone())
                .collect()
        }
        let (grants, tokens, links) = (
            uids(&wanted.grants),
            uids(&wanted.tokens),
            uids(&wanted.links),
        );
        self.retries.retain(|uid, _| tokens.contains(uid));
        let gone: Vec<String> = self
            .record
            .grants
            .keys()
            .filter(|uid| !grants.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            let Some(issued) = self.record.grants.get(&uid).cloned() else {
                continue;
            };
            self.withdraw(&issued).await;
            let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &issued.namespace);
            match secrets
                .delete(&token_secret(&issued.name), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    warn!(namespace = %issued.namespace, grant = %issued.name, error = %error_chain(&e), "failed to delete a token Secret");
                    continue;
                }
            }
            self.record.grants.remove(&uid);
        }
        let gone: Vec<(String, Option<String>)> = self
            .record
            .tokens
            .iter()
            .filter(|(uid, _)| !tokens.contains(*uid))
            .map(|(uid, r)| (uid.clone(), r.outcome.clone().ok()))
            .chain(
                self.record
                    .links
                    .iter()
                    .filter(|(uid, _)| !links.contains(*uid))
                    .map(|(uid, m)| (uid.clone(), Some(m.link.clone()))),
            )
            .collect();
        for (uid, link) in gone {
            if let Some(link) = link
                && !self.delete_link(&link).await
            {
                continue;
            }
            self.record.tokens.remove(&uid);
            self.record.links.remove(&uid);
        }
    }

    /// Whether link `name` is gone from the router (deleted now, or already).
    async fn delete_link(&self, name: &str) -> bool {
        match self
            .call(&Request::LinkDelete {
                name: name.to_owned(),
            })
            .await
        {
            Ok(_) => {
                info!(link = name, "link deleted: its resource is gone");
                true
            }
            Err(admin::Error::Router(m)) if m.starts_with("no link") => true,
            Err(e) => {
                warn!(link = name, error = %error_chain(&e), "failed to delete a link");
                false
            }
        }
    }
}

fn grant_verdict(issued: &Issued, secret: &str) -> Verdict {
    if token::now_secs() >= issued.expires {
        return Verdict::not_ready(
            "Expired",
            format!(
                "the grant expired at {}: delete and create the AccessGrant for a new token",
                rfc3339(issued.expires)
            ),
        );
    }
    Verdict::ready(
        "Issued",
        format!(
            "token in Secret {secret} ({TOKEN_KEY}), redeemable {} time(s) until {}",
            issued.redemptions,
            rfc3339(issued.expires)
        ),
    )
}

fn token_verdict(done: &Redeemed) -> Verdict {
    match &done.outcome {
        Ok(link) => Verdict::ready("Redeemed", format!("link {link} to site {}", done.site)),
        Err(refusal) => Verdict::not_ready(
            "Refused",
            format!("{refusal}; change or re-create the AccessToken to try another"),
        ),
    }
}

fn retrying(retry: &Retry) -> Verdict {
    let wait = retry.at.saturating_duration_since(Instant::now());
    Verdict::not_ready(
        "Retrying",
        format!(
            "{}; tried again within {} s",
            retry.error,
            wait.as_secs().max(1)
        ),
    )
}

/// The Secret that hands out `token`: an AccessToken manifest named after the issuing site,
/// owned by the AccessGrant so that it goes with it.
fn token_secret_for(
    grant: &kinds::AccessGrant,
    token: &Token,
    existing: Option<&Secret>,
) -> Result<Secret, String> {
    let manifest = kinds::AccessToken::new(&token.site, AccessTokenSpec(token.clone()));
    let yaml = serde_yaml_ng::to_string(&manifest).map_err(|e| e.to_string())?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(token_secret(&grant.name_any())),
            namespace: grant.namespace(),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_owned(),
                MANAGED_BY.1.to_owned(),
            )])),
            owner_references: Some(vec![owner(grant)]),
            resource_version: existing.and_then(|s| s.metadata.resource_version.clone()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_owned(),
            ByteString(yaml.into_bytes()),
        )])),
        ..Secret::default()
    })
}
