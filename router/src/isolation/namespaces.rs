//! The namespace registry: which cgroup v2 directories belong to which namespace, mirrored
//! into the hooks' `SKIFF_NAMESPACES` map (cgroup id -> namespace id).
//!
//! A namespace's id never changes while the router runs, even when its last directory goes:
//! listeners refer to namespaces by id in `SKIFF_ALLOWED`, and a namespace whose pods leave a
//! node and come back must still reach its own listeners. A site's own namespaces (`site
//! create --namespace`) are fixed; the others are set whole, directory list by directory
//! list, while the router runs (`NamespaceSet` on the admin socket: the node controller's
//! pods).

use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, MapData};
use ebpf_common::{ISOLATION_MAX_ENTRIES, NAMESPACES_MAP};
use serde::Serialize;

use super::{Error, map_err};

/// One namespace: its id and its directories (cgroup id -> path).
#[derive(Debug)]
struct Namespace {
    id: u32,
    cgroups: BTreeMap<u64, PathBuf>,
    /// Registered by the site's configuration: not changed at run time.
    fixed: bool,
}

/// What setting a namespace's directories changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CgroupChange {
    /// Directories registered now that were not before.
    pub added: usize,
    /// Directories no longer registered.
    pub removed: usize,
    /// Directories asked for that do not exist (a pod that went while it was being
    /// registered); left out.
    pub missing: Vec<PathBuf>,
}

/// Namespaces by name, and the map the hooks read.
pub(super) struct Registry {
    map: HashMap<MapData, u64, u32>,
    namespaces: BTreeMap<String, Namespace>,
    next_id: u32,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.namespaces.iter().map(|(k, v)| (k, v.id)))
            .finish()
    }
}

/// A cgroup v2 directory's id: its inode number.
fn cgroup_id(path: &Path) -> io::Result<u64> {
    std::fs::metadata(path).map(|m| m.ino())
}

impl Registry {
    /// Registers the site's own namespaces (name -> the root of its subtree), fixed.
    pub(super) fn new(
        map: HashMap<MapData, u64, u32>,
        fixed: &BTreeMap<String, PathBuf>,
    ) -> Result<Self, Error> {
        let mut registry = Self {
            map,
            namespaces: BTreeMap::new(),
            next_id: 1,
        };
        for (name, path) in fixed {
            let id = cgroup_id(path).map_err(|source| Error::Cgroup {
                namespace: name.clone(),
                path: path.clone(),
                source,
            })?;
            let ns = registry.entry(name)?;
            ns.fixed = true;
            ns.cgroups.insert(id, path.clone());
            let ns_id = ns.id;
            registry
                .map
                .insert(id, ns_id, 0)
                .map_err(map_err(NAMESPACES_MAP))?;
        }
        Ok(registry)
    }

    /// The namespace `name`, made (with the next id and no directories) if it is new.
    fn entry(&mut self, name: &str) -> Result<&mut Namespace, Error> {
        if !self.namespaces.contains_key(name) {
            if self.next_id > ISOLATION_MAX_ENTRIES {
                return Err(Error::TooManyNamespaces(ISOLATION_MAX_ENTRIES));
            }
            let id = self.next_id;
            self.next_id += 1;
            self.namespaces.insert(
                name.to_owned(),
                Namespace {
                    id,
                    cgroups: BTreeMap::new(),
                    fixed: false,
                },
            );
        }
        Ok(self
            .namespaces
            .get_mut(name)
            .expect("inserted above when missing"))
    }

    /// The id of namespace `name`, if it is registered.
    pub(super) fn id(&self, name: &str) -> Option<u32> {
        self.namespaces.get(name).map(|ns| ns.id)
    }

    /// The name of namespace `id`.
    pub(super) fn name(&self, id: u32) -> Option<&str> {
        self.namespaces
            .iter()
            .find(|(_, ns)| ns.id == id)
            .map(|(name, _)| name.as_str())
    }

    /// Makes `dirs` the directories of namespace `name` (registering the name if it is new):
    /// each and its whole subtree belong to it from the next connect() on, and directories it
    /// had before but not in `dirs` no longer do. New entries go in before old ones go out,
    /// so a directory in both lists is never without its namespace.
    ///
    /// # Errors
    /// When `name` is one of the site's own namespaces, a directory belongs to another
    /// namespace or cannot be read (other than not existing), or the map is full.
    pub(super) fn set(&mut self, name: &str, dirs: &[PathBuf]) -> Result<CgroupChange, Error> {
        if self.namespaces.get(name).is_some_and(|ns| ns.fixed) {
            return Err(Error::Fixed(name.to_owned()));
        }
        let mut change = CgroupChange::default();
        let mut wanted = BTreeMap::new();
        for dir in dirs {
            match cgroup_id(dir) {
                Ok(id) => {
                    wanted.insert(id, dir.clone());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => change.missing.push(dir.clone()),
                Err(source) => {
                    return Err(Error::Cgroup {
                        namespace: name.to_owned(),
                        path: dir.clone(),
                        source,
                    });
                }
            }
        }
        if let Some((other, path)) = self.claimed_elsewhere(name, &wanted) {
            return Err(Error::Claimed {
                namespace: name.to_owned(),
                other,
                path,
            });
        }
        let ns = self.entry(name)?;
        let id = ns.id;
        let old = std::mem::take(&mut ns.cgroups);
        let mut failed = None;
        for cgroup in wanted.keys().copied().collect::<Vec<_>>() {
            if old.contains_key(&cgroup) {
                continue;
            }
            match self.map.insert(cgroup, id, 0) {
                Ok(()) => change.added += 1,
                Err(e) => {
                    wanted.remove(&cgroup);
                    failed = Some(e);
                }
            }
        }
        for cgroup in old.keys().filter(|c| !wanted.contains_key(c)) {
            // The kernel never reuses a cgroup id, so an entry for a directory removed since
            // is harmless; it goes all the same, so the map holds only what exists.
            let _ = self.map.remove(cgroup);
            change.removed += 1;
        }
        if let Some(ns) = self.namespaces.get_mut(name) {
            ns.cgroups = wanted;
        }
        match failed {
            Some(e) => Err(map_err(NAMESPACES_MAP)(e)),
            None => Ok(change),
        }
    }

    /// A namespace other than `name` that already holds one of `wanted`, with the directory.
    fn claimed_elsewhere(
        &self,
        name: &str,
        wanted: &BTreeMap<u64, PathBuf>,
    ) -> Option<(String, PathBuf)> {
        self.namespaces
            .iter()
            .filter(|(other, _)| other.as_str() != name)
            .find_map(|(other, ns)| {
                wanted
                    .iter()
                    .find(|(id, _)| ns.cgroups.contains_key(id))
                    .map(|(_, path)| (other.clone(), path.clone()))
            })
    }

    /// Each namespace's directories, for status.
    pub(super) fn directories(&self) -> BTreeMap<String, Vec<PathBuf>> {
        self.namespaces
            .iter()
            .map(|(name, ns)| (name.clone(), ns.cgroups.values().cloned().collect()))
            .collect()
    }
}
