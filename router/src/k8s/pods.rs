//! Pods on this node, mapped to their cgroup directories and grouped by Kubernetes namespace:
//! what the router registers as its isolation namespaces (`NamespaceSet`).
//!
//! Two sources, neither a loop over the file system: the pod watch (spec.nodeName = this
//! node) says which pods exist, their namespace, uid, QoS class and containers; inotify on
//! the kubepods directories says when the kubelet makes or removes a pod's directory. The
//! kubelet learns of a pod from the API server as the watch does, and makes its directory
//! before its first container starts, so whichever comes second registers the pod, usually
//! before any of its processes runs. Without inotify, a pod registered only at its next watch
//! event (its containers' status changes after they start) could be refused its listener in
//! between. Every namespace ever seen is kept (with no directories once its pods are gone), so
//! the listeners that name it stay valid.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use tracing::{debug, info, warn};

use super::{
    cgroups::{self, PodCgroup, Qos, Root},
    inotify::{DirEvent, DirWatch},
};

/// One pod and where it is.
#[derive(Debug)]
struct Tracked {
    namespace: String,
    pod: PodCgroup,
    dirs: Vec<PathBuf>,
}

/// The pods of this node and their directories.
#[derive(Debug)]
pub struct PodCgroups {
    /// Where roots are looked for (the cgroup2 mounts, or what the operator says).
    bases: Vec<PathBuf>,
    roots: Vec<Root>,
    pods: BTreeMap<String, Tracked>,
    /// Every namespace a pod was seen in.
    namespaces: BTreeSet<String>,
    watch: Option<DirWatch>,
    /// Pods listed since the watch's last `Init`, until its `InitDone`.
    listing: Option<Vec<Pod>>,
}

/// What a pod says about where it is, if it is a pod (it has a uid and a namespace).
fn describe(pod: &Pod) -> Option<(String, PodCgroup)> {
    let namespace = pod.metadata.namespace.clone()?;
    let uid = pod.metadata.uid.clone()?;
    let status = pod.status.as_ref();
    let qos = status
        .and_then(|s| s.qos_class.as_deref())
        .and_then(Qos::parse);
    let containers = status
        .into_iter()
        .flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
                .chain(s.ephemeral_container_statuses.iter().flatten())
        })
        .filter_map(|c| c.container_id.as_deref().and_then(cgroups::container_id))
        .map(str::to_owned)
        .collect();
    Some((
        namespace,
        PodCgroup {
            uid,
            qos,
            containers,
        },
    ))
}

