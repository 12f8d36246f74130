//! Kubernetes namespaces as isolation namespaces, on a real cgroup tree: each test lays out,
//! under a cgroup of its own, the tree a kubelet makes with one of its layouts (cgroupfs,
//! systemd, kind's nested one), runs a real router with isolation on, and lets the pod
//! mapping (`router::k8s::pods`, fed pod watch events as the API server sends them) register
//! the namespaces with the router while it runs. Real processes in the pods' cgroups then
//! connect: a pod of the listener's namespace gets in, a pod of another namespace gets EPERM
//! from connect() in the kernel, and so do pods made after the router started, until a pod is
//! deleted, whose cgroup is then forgotten.
//!
//! Nothing here touches the machine's own kubepods tree: every directory is under the test's
//! cgroup, found by the same discovery the controller runs on the cgroup2 mounts.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kernel_tests::{Cgroup, Netns, Proc, patience, require_root, skiff::Site};
use kube::runtime::watcher::Event;
use router::k8s::{
    cgroups,
    pods::{self, AdminSink, PodCgroups},
};
use serde_json::json;

const CONNECT: &str = "import socket, sys
host, port = sys.argv[1].rsplit(':', 1)
s = socket.socket()
s.settimeout(3)
try:
    s.connect((host, int(port)))
    print('ok')
except OSError as e:
    print(e.errno)";

const EPERM: &str = "1";

/// Connects from a process in `cgroup`: "ok", or the errno.
fn connect(ns: &Netns, cgroup: &Cgroup, addr: &str) -> anyhow::Result<String> {
    let out = Proc::spawn(ns, Some(cgroup), &["python3", "-c", CONNECT, addr])?
        .wait(Duration::from_secs(10))?;
    let out = out.trim();
    // A reset after the handshake (no connector behind the listener) got past connect().
    Ok(if out == "104" { "ok" } else { out }.to_owned())
}

/// The kubelet's tree under the test's cgroup, removed deepest first on drop.
struct Tree {
    made: Vec<Cgroup>,
}

impl Tree {
    fn mkdir(&mut self, path: &Path) -> anyhow::Result<()> {
        self.made.push(Cgroup::at(path)?);
        Ok(())
    }

    /// Removes `path`, as the kubelet does when a pod goes.
    fn rmdir(&mut self, path: &Path) {
        self.made.retain(|c| c.path() != path);
    }

    fn get(&self, path: &Path) -> anyhow::Result<&Cgroup> {
        self.made
            .iter()
            .find(|c| c.path() == path)
            .ok_or_else(|| anyhow::anyhow!("{} was not made", path.display()))
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        while let Some(cgroup) = self.made.pop() {
            drop(cgroup);
        }
    }
}

/// How one kubelet layout names things, spelled out here independently of the code under
/// test: (the directories from the test's cgroup to the kubepods root, the burstable and
/// best-effort class directories, a pod's directory name, a container's directory name).
struct Layout {
    root: &'static [&'static str],
    burstable: &'static str,
    besteffort: &'static str,
    pod: fn(&str, &str) -> String,
    container: fn(&str) -> String,
}

const CGROUPFS: Layout = Layout {
    root: &["kubepods"],
    burstable: "burstable",
    besteffort: "besteffort",
    pod: |_, uid| format!("pod{uid}"),
    container: |id| id.to_owned(),
};

const SYSTEMD: Layout = Layout {
    root: &["kubepods.slice"],
    burstable: "kubepods-burstable.slice",
    besteffort: "kubepods-besteffort.slice",
    pod: |class, uid| {
        let uid = uid.replace('-', "_");
        match class {
            "" => format!("kubepods-pod{uid}.slice"),
            class => format!("kubepods-{class}-pod{uid}.slice"),
        }
    },
    container: |id| format!("cri-containerd-{id}.scope"),
};

/// kind: a node container's cgroup, the kubelet's `--cgroup-root=/kubelet`, systemd driver,
/// CRI-O's scopes.
const KIND: Layout = Layout {
    root: &[
        "docker-node.scope",
        "kubelet.slice",
        "kubelet-kubepods.slice",
    ],
    burstable: "kubelet-kubepods-burstable.slice",
    besteffort: "kubelet-kubepods-besteffort.slice",
    pod: |class, uid| {
        let uid = uid.replace('-', "_");
        match class {
            "" => format!("kubelet-kubepods-pod{uid}.slice"),
            class => format!("kubelet-kubepods-{class}-pod{uid}.slice"),
        }
    },
    container: |id| format!("crio-{id}.scope"),
};

