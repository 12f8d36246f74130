//! The node controller (`skiff controller --node NODE`): watches the skiff resources of the
//! namespaces it serves and this node's pods, and keeps the node's router in step through its
//! admin socket.
//!
//! Level-based: every change to any watched resource (and a resync now and then, for a router
//! that restarted in between) runs one whole [`Reconciler`] pass over what the watches hold,
//! rather than one pass per object. Deletes need no finalizer: a resource that is gone is just
//! not asked for any more, so the pass deletes it from the router, also when it went while no
//! controller ran. Pods go their own way, to the namespace mapping ([`super::pods`]).

use std::{collections::BTreeSet, path::PathBuf, sync::Arc, time::Duration};

use futures::{FutureExt as _, StreamExt as _, stream::BoxStream};
use k8s_openapi::{NamespaceResourceScope, api::core::v1::Pod};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::{
    access::{self, Access},
    pods::{self, AdminSink, PodCgroups},
    reconcile::{Reconciler, Snapshot, router_name},
    secrets::Secrets,
    status,
};
use crate::{
    node::error_chain,
    resource::kinds::{self, Condition, Status},
    site::{self, StateDir},
};

/// Options of `skiff controller`.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node's name (`spec.nodeName` of its pods).
    pub node: String,
    /// The namespaces whose resources it acts on; every namespace when empty.
    pub namespaces: Vec<String>,
    /// The router's state directory (its admin socket, and where the site is created).
    pub state: StateDir,
    /// Where kubepods cgroups are looked for: every cgroup2 mount when empty.
    pub cgroup_roots: Vec<PathBuf>,
    /// How often the whole state is applied again without a change.
    pub resync: Duration,
}

/// The controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read the controller's record in the state directory")]
    State(#[from] site::Error),
}

/// How soon a pass runs again after the router did not answer.
const ROUTER_RETRY: Duration = Duration::from_secs(2);

/// Which watch a signal came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Site,
    SitePolicy,
    Listener,
    Connector,
    AccessGrant,
    AccessToken,
    Link,
}

/// How many kinds are watched: a pass waits until each has been listed once.
const KINDS: usize = 7;

/// A change in one of the watched kinds; `listed` once its first list is complete.
struct Signal {
    kind: Kind,
    listed: bool,
}

/// Watches every `K` into `writer`, signalling each change.
fn reflect<K>(
    client: &Client,
    kind: Kind,
    writer: reflector::store::Writer<K>,
) -> BoxStream<'static, Signal>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .filter_map(move |event| async move {
            match event {
                Ok(event) => Some(Signal {
                    kind,
                    listed: matches!(event, watcher::Event::InitDone),
                }),
                Err(e) => {
                    warn!(?kind, error = %error_chain(&e), "watch failed; retrying");
                    None
                }
            }
        })
        .boxed()
}

/// The stores of the watched kinds.
struct Stores {
    sites: Store<kinds::Site>,
    policies: Store<kinds::SitePolicy>,
    listeners: Store<kinds::Listener>,
    connectors: Store<kinds::Connector>,
    grants: Store<kinds::AccessGrant>,
    tokens: Store<kinds::AccessToken>,
    links: Store<kinds::Link>,
}

impl Stores {
    /// What the served namespaces hold now: the services and the site, and what links it.
    fn snapshot(&self, served: &dyn Fn(&str) -> bool) -> (Snapshot, access::Wanted) {
        fn pick<K: Resource<DynamicType = ()> + Clone>(
            store: &Store<K>,
            served: &dyn Fn(&str) -> bool,
        ) -> Vec<Arc<K>> {
            store
                .state()
                .into_iter()
                .filter(|k| served(k.meta().namespace.as_deref().unwrap_or_default()))
                // Being deleted: gone as far as the router is concerned.
                .filter(|k| k.meta().deletion_timestamp.is_none())
                .collect()
        }
        (
            Snapshot {
                sites: pick(&self.sites, served),
                policies: pick(&self.policies, served),
                listeners: pick(&self.listeners, served),
                connectors: pick(&self.connectors, served),
            },
            access::Wanted {
                grants: pick(&self.grants, served),
                tokens: pick(&self.tokens, served),
                links: pick(&self.links, served),
            },
        )
    }
}