impl PodCgroups {
    /// Finds the kubepods roots under `bases` and watches them and their QoS directories. A
    /// missing inotify is logged: pods are then placed at their watch events only.
    #[must_use]
    pub fn new(bases: Vec<PathBuf>) -> Self {
        let watch = match DirWatch::new() {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "no inotify: pods are placed at their watch events only");
                None
            }
        };
        let mut tracker = Self {
            bases,
            roots: Vec::new(),
            pods: BTreeMap::new(),
            namespaces: BTreeSet::new(),
            watch,
            listing: None,
        };
        tracker.find_roots();
        tracker
    }

    /// The kubepods roots found.
    #[must_use]
    pub fn roots(&self) -> &[Root] {
        &self.roots
    }

    /// Looks for roots again, and watches the new ones.
    fn find_roots(&mut self) {
        let roots = cgroups::find_roots(&self.bases);
        let new: Vec<Root> = roots
            .iter()
            .filter(|r| !self.roots.contains(r))
            .cloned()
            .collect();
        for root in &new {
            info!(root = %root.path.display(), driver = ?root.driver, "kubepods cgroup found");
            self.watch_root(root);
        }
        self.roots = roots;
    }

    fn watch_root(&mut self, root: &Root) {
        let Some(watch) = &mut self.watch else { return };
        let dirs = std::iter::once(root.path.clone())
            .chain([Qos::Burstable, Qos::BestEffort].map(|q| root.qos_dir(q)));
        for dir in dirs {
            if dir.is_dir()
                && !watch.watches(&dir)
                && let Err(e) = watch.add(&dir)
            {
                warn!(dir = %dir.display(), error = %e, "cannot watch for pods coming and going");
            }
        }
    }

    /// Each namespace seen and its pods' directories.
    #[must_use]
    pub fn namespaces(&self) -> BTreeMap<String, Vec<PathBuf>> {
        let mut out: BTreeMap<String, Vec<PathBuf>> = self
            .namespaces
            .iter()
            .map(|n| (n.clone(), Vec::new()))
            .collect();
        for tracked in self.pods.values() {
            if let Some(dirs) = out.get_mut(&tracked.namespace) {
                dirs.extend(tracked.dirs.iter().cloned());
            }
        }
        for dirs in out.values_mut() {
            dirs.sort();
        }
        out
    }

    /// A pod added or changed. Returns the namespaces whose directories changed.
    pub fn apply(&mut self, pod: &Pod) -> BTreeSet<String> {
        let Some((namespace, described)) = describe(pod) else {
            return BTreeSet::new();
        };
        let mut changed = BTreeSet::new();
        if self.namespaces.insert(namespace.clone()) {
            changed.insert(namespace.clone());
        }
        let uid = described.uid.clone();
        let before = self.pods.insert(
            uid.clone(),
            Tracked {
                namespace: namespace.clone(),
                pod: described,
                dirs: Vec::new(),
            },
        );
        if let Some(before) = &before
            && before.namespace != namespace
        {
            // A uid never changes namespace; should it, the old one loses the pod.
            changed.insert(before.namespace.clone());
        }
        let old_dirs = before.map(|b| b.dirs).unwrap_or_default();
        if self.place(&uid) != old_dirs {
            changed.insert(namespace);
        }
        changed
    }

    /// A pod deleted. Returns the namespaces whose directories changed.
    pub fn delete(&mut self, pod: &Pod) -> BTreeSet<String> {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        match self.pods.remove(uid) {
            Some(t) if !t.dirs.is_empty() => BTreeSet::from([t.namespace]),
            _ => BTreeSet::new(),
        }
    }

    /// The watch listed every pod again (after a start or a lost watch): `pods` are all there
    /// are. Returns the namespaces whose directories changed.
    pub fn replace(&mut self, pods: &[Pod]) -> BTreeSet<String> {
        let listed: BTreeSet<&str> = pods
            .iter()
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !listed.contains(uid.as_str()))
            .cloned()
            .collect();
        let mut changed = BTreeSet::new();
        for uid in gone {
            if let Some(t) = self.pods.remove(&uid)
                && !t.dirs.is_empty()
            {
                changed.insert(t.namespace);
            }
        }
        for pod in pods {
            changed.extend(self.apply(pod));
        }
        changed
    }

    /// Takes one event of the pod watch. Returns the namespaces whose directories changed.
    pub fn on_pod_event(&mut self, event: watcher::Event<Pod>) -> BTreeSet<String> {
        match event {
            watcher::Event::Apply(pod) => self.apply(&pod),
            watcher::Event::Delete(pod) => self.delete(&pod),
            watcher::Event::Init => {
                self.listing = Some(Vec::new());
                BTreeSet::new()
            }
            watcher::Event::InitApply(pod) => {
                self.listing.get_or_insert_with(Vec::new).push(pod);
                BTreeSet::new()
            }
            watcher::Event::InitDone => {
                let pods = self.listing.take().unwrap_or_default();
                self.replace(&pods)
            }
        }
    }

    /// Takes directories made and removed. Returns the namespaces whose directories changed.
    pub fn on_dir_events(&mut self, events: &[DirEvent]) -> BTreeSet<String> {
        let mut uids = BTreeSet::new();
        for event in events {
            match event {
                DirEvent::Overflow => {
                    uids.extend(self.pods.keys().cloned());
                }
                DirEvent::Created(path) | DirEvent::Removed(path) => {
                    let Some((root, name)) = self.root_of(path) else {
                        continue;
                    };
                    if root.is_qos_dir(&name) {
                        // A class directory made after the start: watch it, and place every
                        // pod again (one may have been made in it before the watch).
                        let root = root.clone();
                        self.watch_root(&root);
                        uids.extend(self.pods.keys().cloned());
                    } else if let Some(uid) = root.pod_uid(&name) {
                        uids.insert(uid);
                    }
                }
            }
        }
        let mut changed = BTreeSet::new();
        for uid in uids {
            let Some(before) = self.pods.get(&uid).map(|t| t.dirs.clone()) else {
                // Not (yet) known from the watch: placed when it is.
                continue;
            };
            if self.place(&uid) != before
                && let Some(t) = self.pods.get(&uid)
            {
                changed.insert(t.namespace.clone());
            }
        }
        changed
    }

    /// The root `path` is in (directly or in a class directory), and `path`'s name.
    fn root_of(&self, path: &Path) -> Option<(&Root, String)> {
        let name = path.file_name()?.to_str()?.to_owned();
        let parent = path.parent()?;
        self.roots
            .iter()
            .find(|r| r.path == parent || parent.parent() == Some(r.path.as_path()))
            .map(|r| (r, name))
    }

    /// Looks up where pod `uid` is now (looking for roots again if none were found yet) and
    /// records it. Returns its directories.
    fn place(&mut self, uid: &str) -> Vec<PathBuf> {
        if self.roots.is_empty() {
            self.find_roots();
        }
        let Some(tracked) = self.pods.get_mut(uid) else {
            return Vec::new();
        };
        let dirs = cgroups::locate(&self.roots, &tracked.pod);
        if dirs != tracked.dirs {
            debug!(pod = uid, namespace = %tracked.namespace, ?dirs, "pod placed");
        }
        tracked.dirs.clone_from(&dirs);
        dirs
    }

    /// Waits for directories to be made or removed under the watched ones (forever without
    /// inotify).
    pub async fn dir_events(&mut self) -> Vec<DirEvent> {
        match &mut self.watch {
            Some(watch) => match watch.next().await {
                Ok(events) => events,
                Err(e) => {
                    warn!(error = %e, "inotify failed: pods are placed at their watch events only");
                    self.watch = None;
                    Vec::new()
                }
            },
            None => std::future::pending().await,
        }
    }
}

