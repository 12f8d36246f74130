use std::{
    fs,
    sync::{Arc, Mutex},
};

use serde_json::json;

use super::*;

const UID_A: &str = "1a2b3c4d-0000-4000-8000-00000000000a";
const UID_B: &str = "1a2b3c4d-0000-4000-8000-00000000000b";

/// A pod as the API server sends it in a watch event (fields the kubelet fills in included).
fn pod(namespace: &str, name: &str, uid: &str, qos: &str, container: Option<&str>) -> Pod {
    let statuses = container.map(|id| {
        json!([{
            "name": "app", "image": "nginx:1.27", "imageID": "docker.io/library/nginx@sha256:00",
            "containerID": format!("containerd://{id}"), "ready": true, "restartCount": 0,
            "started": true, "state": {"running": {"startedAt": "2026-11-22T10:00:00Z"}}
        }])
    });
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "uid": uid, "resourceVersion": "4711",
            "creationTimestamp": "2026-11-22T10:00:00Z", "labels": {"app": name}
        },
        "spec": {
            "nodeName": "gw-1",
            "containers": [{"name": "app", "image": "nginx:1.27"}]
        },
        "status": {
            "phase": if container.is_some() { "Running" } else { "Pending" },
            "qosClass": qos,
            "hostIP": "10.0.0.5",
            "containerStatuses": statuses,
        }
    }))
    .expect("a valid pod")
}

fn layout() -> (kernel_tests::TempDir, Root) {
    let dir = kernel_tests::TempDir::new("pods").expect("temp dir");
    let root = dir.path().join("kubepods.slice");
    fs::create_dir_all(root.join("kubepods-besteffort.slice")).expect("mkdir");
    fs::create_dir_all(root.join("kubepods-burstable.slice")).expect("mkdir");
    let root = Root::from_dir(&root).expect("root");
    (dir, root)
}

#[tokio::test]
async fn pods_are_grouped_by_namespace_and_forgotten_when_deleted() {
    let (dir, root) = layout();
    let a_dir = root.pod_dir(UID_A, Qos::BestEffort);
    fs::create_dir_all(a_dir.join("cri-containerd-aa.scope")).expect("mkdir");
    let mut tracker = PodCgroups::new(vec![dir.path().to_owned()]);
    assert_eq!(tracker.roots(), std::slice::from_ref(&root));

    let a = pod("team-a", "web", UID_A, "BestEffort", Some("aa"));
    assert_eq!(tracker.apply(&a), BTreeSet::from(["team-a".to_owned()]));
    assert_eq!(tracker.apply(&a), BTreeSet::new(), "nothing changed");
    // B's pod is known before the kubelet made its directory.
    let b = pod("team-b", "db", UID_B, "Burstable", None);
    assert_eq!(tracker.apply(&b), BTreeSet::from(["team-b".to_owned()]));
    assert_eq!(
        tracker.namespaces(),
        BTreeMap::from([
            ("team-a".to_owned(), vec![a_dir.clone()]),
            ("team-b".to_owned(), vec![]),
        ])
    );

    assert_eq!(tracker.delete(&a), BTreeSet::from(["team-a".to_owned()]));
    assert_eq!(
        tracker.namespaces()["team-a"],
        Vec::<PathBuf>::new(),
        "the namespace stays, without directories"
    );
}

#[tokio::test]
async fn a_pod_directory_made_later_is_seen_through_inotify() {
    let (dir, root) = layout();
    let mut tracker = PodCgroups::new(vec![dir.path().to_owned()]);
    let b = pod("team-b", "db", UID_B, "Burstable", None);
    tracker.apply(&b);
    let b_dir = root.pod_dir(UID_B, Qos::Burstable);
    fs::create_dir(&b_dir).expect("mkdir");
    let events = tracker.dir_events().await;
    assert_eq!(events, vec![DirEvent::Created(b_dir.clone())]);
    assert_eq!(
        tracker.on_dir_events(&events),
        BTreeSet::from(["team-b".to_owned()])
    );
    assert_eq!(tracker.namespaces()["team-b"], vec![b_dir.clone()]);

    fs::remove_dir(&b_dir).expect("rmdir");
    let events = tracker.dir_events().await;
    assert_eq!(
        tracker.on_dir_events(&events),
        BTreeSet::from(["team-b".to_owned()])
    );
    assert!(tracker.namespaces()["team-b"].is_empty());
}

