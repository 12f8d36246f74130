//! Service TLS bundles as Secrets, as Skupper keeps them: a TLS connector's backend bundle in
//! `skiff-tls-<name>` (`tls.crt`, `tls.key`, `ca.crt`) for the backend to mount, and the
//! service CA in `skiff-service-client` (`ca.crt`) for the frontends of the namespace's TLS
//! listeners to trust, and for a listener that requires client certificates, its frontends'
//! bundle in `skiff-client-<name>` (`tls.crt`, `tls.key`, `ca.crt`).
//!
//! The bundles come from the router (`ServiceBundle`, as `--bundle-out` gets them) and are
//! written again when what they were issued for changes (the connector's host or server
//! name), when less than a third of the certificate's life is left, or when they are missing.
//! Each Secret names its resources as owners, so the garbage collector removes it with them
//! when no controller runs; the controller deletes one itself as soon as nothing asks for it.
//! The Secrets it made are kept in `STATE/secrets.json`: it never touches another.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{DeleteParams, PostParams},
};
use serde_json::Value;
use tracing::{info, warn};

use crate::{
    admin::{self, BundleKind, Request},
    node::error_chain,
    pki,
    resource::kinds,
    site::StateDir,
};

/// Marks the Secrets the controller writes.
pub(super) const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "skiff");
/// What a Secret's bundle was issued for; a change means a new bundle.
const ISSUED_FOR: &str = "skiff.io/issued-for";
/// The record of Secrets made, in the state directory.
const RECORD: &str = "secrets.json";
/// The Secret with the service CA, one per namespace with TLS listeners.
pub const SERVICE_CLIENT: &str = "skiff-service-client";

/// A Secret the resources ask for.
#[derive(Clone, Debug)]
struct Wanted {
    namespace: String,
    name: String,
    /// A bundle of this kind for this router resource.
    bundle: (BundleKind, String),
    /// Whether the certificate and key go in too (a backend's), or only the CA.
    with_key: bool,
    issued_for: String,
    owners: Vec<OwnerReference>,
}

/// `object` as the owner of a Secret: the garbage collector deletes the Secret with it.
pub(super) fn owner<K: Resource<DynamicType = ()>>(object: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: object.name_any(),
        uid: object.uid().unwrap_or_default(),
        ..OwnerReference::default()
    }
}

/// Whether a certificate that expires at `not_after` (Unix seconds) is due for renewal at
/// `now`: less than a third of a bundle's lifetime left.
#[must_use]
pub fn due(not_after: i64, now: i64) -> bool {
    not_after - now < pki::LEAF_LIFETIME.whole_seconds() / 3
}

/// The controller's Secrets.
pub struct Secrets {
    client: Client,
    state: StateDir,
    made: BTreeSet<(String, String)>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("made", &self.made)
            .finish_non_exhaustive()
    }
}

impl Secrets {
    #[must_use]
    pub fn new(client: Client, state: StateDir) -> Self {
        let made: Vec<(String, String)> = state.read_json_or_default(RECORD).unwrap_or_default();
        Self {
            client,
            state,
            made: made.into_iter().collect(),
        }
    }

