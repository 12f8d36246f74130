//! One pass of the node controller: the skiff resources of the namespaces it serves, as they
//! are now, made true in this node's router through the admin socket, with the same requests
//! `skiff apply -f` sends (`Apply`, `PolicySet`) and the site created or checked as `skiff
//! apply -f` does. What the router has that the controller made and no resource asks for any
//! more is deleted; a verdict per resource says what happened, for its status.
//!
//! The router knows its resources by name only, and one router serves every namespace, so a
//! Listener or Connector `NAME` in namespace `NS` is `NS-NAME` in the router (its routing key
//! still defaults to `NAME`). The names the controller made are kept in
//! `STATE/controller.json`: those it may replace and delete, and no other (a listener made
//! with the CLI under the same name is left alone, and the resource refused).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
};

use kube::{Resource, ResourceExt as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

use super::status::Verdict;
use crate::{
    admin::{self, Request},
    node::error_chain,
    resource::{self, kinds},
    service::{self, Resources},
    site::{self, StateDir},
};

/// The resources of the served namespaces, as the watches hold them now.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub sites: Vec<Arc<kinds::Site>>,
    pub policies: Vec<Arc<kinds::SitePolicy>>,
    pub listeners: Vec<Arc<kinds::Listener>>,
    pub connectors: Vec<Arc<kinds::Connector>>,
}

/// Each resource of a snapshot with what the pass concluded about it.
#[derive(Debug, Default)]
pub struct Outcome {
    pub sites: Vec<(Arc<kinds::Site>, Verdict)>,
    pub policies: Vec<(Arc<kinds::SitePolicy>, Verdict)>,
    pub listeners: Vec<(Arc<kinds::Listener>, Verdict)>,
    pub connectors: Vec<(Arc<kinds::Connector>, Verdict)>,
    /// The router did not answer: nothing but the site was applied.
    pub router_down: bool,
}

/// What the controller made in the router: `STATE/controller.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Owned {
    listeners: BTreeSet<String>,
    connectors: BTreeSet<String>,
    /// The SitePolicy (`NS/NAME`) whose policy is in force, if the controller set it.
    policy: Option<String>,
}

const OWNED_FILE: &str = "controller.json";

/// The node controller's side of the router.
#[derive(Debug)]
pub struct Reconciler {
    state: StateDir,
    socket: PathBuf,
    node: String,
    owned: Owned,
}

/// Sorts resources the way conflicts are settled: the oldest first, then by namespace and
/// name (creation times have one-second resolution).
fn oldest_first<K: Resource>(items: &mut [Arc<K>]) {
    items.sort_by_key(|k| {
        (
            k.meta().creation_timestamp.clone().map(|t| t.0),
            k.meta().namespace.clone(),
            k.meta().name.clone(),
        )
    });
}

fn running_verdict(node: &str) -> Verdict {
    Verdict::ready("Running", format!("its router runs on node {node}"))
}

fn key<K: Resource>(k: &K) -> String {
    format!("{}/{}", k.namespace().unwrap_or_default(), k.name_any())
}

/// The router's name for resource `name` of namespace `namespace`.
///
/// # Errors
/// A refusal when the two together are not a DNS label.
pub fn router_name(namespace: &str, name: &str) -> Result<String, Verdict> {
    let joined = format!("{namespace}-{name}");
    if service::is_dns_label(&joined) {
        Ok(joined)
    } else {
        Err(Verdict::not_ready(
            "Refused",
            format!(
                "the router names it {joined:?}: namespace and name together must be a DNS label of at most {} characters",
                service::MAX_NAME
            ),
        ))
    }
}

impl Reconciler {
    /// The controller of the router whose state directory is `state`, on node `node`.
    ///
    /// # Errors
    /// When `STATE/controller.json` is there but cannot be read.
    pub fn new(state: StateDir, node: String) -> Result<Self, site::Error> {
        let owned = state.read_json_or_default(OWNED_FILE)?;
        Ok(Self {
            socket: state.admin_socket(),
            state,
            node,
            owned,
        })
    }

    async fn call(&self, request: &Request) -> Result<Value, admin::Error> {
        admin::call(&self.socket, request).await
    }

