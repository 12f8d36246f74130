//! The site's services: listeners (where workloads connect) and connectors (where the
//! backends are), their kernel registrations, and `STATE/resources.json`.
//!
//! The table is behind one `Mutex`, held for lookups and inserts only: binding, issuing
//! certificates and writing the state file happen outside it (the file's writers take turns on
//! its own lock, see [`StateFile`]). Lock order: table, then the node's locks (leaves).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
};

use ebpf_common::EndpointKind;
use serde::Serialize;
use tokio::task::AbortHandle;
use tracing::info;

use super::{
    certs::{self, Certs, ListenerTlsSetup},
    network::Network,
};
use crate::{
    admin::BundleKind,
    forward::{Backend, Forwarding, ServiceStats},
    isolation::{self, Protection},
    link,
    node::Node,
    policy::{self, Gate},
    service::{self, Connector, Listener, Resources},
    site::{self, StateDir, StateFile},
    tls,
};

/// Which kind of service an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Listener,
    Connector,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Listener => "listener",
            Self::Connector => "connector",
        })
    }
}

/// A listener or connector that could not be created, changed or deleted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] service::Invalid),
    #[error("{kind} {name}")]
    Denied {
        kind: Kind,
        name: String,
        #[source]
        denied: policy::Denied,
    },
    #[error("{kind} {name} already exists")]
    Exists { kind: Kind, name: String },
    #[error(
        "connector {name}: this site has {max} connectors, as many as its link-state advertisement can carry"
    )]
    TooMany { name: String, max: usize },
    #[error("failed to bind listener {name} on {addr}")]
    Bind {
        name: String,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listener {name}: failed to protect it at connect()")]
    Protect {
        name: String,
        #[source]
        source: isolation::Error,
    },
    #[error("{kind} {name}")]
    Tls {
        kind: Kind,
        name: String,
        #[source]
        source: certs::Error,
    },
    #[error("{kind} {name}: failed to store it")]
    NotStored {
        kind: Kind,
        name: String,
        #[source]
        source: site::Error,
    },
    #[error("no {kind} named {name}")]
    NotFound { kind: Kind, name: String },
    #[error(
        "{kind} {name} deleted, but the change was not stored (it returns at the next restart)"
    )]
    DeletedNotStored {
        kind: Kind,
        name: String,
        #[source]
        source: site::Error,
    },
}

struct ListenerRt {
    /// Its protection at connect(), when namespaces are isolated.
    protection: Option<Protection>,
    /// Its certificate, when this site issued it (replaced on rotation).
    cert: Option<Arc<tls::RotatingCert>>,
    spec: Listener,
    /// The address actually bound (the spec's port may be 0).
    bound: Option<SocketAddr>,
    task: AbortHandle,
    stats: Arc<ServiceStats>,
}

#[derive(Default)]
struct Table {
    listeners: BTreeMap<String, ListenerRt>,
    connectors: BTreeMap<String, Connector>,
}

/// Listeners and connectors.
pub struct Services {
    table: Mutex<Table>,
    file: StateFile,
    forwarding: Arc<Forwarding>,
    network: Arc<Network>,
    gate: Arc<Gate>,
    node: Arc<Node>,
    certs: Arc<Certs>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").finish_non_exhaustive()
    }
}