    /// Makes the Secrets match the applied TLS connectors (`(resource, router name)`) and
    /// listeners of `site`: written where missing or stale, deleted where nothing asks for
    /// them any more.
    pub async fn sync(
        &mut self,
        site: &str,
        connectors: &[(&kinds::Connector, String)],
        listeners: &[&kinds::Listener],
    ) {
        let mut wanted: BTreeMap<(String, String), Wanted> = BTreeMap::new();
        for (connector, router_name) in connectors {
            // A backend that another CA vouches for has its own certificate.
            let Some(tls) = connector.spec.tls.as_ref().filter(|t| t.ca_file.is_none()) else {
                continue;
            };
            let namespace = connector.namespace().unwrap_or_default();
            let name = format!("skiff-tls-{}", connector.name_any());
            let issued_for = format!(
                "{site}/{router_name} {} {}",
                connector.spec.host,
                tls.server_name.as_deref().unwrap_or("-")
            );
            wanted.insert(
                (namespace.clone(), name.clone()),
                Wanted {
                    namespace,
                    name,
                    bundle: (BundleKind::Server, router_name.clone()),
                    with_key: true,
                    issued_for,
                    owners: vec![owner(*connector)],
                },
            );
        }
        // A listener that requires client certificates: one for its frontends.
        for listener in listeners
            .iter()
            .filter(|l| l.spec.tls.as_ref().is_some_and(|t| t.require_client_cert))
        {
            let namespace = listener.namespace().unwrap_or_default();
            let name = format!("skiff-client-{}", listener.name_any());
            let router_name = format!("{namespace}-{}", listener.name_any());
            wanted.insert(
                (namespace.clone(), name.clone()),
                Wanted {
                    namespace,
                    name,
                    issued_for: format!("{site}/{router_name} client"),
                    bundle: (BundleKind::Client, router_name),
                    with_key: true,
                    owners: vec![owner(*listener)],
                },
            );
        }
        for listener in listeners.iter().filter(|l| l.spec.tls.is_some()) {
            let namespace = listener.namespace().unwrap_or_default();
            let key = (namespace.clone(), SERVICE_CLIENT.to_owned());
            let router_name = format!("{namespace}-{}", listener.name_any());
            wanted
                .entry(key)
                .or_insert_with(|| Wanted {
                    namespace,
                    name: SERVICE_CLIENT.to_owned(),
                    bundle: (BundleKind::Client, router_name),
                    with_key: false,
                    issued_for: site.to_owned(),
                    owners: Vec::new(),
                })
                .owners
                .push(owner(*listener));
        }
        let before = self.made.clone();
        for (key, want) in &wanted {
            match self.ensure(want).await {
                Ok(()) => {
                    self.made.insert(key.clone());
                }
                Err(e) => warn!(
                    namespace = %want.namespace, secret = %want.name, error = %e,
                    "failed to write the service TLS Secret"
                ),
            }
        }
        let gone: Vec<(String, String)> = self
            .made
            .iter()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for (namespace, name) in gone {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    info!(%namespace, secret = %name, "service TLS Secret deleted: nothing uses it")
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    warn!(%namespace, secret = %name, error = %error_chain(&e), "failed to delete a Secret");
                    continue;
                }
            }
            self.made.remove(&(namespace, name));
        }
        if self.made != before {
            let record: Vec<&(String, String)> = self.made.iter().collect();
            if let Err(e) = self.state.write_json(RECORD, &record) {
                warn!(error = %error_chain(&e), "failed to store the Secrets made");
            }
        }
    }

    /// Writes `want` unless the Secret there is up to date.
    async fn ensure(&self, want: &Wanted) -> Result<(), String> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &want.namespace);
        let existing = api.get_opt(&want.name).await.map_err(|e| error_chain(&e))?;
        if let Some(existing) = &existing {
            if !managed(existing) {
                return Err(format!(
                    "Secret {} exists and was not made by skiff: left alone",
                    want.name
                ));
            }
            if up_to_date(existing, want) {
                return Ok(());
            }
        }
        let bundle = admin::call(
            &self.state.admin_socket(),
            &Request::ServiceBundle {
                kind: want.bundle.0,
                name: want.bundle.1.clone(),
            },
        )
        .await
        .map_err(|e| error_chain(&e))?;
        let secret = secret(want, &bundle, existing.as_ref())?;
        let written = match existing {
            Some(_) => {
                api.replace(&want.name, &PostParams::default(), &secret)
                    .await
            }
            None => api.create(&PostParams::default(), &secret).await,
        };
        written.map_err(|e| error_chain(&e))?;
        info!(namespace = %want.namespace, secret = %want.name, "service TLS Secret written");
        Ok(())
    }
}

/// Whether the controller wrote `secret` (it touches no other).
pub(super) fn managed(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY.0))
        .is_some_and(|v| v == MANAGED_BY.1)
}

/// Whether `existing` holds a bundle for what `want` is, not yet due, with its owners.
fn up_to_date(existing: &Secret, want: &Wanted) -> bool {
    let annotations = existing.metadata.annotations.clone().unwrap_or_default();
    if annotations.get(ISSUED_FOR) != Some(&want.issued_for) {
        return false;
    }
    let owners: BTreeSet<&str> = existing
        .metadata
        .owner_references
        .iter()
        .flatten()
        .map(|o| o.uid.as_str())
        .collect();
    if owners != want.owners.iter().map(|o| o.uid.as_str()).collect() {
        return false;
    }
    let data = existing.data.clone().unwrap_or_default();
    let pem = |key: &str| {
        data.get(key)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let cert = if want.with_key { "tls.crt" } else { "ca.crt" };
    pem(cert)
        .and_then(|pem| pki::not_after(&pem))
        .is_some_and(|not_after| !due(not_after, now))
}

/// The Secret for `want` from the router's `bundle` (`ca`, `cert`, `key`).
fn secret(want: &Wanted, bundle: &Value, existing: Option<&Secret>) -> Result<Secret, String> {
    let field = |name: &str| -> Result<ByteString, String> {
        bundle[name]
            .as_str()
            .map(|s| ByteString(s.as_bytes().to_vec()))
            .ok_or_else(|| "the router sent an incomplete bundle".to_owned())
    };
    let mut data = BTreeMap::from([("ca.crt".to_owned(), field("ca")?)]);
    if want.with_key {
        data.insert("tls.crt".to_owned(), field("cert")?);
        data.insert("tls.key".to_owned(), field("key")?);
    }
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(want.name.clone()),
            namespace: Some(want.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_owned(),
                MANAGED_BY.1.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                ISSUED_FOR.to_owned(),
                want.issued_for.clone(),
            )])),
            owner_references: Some(want.owners.clone()),
            // A replace must name the version it replaces.
            resource_version: existing.and_then(|s| s.metadata.resource_version.clone()),
            ..ObjectMeta::default()
        },
        type_: Some(
            if want.with_key {
                "kubernetes.io/tls"
            } else {
                "Opaque"
            }
            .to_owned(),
        ),
        data: Some(data),
        ..Secret::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_are_renewed_with_a_third_of_their_life_left() {
        let life = pki::LEAF_LIFETIME.whole_seconds();
        let now = 1_000_000_000;
        assert!(!due(now + life, now), "new");
        assert!(!due(now + life / 2, now), "half way");
        assert!(due(now + life / 3 - 1, now), "a third left");
        assert!(due(now - 1, now), "expired");
    }
}