    /// Makes the router what `snapshot` declares; returns a verdict per resource.
    pub async fn reconcile(&mut self, mut snapshot: Snapshot) -> Outcome {
        oldest_first(&mut snapshot.sites);
        oldest_first(&mut snapshot.policies);
        oldest_first(&mut snapshot.listeners);
        oldest_first(&mut snapshot.connectors);
        let before = self.owned.clone();
        let mut outcome = Outcome {
            sites: self.site(&snapshot.sites).await,
            ..Outcome::default()
        };
        let running = self.call(&Request::Status).await.is_ok();
        outcome.router_down = !running;
        if running {
            // The router came up between the site's check and this one: the site's verdict
            // follows the later answer, or it would stay RouterDown until the next resync.
            for (_, verdict) in &mut outcome.sites {
                if verdict.reason == "RouterDown" {
                    *verdict = running_verdict(&self.node);
                }
            }
            outcome.policies = self.policy(&snapshot.policies).await;
            (outcome.listeners, outcome.connectors) = self
                .services(&snapshot.listeners, &snapshot.connectors)
                .await;
        } else {
            let down = || {
                Verdict::not_ready(
                    "RouterDown",
                    format!("the router of node {} is not running", self.node),
                )
            };
            outcome.policies = snapshot
                .policies
                .iter()
                .map(|p| (p.clone(), down()))
                .collect();
            outcome.listeners = snapshot
                .listeners
                .iter()
                .map(|l| (l.clone(), down()))
                .collect();
            outcome.connectors = snapshot
                .connectors
                .iter()
                .map(|c| (c.clone(), down()))
                .collect();
        }
        if self.owned != before
            && let Err(e) = self.state.write_json(OWNED_FILE, &self.owned)
        {
            warn!(error = %error_chain(&e), "failed to store what the controller made");
        }
        outcome
    }

    /// The oldest Site is this node's: created, or checked against the one here.
    async fn site(&self, sites: &[Arc<kinds::Site>]) -> Vec<(Arc<kinds::Site>, Verdict)> {
        let Some((first, others)) = sites.split_first() else {
            return Vec::new();
        };
        let mut out = vec![(first.clone(), self.apply_site(first).await)];
        for other in others {
            out.push((
                other.clone(),
                Verdict::not_ready(
                    "Conflict",
                    format!(
                        "node {} already runs Site {}: one Site per node",
                        self.node,
                        key(first.as_ref())
                    ),
                ),
            ));
        }
        out
    }

    async fn apply_site(&self, site: &kinds::Site) -> Verdict {
        let config = match resource::site_config(site.name_any(), site.spec.clone()) {
            Ok(config) => config,
            Err(reason) => return Verdict::not_ready("Refused", reason),
        };
        let state = self.state.clone();
        let applied = tokio::task::spawn_blocking(move || state.apply(&config)).await;
        match applied {
            Ok(Ok(site::Applied::Created)) => {
                info!(site = %site.name_any(), "site created");
                Verdict::ready(
                    "Created",
                    format!("created on node {}; its router starts with it", self.node),
                )
            }
            Ok(Ok(site::Applied::Unchanged)) => match self.call(&Request::Status).await {
                Ok(_) => running_verdict(&self.node),
                Err(e) => Verdict::not_ready("RouterDown", error_chain(&e)),
            },
            Ok(Err(e @ site::Error::Differs { .. })) => {
                Verdict::not_ready("SiteExists", error_chain(&e))
            }
            Ok(Err(e)) => Verdict::not_ready("Refused", error_chain(&e)),
            Err(e) => Verdict::not_ready("Refused", e.to_string()),
        }
    }

    /// The oldest SitePolicy is the site's policy; without one, a policy the controller set
    /// is removed.
    async fn policy(
        &mut self,
        policies: &[Arc<kinds::SitePolicy>],
    ) -> Vec<(Arc<kinds::SitePolicy>, Verdict)> {
        let Some((first, others)) = policies.split_first() else {
            if self.owned.policy.is_some() {
                match self.call(&Request::PolicySet { policy: None }).await {
                    Ok(_) => {
                        info!("site policy removed: its SitePolicy is gone");
                        self.owned.policy = None;
                    }
                    Err(e) => warn!(error = %error_chain(&e), "failed to remove the site policy"),
                }
            }
            return Vec::new();
        };
        let wanted = first.spec.0.clone();
        let current = self.call(&Request::PolicyStatus).await;
        let in_force = current
            .as_ref()
            .is_ok_and(|c| c["policy"] == serde_json::to_value(&wanted).unwrap_or(Value::Null));
        let verdict = if in_force {
            Ok(())
        } else {
            self.call(&Request::PolicySet {
                policy: Some(wanted),
            })
            .await
            .map(drop)
        };
        let verdict = match verdict {
            Ok(()) => {
                self.owned.policy = Some(key(first.as_ref()));
                Verdict::ready("Applied", format!("in force on node {}", self.node))
            }
            Err(e) => Verdict::not_ready("Refused", error_chain(&e)),
        };
        let mut out = vec![(first.clone(), verdict)];
        for other in others {
            out.push((
                other.clone(),
                Verdict::not_ready(
                    "Conflict",
                    format!("SitePolicy {} is this site's policy", key(first.as_ref())),
                ),
            ));
        }
        out
    }

