use std::{fs, path::Path};

use super::*;

const UID: &str = "8d5f7f1c-1b8e-4c0a-9f3e-2a6b1c9d0e4f";
const UNDERSCORED: &str = "8d5f7f1c_1b8e_4c0a_9f3e_2a6b1c9d0e4f";

fn root(path: &str) -> Root {
    Root::from_dir(Path::new(path)).expect("a kubepods root")
}

#[test]
fn cgroupfs_pods_sit_in_their_class_directory_and_guaranteed_ones_under_the_root() {
    let r = root("/sys/fs/cgroup/kubepods");
    assert_eq!(r.driver, Driver::Cgroupfs);
    assert_eq!(
        r.pod_dir(UID, Qos::Burstable),
        Path::new("/sys/fs/cgroup/kubepods/burstable").join(format!("pod{UID}"))
    );
    assert_eq!(
        r.pod_dir(UID, Qos::BestEffort),
        Path::new("/sys/fs/cgroup/kubepods/besteffort").join(format!("pod{UID}"))
    );
    assert_eq!(
        r.pod_dir(UID, Qos::Guaranteed),
        Path::new("/sys/fs/cgroup/kubepods").join(format!("pod{UID}"))
    );
}

#[test]
fn systemd_slices_spell_their_ancestry_and_the_uid_with_underscores() {
    let r = root("/sys/fs/cgroup/kubepods.slice");
    assert_eq!(r.driver, Driver::Systemd);
    assert_eq!(
        r.pod_dir(UID, Qos::Burstable),
        Path::new(&format!(
            "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UNDERSCORED}.slice"
        ))
    );
    assert_eq!(
        r.pod_dir(UID, Qos::BestEffort),
        Path::new(&format!(
            "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UNDERSCORED}.slice"
        ))
    );
    assert_eq!(
        r.pod_dir(UID, Qos::Guaranteed),
        Path::new(&format!(
            "/sys/fs/cgroup/kubepods.slice/kubepods-pod{UNDERSCORED}.slice"
        ))
    );
}

#[test]
fn a_kubelet_with_its_own_cgroup_root_prefixes_every_slice() {
    // kind: --cgroup-root=/kubelet with the systemd driver, inside a node container.
    let r =
        root("/sys/fs/cgroup/system.slice/docker-abc.scope/kubelet.slice/kubelet-kubepods.slice");
    assert_eq!(
        r.pod_dir(UID, Qos::BestEffort),
        r.path.join(format!(
            "kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UNDERSCORED}.slice"
        ))
    );
    assert_eq!(
        r.pod_dir(UID, Qos::Guaranteed),
        r.path
            .join(format!("kubelet-kubepods-pod{UNDERSCORED}.slice"))
    );
    assert!(r.is_qos_dir("kubelet-kubepods-burstable.slice"));
    assert!(!r.is_qos_dir("kubepods-burstable.slice"));
}

#[test]
fn pod_directory_names_give_back_the_uid() {
    let cgroupfs = root("/x/kubepods");
    let systemd = root("/x/kubelet-kubepods.slice");
    for qos in [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort] {
        for r in [&cgroupfs, &systemd] {
            let dir = r.pod_dir(UID, qos);
            let name = dir.file_name().and_then(|n| n.to_str()).expect("name");
            assert_eq!(r.pod_uid(name).as_deref(), Some(UID), "{}", dir.display());
        }
    }
    // Class directories, containers and look-alikes are not pods.
    assert_eq!(cgroupfs.pod_uid("burstable"), None);
    assert_eq!(cgroupfs.pod_uid("podnot-a-uid"), None);
    assert_eq!(systemd.pod_uid("kubelet-kubepods-burstable.slice"), None);
    assert_eq!(systemd.pod_uid("cri-containerd-0123abcd.scope"), None);
}

#[test]
fn only_kubepods_directories_are_roots() {
    for name in ["kubepods", "kubepods.slice", "kubelet-kubepods.slice"] {
        assert!(
            Root::from_dir(&Path::new("/c").join(name)).is_some(),
            "{name}"
        );
    }
    for name in [
        "kubepods-burstable.slice",
        "kubelet.slice",
        "kubepods2",
        "system.slice",
    ] {
        assert!(
            Root::from_dir(&Path::new("/c").join(name)).is_none(),
            "{name}"
        );
    }
}

#[test]
fn container_ids_lose_their_runtime() {
    assert_eq!(container_id("containerd://0a1b2c"), Some("0a1b2c"));
    assert_eq!(container_id("cri-o://ff00"), Some("ff00"));
    assert_eq!(container_id("docker://abc123"), Some("abc123"));
    assert_eq!(container_id("containerd://"), None);
    assert_eq!(container_id("containerd://../../etc"), None);
}

#[test]
fn qos_classes_parse_as_the_api_spells_them() {
    assert_eq!(Qos::parse("Guaranteed"), Some(Qos::Guaranteed));
    assert_eq!(Qos::parse("Burstable"), Some(Qos::Burstable));
    assert_eq!(Qos::parse("BestEffort"), Some(Qos::BestEffort));
    assert_eq!(Qos::parse("besteffort"), None);
}

#[test]
fn mount_points_with_spaces_are_unescaped() {
    assert_eq!(unescape_mount(r"/run/my\040cgroup"), "/run/my cgroup");
    assert_eq!(unescape_mount("/sys/fs/cgroup"), "/sys/fs/cgroup");
}

/// Roots are found wherever they are, and pods by their class or, unknown, by any class; a pod
/// whose directory is not where the rules say is found by its containers.
#[test]
fn roots_and_pods_are_found_by_looking() {
    let dir = kernel_tests::TempDir::new("kubepods").expect("temp dir");
    let base = dir.path();
    let nested = base.join("system.slice/docker-node.scope/kubelet.slice/kubelet-kubepods.slice");
    let plain = base.join("kubepods");
    fs::create_dir_all(nested.join("kubelet-kubepods-besteffort.slice")).expect("mkdir");
    fs::create_dir_all(plain.join("burstable")).expect("mkdir");
    // A deeper kubepods (inside a pod) is not a root of its own.
    fs::create_dir_all(plain.join("burstable/podx/kubepods")).expect("mkdir");
    let roots = find_roots(&[base.to_owned()]);
    assert_eq!(
        roots.iter().map(|r| r.path.clone()).collect::<Vec<_>>(),
        vec![plain.clone(), nested.clone()]
    );

    let systemd = Root::from_dir(&nested).expect("root");
    let pod_dir = systemd.pod_dir(UID, Qos::BestEffort);
    fs::create_dir_all(pod_dir.join("cri-containerd-0abc.scope")).expect("mkdir");
    let mut pod = PodCgroup {
        uid: UID.into(),
        qos: Some(Qos::BestEffort),
        containers: vec!["0abc".into()],
    };
    assert_eq!(locate(&roots, &pod), vec![pod_dir.clone()]);
    pod.qos = None;
    assert_eq!(locate(&roots, &pod), vec![pod_dir.clone()], "class unknown");
    pod.qos = Some(Qos::Burstable);
    // Not where its (wrong) class says: found through its container instead.
    assert_eq!(
        locate(&roots, &pod),
        vec![pod_dir.join("cri-containerd-0abc.scope")]
    );
    pod.containers.clear();
    assert!(locate(&roots, &pod).is_empty());
}
