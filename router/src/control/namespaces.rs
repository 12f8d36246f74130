//! Namespaces set while the router runs (the node controller's: one per Kubernetes namespace
//! with pods on this node), and `STATE/namespaces.json`.
//!
//! Stored so that a restarted router registers them again before it restores the listeners
//! that name them: without them a listener of a pod namespace could not be protected, and
//! would be left out until the controller came back to it. Directories that went while the
//! router was down are left out at restore (they no longer exist); the controller then sets
//! each namespace again from what it sees.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tracing::{info, warn};

use crate::{
    isolation::{self, CgroupChange},
    node::{Node, error_chain},
    service,
    site::{self, StateDir, StateFile},
};

/// A namespace whose directories could not be set.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "namespace name {0:?} is not valid: use 1 to 63 lowercase letters, digits and '-', as Kubernetes namespaces do"
    )]
    Name(String),
    #[error("cgroup path {} is not absolute", .0.display())]
    Relative(PathBuf),
    #[error(transparent)]
    Isolation(#[from] isolation::Error),
    #[error("namespace {name} set, but the change was not stored (it is lost at the next restart)")]
    NotStored {
        name: String,
        #[source]
        source: site::Error,
    },
}

/// What `NamespaceSet` answers.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceSet {
    pub namespace: String,
    /// Whether the site isolates namespaces (without it, the directories are only stored).
    pub enforced: bool,
    #[serde(flatten)]
    pub change: CgroupChange,
}

/// The namespaces set at run time and their directories.
pub struct Namespaces {
    table: Mutex<BTreeMap<String, Vec<PathBuf>>>,
    file: StateFile,
    node: Arc<Node>,
}

impl std::fmt::Debug for Namespaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespaces").finish_non_exhaustive()
    }
}

/// The file's name in the state directory.
const FILE: &str = "namespaces.json";

impl Namespaces {
    #[must_use]
    pub fn new(state: &StateDir, node: Arc<Node>) -> Self {
        Self {
            table: Mutex::new(BTreeMap::new()),
            file: StateFile::new(state, FILE),
            node,
        }
    }

    /// Registers the namespaces of `STATE/namespaces.json` again; one that fails is logged
    /// and left out.
    pub fn restore(&self, stored: BTreeMap<String, Vec<PathBuf>>) {
        for (name, dirs) in stored {
            match self.node.set_namespace(&name, &dirs) {
                Ok(change) => {
                    let missing = change.map_or(0, |c| c.missing.len());
                    info!(namespace = %name, directories = dirs.len() - missing, missing, "namespace restored");
                    self.table
                        .lock()
                        .expect("namespaces lock")
                        .insert(name, dirs);
                }
                Err(e) => {
                    warn!(namespace = %name, error = %error_chain(&e), "failed to restore namespace");
                }
            }
        }
    }

    /// Makes `dirs` the cgroup v2 directories of namespace `name`, in the kernel and then on
    /// disk.
    ///
    /// # Errors
    /// When the name or a path is not valid, the kernel's map refuses the change, or it
    /// cannot be stored.
    pub async fn set(&self, name: String, mut dirs: Vec<PathBuf>) -> Result<NamespaceSet, Error> {
        if !service::is_dns_label(&name) {
            return Err(Error::Name(name));
        }
        if let Some(relative) = dirs.iter().find(|d| !d.is_absolute()) {
            return Err(Error::Relative(relative.clone()));
        }
        dirs.sort();
        dirs.dedup();
        let change = self.node.set_namespace(&name, &dirs)?;
        let unchanged = {
            let mut table = self.table.lock().expect("namespaces lock");
            let kept: Vec<PathBuf> = match &change {
                Some(c) => dirs
                    .iter()
                    .filter(|d| !c.missing.contains(d))
                    .cloned()
                    .collect(),
                None => dirs,
            };
            table.insert(name.clone(), kept.clone()) == Some(kept)
        };
        if !unchanged {
            self.file
                .write(|| self.table.lock().expect("namespaces lock").clone())
                .await
                .map_err(|source| Error::NotStored {
                    name: name.clone(),
                    source,
                })?;
        }
        Ok(NamespaceSet {
            namespace: name,
            enforced: change.is_some(),
            change: change.unwrap_or_default(),
        })
    }
}