    /// Listeners and connectors: one `Apply` with every valid one, then the deletes.
    async fn services(
        &mut self,
        listeners: &[Arc<kinds::Listener>],
        connectors: &[Arc<kinds::Connector>],
    ) -> (
        Vec<(Arc<kinds::Listener>, Verdict)>,
        Vec<(Arc<kinds::Connector>, Verdict)>,
    ) {
        let existing = self.existing().await;
        let mut resources = Resources::default();
        let mut names = BTreeSet::new();
        let mut refused: BTreeMap<String, Verdict> = BTreeMap::new();
        let mut listener_names = Vec::new();
        for l in listeners {
            let converted = self.listener(l).and_then(|spec| {
                self.claim(&mut names, &existing.0, &self.owned.listeners, spec, |s| {
                    &s.name
                })
            });
            match converted {
                Ok(spec) => {
                    listener_names.push(Some(spec.name.clone()));
                    resources.listeners.push(spec);
                }
                Err(v) => {
                    listener_names.push(None);
                    refused.insert(key(l.as_ref()), v);
                }
            }
        }
        let mut connector_names = Vec::new();
        for c in connectors {
            let converted = router_name(&c.namespace().unwrap_or_default(), &c.name_any())
                .and_then(|name| {
                    let spec = resource::connector(name, Some(&c.name_any()), c.spec.clone());
                    spec.validate()
                        .map_err(|e| Verdict::not_ready("Refused", e.to_string()))?;
                    Ok(spec)
                })
                .and_then(|spec| {
                    self.claim(&mut names, &existing.1, &self.owned.connectors, spec, |s| {
                        &s.name
                    })
                });
            match converted {
                Ok(spec) => {
                    connector_names.push(Some(spec.name.clone()));
                    resources.connectors.push(spec);
                }
                Err(v) => {
                    connector_names.push(None);
                    refused.insert(key(c.as_ref()), v);
                }
            }
        }
        let wanted_listeners: BTreeSet<String> =
            resources.listeners.iter().map(|l| l.name.clone()).collect();
        let wanted_connectors: BTreeSet<String> = resources
            .connectors
            .iter()
            .map(|c| c.name.clone())
            .collect();
        // Deletes first: a listener that moved to another resource's port frees it.
        self.delete_unwanted(&wanted_listeners, &wanted_connectors)
            .await;
        let rows = self.apply(resources).await;
        let verdict = |kind: &str, name: &Option<String>, k: String| -> Verdict {
            match name {
                None => refused
                    .get(&k)
                    .cloned()
                    .unwrap_or_else(|| Verdict::not_ready("Refused", "not applied".to_owned())),
                Some(name) => match rows.get(&(kind.to_owned(), name.clone())) {
                    Some(Ok(())) => Verdict::ready(
                        "Applied",
                        format!(
                            "{} {name} in the router of node {}",
                            kind.to_lowercase(),
                            self.node
                        ),
                    ),
                    Some(Err(e)) => Verdict::not_ready("Refused", e.clone()),
                    None => {
                        Verdict::not_ready("RouterDown", "the router did not answer".to_owned())
                    }
                },
            }
        };
        for (kind, names, owned) in [
            ("Listener", &listener_names, &mut self.owned.listeners),
            ("Connector", &connector_names, &mut self.owned.connectors),
        ] {
            for name in names.iter().flatten() {
                if matches!(rows.get(&(kind.to_owned(), name.clone())), Some(Ok(()))) {
                    owned.insert(name.clone());
                }
            }
        }
        let listeners = listeners
            .iter()
            .zip(&listener_names)
            .map(|(l, n)| (l.clone(), verdict("Listener", n, key(l.as_ref()))))
            .collect();
        let connectors = connectors
            .iter()
            .zip(&connector_names)
            .map(|(c, n)| (c.clone(), verdict("Connector", n, key(c.as_ref()))))
            .collect();
        (listeners, connectors)
    }