/// One row of `skiff apply`'s answer.
#[derive(Debug, Serialize)]
pub struct ApplyRow {
    pub kind: &'static str,
    pub name: String,
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One listener, as `skiff listener status` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerView {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub routing_key: String,
    pub reachable: bool,
    pub connections: u64,
}

/// What a new site policy did to the services.
#[derive(Debug, Default)]
pub struct PolicyEffect {
    pub withdrawn: Vec<String>,
    pub advertised: Vec<String>,
    /// Listeners whose routing key the policy no longer allows (each new connection is
    /// refused).
    pub refusing: Vec<String>,
}

impl Services {
    #[must_use]
    pub fn new(
        state: &StateDir,
        forwarding: Arc<Forwarding>,
        network: Arc<Network>,
        gate: Arc<Gate>,
        node: Arc<Node>,
        certs: Arc<Certs>,
    ) -> Self {
        Self {
            table: Mutex::new(Table::default()),
            file: StateFile::new(state, "resources.json"),
            forwarding,
            network,
            gate,
            node,
            certs,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("services lock")
    }

    /// Starts the listeners and connectors of `STATE/resources.json`; one that fails is
    /// logged and left out.
    pub async fn restore(&self, resources: Resources) {
        for connector in resources.connectors {
            if let Err(e) = self.add_connector(connector, false).await {
                tracing::warn!(error = %crate::node::error_chain(&e), "failed to restore connector");
            }
        }
        for listener in resources.listeners {
            let name = listener.name.clone();
            if let Err(e) = self.add_listener(listener, false).await {
                tracing::warn!(listener = %name, error = %crate::node::error_chain(&e), "failed to restore listener");
            }
        }
    }

    /// Writes `STATE/resources.json` from the listeners and connectors that exist now.
    async fn save(&self) -> Result<(), site::Error> {
        self.file
            .write(|| {
                let table = self.table();
                Resources {
                    listeners: table.listeners.values().map(|l| l.spec.clone()).collect(),
                    connectors: table.connectors.values().cloned().collect(),
                }
            })
            .await
    }

    /// Adds a connector. A new one (`persist`) must be allowed by the site policy; a restored
    /// one is kept either way, and its key is advertised only while the policy allows it.
    ///
    /// # Errors
    /// When it is invalid, denied, exists, does not fit, or cannot be stored.
    pub async fn add_connector(&self, connector: Connector, persist: bool) -> Result<(), Error> {
        connector.validate()?;
        let name = connector.name.clone();
        let key = connector.routing_key.clone();
        let allowed = self.gate.check(|p| {
            p.service(&key)?;
            p.exposed_resource(&connector.host, connector.port, None)
        });
        if let Err(denied) = &allowed {
            self.gate.denied(denied, false);
            if persist {
                return Err(Error::Denied {
                    kind: Kind::Connector,
                    name,
                    denied: denied.clone(),
                });
            }
        }
        let tls = match &connector.tls {
            Some(tls) => Some(
                self.certs
                    .connector_tls(&connector, tls)
                    .map_err(|source| Error::Tls {
                        kind: Kind::Connector,
                        name: name.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        {
            let mut table = self.table();
            if table.connectors.contains_key(&name) {
                return Err(Error::Exists {
                    kind: Kind::Connector,
                    name,
                });
            }
            if table.connectors.len() >= link::frame::MAX_LIST {
                return Err(Error::TooMany {
                    name,
                    max: link::frame::MAX_LIST,
                });
            }
            if let Ok(addr) = connector.backend_addr().parse::<SocketAddr>() {
                self.node.set_endpoint(addr, Some(EndpointKind::Backend));
            }
            table.connectors.insert(name.clone(), connector.clone());
        }
        if persist && let Err(source) = self.save().await {
            // Not stored, so not kept: the connector would vanish at the next restart.
            let mut table = self.table();
            table.connectors.remove(&name);
            self.forget_backend_endpoint(&table, &connector);
            return Err(Error::NotStored {
                kind: Kind::Connector,
                name,
                source,
            });
        }
        let backend = Backend {
            name: name.clone(),
            routing_key: connector.routing_key,
            host: connector.host,
            port: connector.port,
            tls,
            stats: Arc::new(ServiceStats::default()),
        };
        self.forwarding.add_backend(&name, backend, allowed.is_ok());
        if allowed.is_ok() {
            self.network.advertise_key(&key);
        }
        Ok(())
    }

    /// Adds a listener: binds it, registers it with the node, and serves it. A restored one
    /// is kept even when the policy forbids its key: each connection is checked as it
    /// arrives.
    ///
    /// # Errors
    /// When it is invalid, denied, exists, cannot bind, cannot be protected, or cannot be
    /// stored.
    pub async fn add_listener(&self, spec: Listener, persist: bool) -> Result<(), Error> {
        spec.validate()?;
        let name = spec.name.clone();
        let exists = || Error::Exists {
            kind: Kind::Listener,
            name: name.clone(),
        };
        if self.table().listeners.contains_key(&name) {
            return Err(exists());
        }
        if let Err(denied) = self.gate.check(|p| p.service(&spec.routing_key)) {
            self.gate.denied(&denied, false);
            if persist {
                return Err(Error::Denied {
                    kind: Kind::Listener,
                    name,
                    denied,
                });
            }
        }
        let (tls, cert) = match &spec.tls {
            Some(tls) => {
                let ListenerTlsSetup { acceptor, rotating } = self
                    .certs
                    .listener_tls(&spec, tls)
                    .map_err(|source| Error::Tls {
                    kind: Kind::Listener,
                    name: name.clone(),
                    source,
                })?;
                (Some(acceptor), rotating)
            }
            None => (None, None),
        };
        let socket = self
            .forwarding
            .datapath()
            .listen(&spec.bind_addr())
            .await
            .map_err(|source| Error::Bind {
                name: name.clone(),
                addr: spec.bind_addr(),
                source,
            })?;
        let bound = socket.local_addr().ok();
        let protection = match bound {
            Some(addr) => self
                .node
                .protect(addr, spec.namespace.clone(), &spec.allow_namespaces)
                .map_err(|source| Error::Protect {
                    name: name.clone(),
                    source,
                })?,
            None => None,
        };
        if let Some(addr) = bound {
            self.node.set_endpoint(addr, Some(EndpointKind::Listener));
        }
        let stats = Arc::new(ServiceStats::default());
        let task = tokio::spawn(Arc::clone(&self.forwarding).serve_listener(
            socket,
            (name.clone(), spec.routing_key.clone()),
            tls,
            Arc::clone(&stats),
        ))
        .abort_handle();
        info!(listener = %name, addr = %spec.bind_addr(), routing_key = %spec.routing_key, "listener up");
        let listener = ListenerRt {
            protection,
            cert,
            spec,
            bound,
            task,
            stats,
        };
        {
            let mut table = self.table();
            // Another request may have added one of this name while this one was binding.
            if table.listeners.contains_key(&name) {
                drop(table);
                self.retire_listener(&listener);
                return Err(exists());
            }
            table.listeners.insert(name.clone(), listener);
        }
        if persist && let Err(source) = self.save().await {
            // Not stored, so not kept: the listener would vanish at the next restart.
            let listener = self.table().listeners.remove(&name);
            if let Some(listener) = listener {
                self.retire_listener(&listener);
            }
            return Err(Error::NotStored {
                kind: Kind::Listener,
                name,
                source,
            });
        }
        Ok(())
    }

    /// Brings listeners and connectors to `resources`: creates missing ones, replaces changed
    /// ones, leaves identical ones alone. Returns one row per resource.
    pub async fn apply(&self, resources: Resources) -> Vec<ApplyRow> {
        let mut rows = Vec::new();
        for connector in resources.connectors {
            let existing = self.table().connectors.get(&connector.name).cloned();
            let name = connector.name.clone();
            let result = match existing {
                Some(old) if old == connector => Ok("unchanged"),
                Some(_) => match self.delete_connector(&name).await {
                    Ok(()) => self
                        .add_connector(connector, true)
                        .await
                        .map(|()| "configured"),
                    Err(e) => Err(e),
                },
                None => self
                    .add_connector(connector, true)
                    .await
                    .map(|()| "created"),
            };
            rows.push(apply_row("Connector", name, result));
        }
        for listener in resources.listeners {
            let existing = self
                .table()
                .listeners
                .get(&listener.name)
                .map(|l| l.spec.clone());
            let name = listener.name.clone();
            let result = match existing {
                Some(old) if old == listener => Ok("unchanged"),
                Some(_) => match self.delete_listener(&name).await {
                    Ok(()) => self
                        .add_listener(listener, true)
                        .await
                        .map(|()| "configured"),
                    Err(e) => Err(e),
                },
                None => self.add_listener(listener, true).await.map(|()| "created"),
            };
            rows.push(apply_row("Listener", name, result));
        }
        rows
    }

    /// Deletes a listener: it stops accepting at once; connections it accepted go on.
    ///
    /// # Errors
    /// When there is none of that name, or the change cannot be stored (it is deleted
    /// anyway).
    pub async fn delete_listener(&self, name: &str) -> Result<(), Error> {
        let listener = self
            .table()
            .listeners
            .remove(name)
            .ok_or_else(|| Error::NotFound {
                kind: Kind::Listener,
                name: name.to_owned(),
            })?;
        self.retire_listener(&listener);
        self.save().await.map_err(|source| Error::DeletedNotStored {
            kind: Kind::Listener,
            name: name.to_owned(),
            source,
        })
    }

    /// Deletes a connector and withdraws its key from the network (when it was advertised).
    ///
    /// # Errors
    /// When there is none of that name, or the change cannot be stored (it is deleted
    /// anyway).
    pub async fn delete_connector(&self, name: &str) -> Result<(), Error> {
        let removed = {
            let mut table = self.table();
            let removed = table
                .connectors
                .remove(name)
                .ok_or_else(|| Error::NotFound {
                    kind: Kind::Connector,
                    name: name.to_owned(),
                })?;
            self.forget_backend_endpoint(&table, &removed);
            removed
        };
        let stored = self.save().await.map_err(|source| Error::DeletedNotStored {
            kind: Kind::Connector,
            name: name.to_owned(),
            source,
        });
        // Withheld by the policy, it was never advertised: nothing to withdraw.
        if self.forwarding.remove_backend(name) {
            self.network.withdraw_key(&removed.routing_key);
        }
        stored
    }

    /// Stops a listener taken out of the table: no more accepts, no acceleration endpoint,
    /// no protection.
    fn retire_listener(&self, listener: &ListenerRt) {
        listener.task.abort();
        if let Some(addr) = listener.bound {
            self.node.set_endpoint(addr, None);
        }
        if let Some(protection) = &listener.protection {
            self.node.unprotect(protection);
        }
    }

    /// Removes `connector`'s backend from the accelerated endpoints, unless another connector
    /// in `table` reaches the same address.
    fn forget_backend_endpoint(&self, table: &Table, connector: &Connector) {
        let shared = table
            .connectors
            .values()
            .any(|c| c.backend_addr() == connector.backend_addr());
        if !shared && let Ok(addr) = connector.backend_addr().parse::<SocketAddr>() {
            self.node.set_endpoint(addr, None);
        }
    }

    /// Stops every listener (shutdown): connections they accepted go on.
    pub fn stop_listeners(&self) {
        for (_, listener) in std::mem::take(&mut self.table().listeners) {
            listener.task.abort();
        }
    }

    /// Gives every TLS listener whose certificate this site issued a new one. Returns how
    /// many it renewed.
    ///
    /// # Errors
    /// When issuing a certificate fails (the listeners before it are renewed).
    pub fn rotate(&self) -> Result<usize, Error> {
        let listeners: Vec<(Listener, Arc<tls::RotatingCert>)> = self
            .table()
            .listeners
            .values()
            .filter_map(|l| l.cert.as_ref().map(|c| (l.spec.clone(), Arc::clone(c))))
            .collect();
        for (spec, cert) in &listeners {
            let tls_error = |source| Error::Tls {
                kind: Kind::Listener,
                name: spec.name.clone(),
                source,
            };
            let new = self.certs.listener_identity(spec).map_err(tls_error)?;
            cert.set(&new)
                .map_err(|e| tls_error(certs::Error::Tls(e)))?;
        }
        Ok(listeners.len())
    }

    /// Applies the policy now in force: connectors it no longer allows are withdrawn from the
    /// network, those it allows again are advertised; listeners check each new connection.
    pub fn apply_policy(&self) -> PolicyEffect {
        let mut effect = PolicyEffect::default();
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        let table = self.table();
        for c in table.connectors.values() {
            let allowed = self
                .gate
                .check(|p| {
                    p.service(&c.routing_key)?;
                    p.exposed_resource(&c.host, c.port, None)
                })
                .is_ok();
            let was = self.forwarding.set_advertised(&c.name, allowed);
            if allowed && !was {
                add.push(c.routing_key.clone());
                effect.advertised.push(c.name.clone());
            } else if !allowed && was {
                remove.push(c.routing_key.clone());
                effect.withdrawn.push(c.name.clone());
            }
        }
        effect.refusing = table
            .listeners
            .values()
            .filter(|l| self.gate.check(|p| p.service(&l.spec.routing_key)).is_err())
            .map(|l| l.spec.name.clone())
            .collect();
        drop(table);
        self.network.change_keys(&add, &remove);
        effect
    }

    /// A bundle for a workload (a client of TLS listener `name`) or a backend (the server of
    /// TLS connector `name`).
    ///
    /// # Errors
    /// When there is no such listener or connector, or issuing fails.
    pub fn bundle(&self, kind: BundleKind, name: &str) -> Result<certs::Bundle, Error> {
        let not_found = |kind| Error::NotFound {
            kind,
            name: name.to_owned(),
        };
        let tls_error = |kind| {
            move |source| Error::Tls {
                kind,
                name: name.to_owned(),
                source,
            }
        };
        match kind {
            BundleKind::Client => {
                let spec = self
                    .table()
                    .listeners
                    .get(name)
                    .map(|l| l.spec.clone())
                    .ok_or_else(|| not_found(Kind::Listener))?;
                self.certs
                    .client_bundle(&spec)
                    .map_err(tls_error(Kind::Listener))
            }
            BundleKind::Server => {
                let connector = self
                    .table()
                    .connectors
                    .get(name)
                    .cloned()
                    .ok_or_else(|| not_found(Kind::Connector))?;
                self.certs
                    .server_bundle(&connector)
                    .map_err(tls_error(Kind::Connector))
            }
        }
    }

    /// How many listeners and connectors there are.
    #[must_use]
    pub fn counts(&self) -> (usize, usize) {
        let table = self.table();
        (table.listeners.len(), table.connectors.len())
    }

    #[must_use]
    pub fn listener_views(&self) -> Vec<ListenerView> {
        let rows: Vec<ListenerView> = self
            .table()
            .listeners
            .values()
            .map(|l| ListenerView {
                name: l.spec.name.clone(),
                host: l.spec.host.clone(),
                port: l.bound.map_or(l.spec.port, |b| b.port()),
                routing_key: l.spec.routing_key.clone(),
                reachable: false,
                connections: l.stats.opened.load(Ordering::Relaxed),
            })
            .collect();
        // Routing's lock is taken after the table's is let go.
        rows.into_iter()
            .map(|mut row| {
                row.reachable = self.network.reachable(&row.routing_key);
                row
            })
            .collect()
    }

    /// Each listener's counters, with its name and routing key.
    #[must_use]
    pub fn listener_stats(&self) -> Vec<(String, String, Arc<ServiceStats>)> {
        self.table()
            .listeners
            .values()
            .map(|l| {
                (
                    l.spec.name.clone(),
                    l.spec.routing_key.clone(),
                    Arc::clone(&l.stats),
                )
            })
            .collect()
    }

    #[must_use]
    pub fn connectors(&self) -> Vec<Connector> {
        self.table().connectors.values().cloned().collect()
    }
}

fn apply_row(kind: &'static str, name: String, result: Result<&'static str, Error>) -> ApplyRow {
    match result {
        Ok(result) => ApplyRow {
            kind,
            name,
            result,
            error: None,
        },
        Err(e) => ApplyRow {
            kind,
            name,
            result: "failed",
            error: Some(crate::node::error_chain(&e)),
        },
    }
}