#[tokio::test]
async fn a_new_list_drops_the_pods_it_no_longer_holds() {
    let (dir, root) = layout();
    for uid in [UID_A, UID_B] {
        fs::create_dir_all(root.pod_dir(uid, Qos::BestEffort)).expect("mkdir");
    }
    let mut tracker = PodCgroups::new(vec![dir.path().to_owned()]);
    for event in [
        watcher::Event::Init,
        watcher::Event::InitApply(pod("team-a", "web", UID_A, "BestEffort", None)),
        watcher::Event::InitApply(pod("team-a", "api", UID_B, "BestEffort", None)),
    ] {
        assert!(
            tracker.on_pod_event(event).is_empty(),
            "nothing until the list is done"
        );
    }
    assert_eq!(
        tracker.on_pod_event(watcher::Event::InitDone),
        BTreeSet::from(["team-a".to_owned()])
    );
    assert_eq!(tracker.namespaces()["team-a"].len(), 2);
    // The watch was lost and listed again: one pod went meanwhile.
    tracker.on_pod_event(watcher::Event::Init);
    tracker.on_pod_event(watcher::Event::InitApply(pod(
        "team-a",
        "web",
        UID_A,
        "BestEffort",
        None,
    )));
    assert_eq!(
        tracker.on_pod_event(watcher::Event::InitDone),
        BTreeSet::from(["team-a".to_owned()])
    );
    assert_eq!(
        tracker.namespaces()["team-a"],
        vec![root.pod_dir(UID_A, Qos::BestEffort)]
    );
}

/// Namespaces set, in order, with their directories.
type Calls = Arc<Mutex<Vec<(String, Vec<PathBuf>)>>>;

/// Records what is set, and fails the first `fail` calls (a router restarting).
#[derive(Default, Clone)]
struct Recorder {
    calls: Calls,
    fail: Arc<Mutex<usize>>,
    seen: Arc<tokio::sync::Notify>,
}

impl Sink for Recorder {
    async fn set(&self, name: &str, dirs: &[PathBuf]) -> Result<(), String> {
        let failing = {
            let mut fail = self.fail.lock().expect("fail");
            let failing = *fail > 0;
            *fail = fail.saturating_sub(1);
            failing
        };
        let result = if failing {
            Err("no router is running".to_owned())
        } else {
            self.calls
                .lock()
                .expect("calls")
                .push((name.to_owned(), dirs.to_vec()));
            Ok(())
        };
        self.seen.notify_one();
        result
    }
}

#[tokio::test(start_paused = true)]
async fn follow_sets_changed_namespaces_and_retries_failures() {
    let (dir, root) = layout();
    fs::create_dir_all(root.pod_dir(UID_A, Qos::Guaranteed)).expect("mkdir");
    let tracker = PodCgroups::new(vec![dir.path().to_owned()]);
    let sink = Recorder::default();
    *sink.fail.lock().expect("fail") = 1;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let events =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    let follower = tokio::spawn({
        let sink = sink.clone();
        async move { follow(tracker, events, &sink).await }
    });
    tx.send(watcher::Event::Apply(pod(
        "team-a",
        "web",
        UID_A,
        "Guaranteed",
        None,
    )))
    .expect("send");
    // The first attempt fails; the retry, after RETRY, succeeds.
    while sink.calls.lock().expect("calls").is_empty() {
        sink.seen.notified().await;
    }
    assert_eq!(
        sink.calls.lock().expect("calls").clone(),
        vec![(
            "team-a".to_owned(),
            vec![root.pod_dir(UID_A, Qos::Guaranteed)]
        )]
    );
    drop(tx);
    follower.await.expect("follow ends with its events");
}