/// A pod as a watch event carries it.
fn pod(namespace: &str, name: &str, uid: &str, qos: &str, container: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "1"},
        "spec": {"nodeName": "gw-1", "containers": [{"name": "app", "image": "app:1"}]},
        "status": {
            "phase": "Running",
            "qosClass": qos,
            "containerStatuses": [{
                "name": "app", "image": "app:1", "imageID": "app@sha256:00", "ready": true,
                "restartCount": 0, "containerID": format!("containerd://{container}")
            }]
        }
    }))
    .expect("a valid pod")
}

/// One pod of the test: its directory and its container's.
struct TestPod {
    object: Pod,
    dir: PathBuf,
    container: PathBuf,
}

/// The router's registered directories of namespace `name`.
fn registered(site: &Site, name: &str) -> anyhow::Result<Vec<PathBuf>> {
    let status = site.status()?;
    Ok(status["isolation"]["namespaces"][name]
        .as_array()
        .map(|dirs| {
            dirs.iter()
                .filter_map(|d| d.as_str().map(PathBuf::from))
                .collect()
        })
        .unwrap_or_default())
}

/// Waits until namespace `name` has exactly `dirs` registered in the router.
fn wait_registered(site: &Site, name: &str, dirs: &[&Path]) -> anyhow::Result<()> {
    let mut wanted: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
    wanted.sort();
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    loop {
        let now = registered(site, name)?;
        if now == wanted {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "namespace {name}: registered {now:?}, expected {wanted:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Entries in the router's SKIFF_NAMESPACES map, read from the kernel.
fn kernel_namespace_entries(site: &Site) -> anyhow::Result<usize> {
    let pid = site
        .router_pid()
        .ok_or_else(|| anyhow::anyhow!("no router"))?;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        let Some(id) = info.lines().find_map(|l| l.strip_prefix("map_id:")) else {
            continue;
        };
        let id = id.trim();
        let shown: serde_json::Value = serde_json::from_str(&kernel_tests::run(
            "bpftool",
            &["map", "show", "id", id, "-j"],
        )?)?;
        // The kernel keeps 15 bytes of a map's name.
        if shown["name"] == "SKIFF_NAMESPACE" {
            let dump: serde_json::Value = serde_json::from_str(&kernel_tests::run(
                "bpftool",
                &["map", "dump", "id", id, "-j"],
            )?)?;
            return Ok(dump.as_array().map_or(0, Vec::len));
        }
    }
    anyhow::bail!("the router holds no SKIFF_NAMESPACES map")
}

fn exercise(tag: &str, layout: &Layout, port: u16) -> anyhow::Result<()> {
    let ns = Netns::new(tag)?;
    let parent = Cgroup::new(tag)?;
    // The discovery's bases are the cgroup2 mounts; the test's cgroup is under one of them.
    let mounts = cgroups::cgroup2_mounts();
    assert!(
        mounts.iter().any(|m| parent.path().starts_with(m)),
        "{} is under a cgroup2 mount of /proc/mounts: {mounts:?}",
        parent.path().display()
    );
    let mut tree = Tree { made: Vec::new() };
    let mut root = parent.path().to_owned();
    for part in layout.root {
        root = root.join(part);
        tree.mkdir(&root)?;
    }
    tree.mkdir(&root.join(layout.burstable))?;
    tree.mkdir(&root.join(layout.besteffort))?;

    // (namespace, name, uid, QoS, container): one pod of each class.
    let make = |tree: &mut Tree,
                (namespace, name, uid, qos, container): (&str, &str, &str, &str, &str),
                create: bool|
     -> anyhow::Result<TestPod> {
        let (class, parent) = match qos {
            "Guaranteed" => ("", root.clone()),
            "Burstable" => ("burstable", root.join(layout.burstable)),
            _ => ("besteffort", root.join(layout.besteffort)),
        };
        let dir = parent.join((layout.pod)(class, uid));
        let container_dir = dir.join((layout.container)(container));
        if create {
            tree.mkdir(&dir)?;
            tree.mkdir(&container_dir)?;
        }
        Ok(TestPod {
            object: pod(namespace, name, uid, qos, container),
            dir,
            container: container_dir,
        })
    };
    let a1 = make(
        &mut tree,
        (
            "team-a",
            "web-0",
            "0a000000-0000-4000-8000-000000000001",
            "Burstable",
            "a1c0ffee",
        ),
        true,
    )?;
    let b1 = make(
        &mut tree,
        (
            "team-b",
            "db-0",
            "0b000000-0000-4000-8000-000000000001",
            "BestEffort",
            "b1c0ffee",
        ),
        true,
    )?;

    let site = Site::start_with(
        &ns,
        Some(&parent),
        "west",
        None,
        &["--isolate-namespaces"],
        &[],
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (events, rx) = tokio::sync::mpsc::unbounded_channel::<Event<Pod>>();
    // Inotify registers with the runtime's reactor.
    let tracker = {
        let _runtime = runtime.enter();
        PodCgroups::new(vec![parent.path().to_owned()])
    };
    assert_eq!(
        tracker
            .roots()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>(),
        vec![root.clone()],
        "the layout's root is found by looking"
    );
    let sink = AdminSink(site.state_dir().join("admin.sock"));
    let follower = runtime.spawn(async move {
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
        pods::follow(tracker, stream, &sink).await;
    });
    // The watch's first list, as at the controller's start.
    for event in [
        Event::Init,
        Event::InitApply(a1.object.clone()),
        Event::InitApply(b1.object.clone()),
        Event::InitDone,
    ] {
        events.send(event)?;
    }
    wait_registered(&site, "team-a", &[&a1.dir])?;
    wait_registered(&site, "team-b", &[&b1.dir])?;
    assert_eq!(kernel_namespace_entries(&site)?, 2);

    let addr = format!("127.0.0.1:{port}");
    let port_arg = port.to_string();
    site.cli(&[
        "listener",
        "create",
        "web",
        "--host",
        "127.0.0.1",
        "--port",
        &port_arg,
        "--namespace",
        "team-a",
    ])?;
    assert_eq!(
        connect(&ns, tree.get(&a1.container)?, &addr)?,
        "ok",
        "a pod of team-a"
    );
    assert_eq!(
        connect(&ns, tree.get(&b1.container)?, &addr)?,
        EPERM,
        "a pod of team-b"
    );

    // Pods made after the router started: one the watch reports before the kubelet makes its
    // directory (inotify places it), one whose directory comes first (the watch places it).
    let a2 = make(
        &mut tree,
        (
            "team-a",
            "web-1",
            "0a000000-0000-4000-8000-000000000002",
            "Guaranteed",
            "a2c0ffee",
        ),
        false,
    )?;
    events.send(Event::Apply(a2.object.clone()))?;
    tree.mkdir(&a2.dir)?;
    tree.mkdir(&a2.container)?;
    wait_registered(&site, "team-a", &[&a1.dir, &a2.dir])?;
    assert_eq!(
        connect(&ns, tree.get(&a2.container)?, &addr)?,
        "ok",
        "a new pod of team-a"
    );
    let b2 = make(
        &mut tree,
        (
            "team-b",
            "db-1",
            "0b000000-0000-4000-8000-000000000002",
            "Burstable",
            "b2c0ffee",
        ),
        true,
    )?;
    events.send(Event::Apply(b2.object.clone()))?;
    wait_registered(&site, "team-b", &[&b1.dir, &b2.dir])?;
    assert_eq!(
        connect(&ns, tree.get(&b2.container)?, &addr)?,
        EPERM,
        "a new pod of team-b"
    );
    assert_eq!(kernel_namespace_entries(&site)?, 4);

    // A pod the kubelet removes is forgotten when its directory goes (inotify), before the
    // watch says so; a pod the watch deletes is forgotten even while its directory is still
    // there, and its processes then belong to no namespace: refused by team-a's listener.
    tree.rmdir(&b2.container);
    tree.rmdir(&b2.dir);
    wait_registered(&site, "team-b", &[&b1.dir])?;
    events.send(Event::Delete(b2.object.clone()))?;
    events.send(Event::Delete(a1.object.clone()))?;
    wait_registered(&site, "team-a", &[&a2.dir])?;
    assert_eq!(
        kernel_namespace_entries(&site)?,
        2,
        "forgotten in the kernel too"
    );
    assert_eq!(
        connect(&ns, tree.get(&a1.container)?, &addr)?,
        EPERM,
        "a deleted pod's processes are in no namespace"
    );
    assert_eq!(connect(&ns, tree.get(&a2.container)?, &addr)?, "ok");

    // The namespaces stay registered across a restart of the router (STATE/namespaces.json).
    drop(events);
    runtime.block_on(follower)?;
    let mut site = site;
    site.stop()?;
    site.run(&ns, Some(&parent))?;
    wait_registered(&site, "team-a", &[&a2.dir])?;
    ns.wait_listening(port, Duration::from_secs(10))?;
    assert_eq!(
        connect(&ns, tree.get(&a2.container)?, &addr)?,
        "ok",
        "after a restart"
    );
    assert_eq!(
        connect(&ns, tree.get(&b1.container)?, &addr)?,
        EPERM,
        "after a restart"
    );

    drop(site);
    drop(tree);
    drop(parent);
    Ok(())
}

#[test]
fn pods_are_isolated_by_namespace_with_the_cgroupfs_driver() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    exercise("podfs", &CGROUPFS, 8631)
}

#[test]
fn pods_are_isolated_by_namespace_with_the_systemd_driver() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    exercise("podsd", &SYSTEMD, 8632)
}

#[test]
fn pods_are_isolated_by_namespace_in_a_nested_kind_node() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    exercise("podkd", &KIND, 8633)
}