    /// The router's listener for a Listener: its namespace is the resource's own.
    fn listener(&self, l: &kinds::Listener) -> Result<service::Listener, Verdict> {
        let namespace = l.namespace().unwrap_or_default();
        let name = router_name(&namespace, &l.name_any())?;
        let mut spec = l.spec.clone();
        match &spec.namespace {
            None => spec.namespace = Some(namespace),
            Some(other) if *other != namespace => {
                return Err(Verdict::not_ready(
                    "Refused",
                    format!(
                        "spec.namespace {other} is not the Listener's own namespace {namespace}: a Listener belongs to its own namespace (allow others with allowNamespaces)"
                    ),
                ));
            }
            Some(_) => {}
        }
        let listener = resource::listener(name, Some(&l.name_any()), spec);
        listener
            .validate()
            .map_err(|e| Verdict::not_ready("Refused", e.to_string()))?;
        Ok(listener)
    }

    /// `spec` if its router name is free: not taken by an older resource of this pass, nor by
    /// something in the router the controller did not make.
    fn claim<T>(
        &self,
        names: &mut BTreeSet<String>,
        in_router: &BTreeSet<String>,
        owned: &BTreeSet<String>,
        spec: T,
        name: impl Fn(&T) -> &String,
    ) -> Result<T, Verdict> {
        let n = name(&spec).clone();
        if in_router.contains(&n) && !owned.contains(&n) {
            return Err(Verdict::not_ready(
                "Conflict",
                format!(
                    "the router of node {} already has {n}, not made by the controller",
                    self.node
                ),
            ));
        }
        if !names.insert(n.clone()) {
            return Err(Verdict::not_ready(
                "Conflict",
                format!("another resource is {n} in the router"),
            ));
        }
        Ok(spec)
    }

    /// The names of the router's listeners and connectors now.
    async fn existing(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let names = |v: Result<Value, admin::Error>| -> BTreeSet<String> {
            v.ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                .collect()
        };
        (
            names(self.call(&Request::ListenerStatus).await),
            names(self.call(&Request::ConnectorStatus).await),
        )
    }

    /// `skiff apply`'s request; each row's result by (kind, name).
    async fn apply(&self, resources: Resources) -> BTreeMap<(String, String), Result<(), String>> {
        if resources.listeners.is_empty() && resources.connectors.is_empty() {
            return BTreeMap::new();
        }
        let rows = match self.call(&Request::Apply { resources }).await {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %error_chain(&e), "apply failed");
                return BTreeMap::new();
            }
        };
        rows.as_array()
            .into_iter()
            .flatten()
            .filter_map(|row| {
                let kind = row["kind"].as_str()?.to_owned();
                let name = row["name"].as_str()?.to_owned();
                let result = match row["result"].as_str() {
                    Some("failed") => Err(row["error"].as_str().unwrap_or("failed").to_owned()),
                    _ => Ok(()),
                };
                Some(((kind, name), result))
            })
            .collect()
    }

    /// Deletes what the controller made and no resource asks for now.
    async fn delete_unwanted(
        &mut self,
        listeners: &BTreeSet<String>,
        connectors: &BTreeSet<String>,
    ) {
        let gone_listeners: Vec<String> = self
            .owned
            .listeners
            .difference(listeners)
            .cloned()
            .collect();
        for name in gone_listeners {
            if self
                .delete(Request::ListenerDelete { name: name.clone() }, &name)
                .await
            {
                self.owned.listeners.remove(&name);
            }
        }
        let gone_connectors: Vec<String> = self
            .owned
            .connectors
            .difference(connectors)
            .cloned()
            .collect();
        for name in gone_connectors {
            if self
                .delete(Request::ConnectorDelete { name: name.clone() }, &name)
                .await
            {
                self.owned.connectors.remove(&name);
            }
        }
    }

    /// Whether `name` is gone from the router (deleted now, or already).
    async fn delete(&self, request: Request, name: &str) -> bool {
        match self.call(&request).await {
            Ok(_) => {
                info!(name, "deleted from the router: its resource is gone");
                true
            }
            Err(admin::Error::Router(message)) if message.starts_with("no ") => true,
            Err(e) => {
                warn!(name, error = %error_chain(&e), "failed to delete from the router");
                false
            }
        }
    }
}