/// Where the namespaces' directories go: the router's admin socket, in the controller.
pub trait Sink {
    /// Makes `dirs` the directories of namespace `name`.
    fn set(&self, name: &str, dirs: &[PathBuf]) -> impl Future<Output = Result<(), String>> + Send;
}

/// The router's admin socket, as a [`Sink`].
#[derive(Debug, Clone)]
pub struct AdminSink(pub PathBuf);

impl Sink for AdminSink {
    async fn set(&self, name: &str, dirs: &[PathBuf]) -> Result<(), String> {
        let request = crate::admin::Request::NamespaceSet {
            name: name.to_owned(),
            cgroups: dirs.to_vec(),
        };
        crate::admin::call(&self.0, &request)
            .await
            .map(drop)
            .map_err(|e| crate::node::error_chain(&e))
    }
}

/// How long a namespace that could not be set waits before it is tried again (the router
/// may be restarting).
const RETRY: Duration = Duration::from_secs(2);

/// Follows `events` (the node's pod watch) and the kubepods directories, and sets each
/// namespace whose directories change in `sink`, until `events` ends.
pub async fn follow<S, E>(mut tracker: PodCgroups, events: S, sink: &E)
where
    S: Stream<Item = watcher::Event<Pod>>,
    E: Sink,
{
    let mut events = std::pin::pin!(events);
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    loop {
        enum Woke {
            Pod(Option<Box<watcher::Event<Pod>>>),
            Dirs(Vec<DirEvent>),
            Retry,
        }
        let retry = async {
            if dirty.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(RETRY).await;
        };
        let woke = tokio::select! {
            event = events.next() => Woke::Pod(event.map(Box::new)),
            dirs = tracker.dir_events() => Woke::Dirs(dirs),
            () = retry => Woke::Retry,
        };
        match woke {
            Woke::Pod(Some(event)) => dirty.extend(tracker.on_pod_event(*event)),
            Woke::Pod(None) => return,
            Woke::Dirs(dirs) => dirty.extend(tracker.on_dir_events(&dirs)),
            Woke::Retry => {}
        }
        // While the watch lists, nothing is set: the list may hold fewer pods than a
        // namespace has, and setting from it would take them out for a moment.
        if tracker.listing.is_some() {
            continue;
        }
        let namespaces = tracker.namespaces();
        let mut failed = BTreeSet::new();
        for name in std::mem::take(&mut dirty) {
            let dirs = namespaces.get(&name).cloned().unwrap_or_default();
            match sink.set(&name, &dirs).await {
                Ok(()) => info!(namespace = %name, directories = dirs.len(), "namespace set"),
                Err(error) => {
                    warn!(namespace = %name, %error, "failed to set namespace; retrying");
                    failed.insert(name);
                }
            }
        }
        dirty = failed;
    }
}

#[cfg(test)]
mod tests;