/// Runs the controller until the watches end (they do not, short of the process ending).
///
/// # Errors
/// When the controller's records in the state directory cannot be read.
pub async fn run(client: Client, options: Options) -> Result<(), Error> {
    let mut reconciler = Reconciler::new(options.state.clone(), options.node.clone())?;
    let mut secrets = Secrets::new(client.clone(), options.state.clone());
    let mut access = Access::new(client.clone(), options.state.clone())?;
    let (sites, sites_w) = reflector::store();
    let (policies, policies_w) = reflector::store();
    let (listeners, listeners_w) = reflector::store();
    let (connectors, connectors_w) = reflector::store();
    let (grants, grants_w) = reflector::store();
    let (tokens, tokens_w) = reflector::store();
    let (links, links_w) = reflector::store();
    let stores = Stores {
        sites,
        policies,
        listeners,
        connectors,
        grants,
        tokens,
        links,
    };
    let mut signals = futures::stream::select_all([
        reflect(&client, Kind::Site, sites_w),
        reflect(&client, Kind::SitePolicy, policies_w),
        reflect(&client, Kind::Listener, listeners_w),
        reflect(&client, Kind::Connector, connectors_w),
        reflect(&client, Kind::AccessGrant, grants_w),
        reflect(&client, Kind::AccessToken, tokens_w),
        reflect(&client, Kind::Link, links_w),
    ]);

    let pods = tokio::spawn(follow_pods(client.clone(), options.clone()));
    let served: BTreeSet<String> = options.namespaces.iter().cloned().collect();
    let served = move |ns: &str| served.is_empty() || served.contains(ns);
    info!(node = %options.node, namespaces = ?options.namespaces, "node controller running");

    let mut listed = BTreeSet::new();
    let mut written = Written::default();
    let mut resync = tokio::time::interval(options.resync);
    let mut router_down = false;
    loop {
        // A router that did not answer (starting with a site just created, or restarting) is
        // tried again soon rather than at the next resync, and so is a redemption that did
        // not reach its issuer.
        let wait = [router_down.then_some(ROUTER_RETRY), access.next_retry()]
            .into_iter()
            .flatten()
            .min();
        let retry = async {
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            signal = signals.next() => {
                let Some(signal) = signal else { break };
                if signal.listed {
                    listed.insert(signal.kind);
                }
                // Take every change already waiting, then act once on all of them.
                while let Some(Some(signal)) = signals.next().now_or_never() {
                    if signal.listed {
                        listed.insert(signal.kind);
                    }
                }
            }
            _ = resync.tick() => {}
            () = retry => {}
        }
        // Until every kind is listed, an absent resource may just not be listed yet: acting
        // would delete it from the router.
        if listed.len() < KINDS {
            continue;
        }
        let (snapshot, linking) = stores.snapshot(&served);
        let outcome = reconciler.reconcile(snapshot).await;
        router_down = outcome.router_down;
        if !outcome.router_down
            && let Ok(site) = options.state.config()
        {
            let connectors: Vec<(&kinds::Connector, String)> = outcome
                .connectors
                .iter()
                .filter(|(_, v)| v.ready)
                .filter_map(|(c, _)| {
                    let name = router_name(&c.namespace().unwrap_or_default(), &c.name_any());
                    Some((c.as_ref(), name.ok()?))
                })
                .collect();
            let listeners: Vec<&kinds::Listener> = outcome
                .listeners
                .iter()
                .filter(|(_, v)| v.ready)
                .map(|(l, _)| l.as_ref())
                .collect();
            secrets.sync(&site.name, &connectors, &listeners).await;
        }
        let mut present = std::collections::HashSet::new();
        let w = &mut written;
        w.write_all(&client, &outcome.sites, |o| o.status.as_ref(), &mut present)
            .await;
        w.write_all(
            &client,
            &outcome.policies,
            |o| o.status.as_ref(),
            &mut present,
        )
        .await;
        w.write_all(
            &client,
            &outcome.listeners,
            |o| o.status.as_ref(),
            &mut present,
        )
        .await;
        w.write_all(
            &client,
            &outcome.connectors,
            |o| o.status.as_ref(),
            &mut present,
        )
        .await;
        let linked = if outcome.router_down {
            access::Outcome::default()
        } else {
            access.sync(&linking).await
        };
        w.write_all(&client, &linked.grants, |o| o.status.as_ref(), &mut present)
            .await;
        w.write_all(&client, &linked.tokens, |o| o.status.as_ref(), &mut present)
            .await;
        w.write_all(&client, &linked.links, |o| o.status.as_ref(), &mut present)
            .await;
        written
            .0
            .retain(|uid, _| present.contains(&Some(uid.clone())));
    }
    pods.abort();
    Ok(())
}

/// The last condition written on each object (by uid). The watch brings the written status
/// back a moment later; until it does, a pass sees the status from before and would write
/// the same condition again.
#[derive(Default)]
struct Written(std::collections::HashMap<String, Condition>);

impl Written {
    /// Writes each verdict of a pass on its object ([`Self::write`]); notes the objects' uids
    /// in `present`.
    async fn write_all<K>(
        &mut self,
        client: &Client,
        verdicts: &[(Arc<K>, status::Verdict)],
        status: impl Fn(&K) -> Option<&Status>,
        present: &mut std::collections::HashSet<Option<String>>,
    ) where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        for (object, verdict) in verdicts {
            present.insert(object.uid());
            self.write(client, object.as_ref(), status(object), verdict)
                .await;
        }
    }

    /// Writes `verdict` on `object` unless its status, or the last write, says so already.
    async fn write<K>(
        &mut self,
        client: &Client,
        object: &K,
        current: Option<&Status>,
        verdict: &status::Verdict,
    ) where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let generation = object.meta().generation;
        let Some(condition) = verdict.condition(current, generation) else {
            return;
        };
        let uid = object.uid().unwrap_or_default();
        let last = self.0.get(&uid).map(|c| Status {
            conditions: vec![c.clone()],
        });
        if last.is_some() && verdict.condition(last.as_ref(), generation).is_none() {
            return;
        }
        match status::write(client, object, condition.clone()).await {
            Ok(()) => {
                self.0.insert(uid, condition);
            }
            Err(e) => warn!(
                kind = %K::kind(&()),
                namespace = object.namespace().unwrap_or_default(),
                name = %object.name_any(),
                error = %error_chain(&e),
                "failed to write status"
            ),
        }
    }
}

/// Watches the pods of this node and sets their namespaces in the router.
async fn follow_pods(client: Client, options: Options) {
    let roots = if options.cgroup_roots.is_empty() {
        super::cgroups::cgroup2_mounts()
    } else {
        options.cgroup_roots.clone()
    };
    let tracker = PodCgroups::new(roots);
    if tracker.roots().is_empty() {
        warn!("no kubepods cgroup found yet: looked for again as pods come");
    }
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", options.node));
    let events = watcher(api, config)
        .default_backoff()
        .filter_map(|event| async move {
            event
                .map_err(|e| warn!(error = %error_chain(&e), "pod watch failed; retrying"))
                .ok()
        });
    let sink = AdminSink(options.state.admin_socket());
    pods::follow(tracker, events, &sink).await;
}
