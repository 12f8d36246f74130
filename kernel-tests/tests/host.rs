//! System mode (deploy/systemd): the unit checked with systemd's own tools, and a host laid
//! out as its sysusers and tmpfiles entries make it, with the router run the way the unit runs
//! it. No systemd manager runs on the test machines, so the unit itself is not started here.

use std::{os::unix::fs::MetadataExt as _, path::Path, time::Duration};

use kernel_tests::{Netns, Proc, TempDir, proc_status, require_root, run, skiff};

fn deploy(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/systemd")
        .join(file)
}

/// `systemd-analyze verify` accepts the unit (with ExecStart pointed at this build's binary,
/// since verify checks that it exists), and its offline security review rates it OK: at most
/// 4.5 on systemd's exposure scale, where 10 is a service with no hardening.
#[test]
fn the_systemd_unit_verifies_and_is_hardened() -> anyhow::Result<()> {
    let unit = std::fs::read_to_string(deploy("skiff.service"))?;
    let binary = skiff::binary()?;
    anyhow::ensure!(unit.contains("ExecStart=/usr/bin/skiff "), "{unit}");
    let dir = TempDir::new("unit")?;
    let path = dir.path().join("skiff.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/skiff", &binary.display().to_string()),
    )?;
    let path = path.to_str().expect("utf-8");
    let verified = run("systemd-analyze", &["verify", path])?;
    assert_eq!(verified.trim(), "", "systemd-analyze verify: {verified}");
    let review = run("systemd-analyze", &["security", "--offline=yes", path])?;
    let exposure: f64 = review
        .lines()
        .find_map(|l| l.split("Overall exposure level for skiff.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no overall exposure in: {review}"))?;
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= 4.5, "{review}");
    Ok(())
}

/// A host root laid out by systemd-sysusers and systemd-tmpfiles from the entries in
/// deploy/systemd (a temporary root, so the machine's users are untouched): the skiff user
/// creates its site in the state directory tmpfiles made, the router starts as root with
/// `--user` as the unit's ExecStart does and runs as that user, and `skiff site delete` (as
/// root) stops it and leaves nothing of the site behind.
#[test]
fn a_host_install_runs_the_router_as_its_user_and_site_delete_leaves_nothing() -> anyhow::Result<()>
{
    if !require_root() {
        return Ok(());
    }
    let root = TempDir::new("hostroot")?;
    std::fs::create_dir_all(root.path().join("etc"))?;
    for (file, dir) in [
        ("skiff.sysusers", "usr/lib/sysusers.d"),
        ("skiff.tmpfiles", "usr/lib/tmpfiles.d"),
    ] {
        std::fs::create_dir_all(root.path().join(dir))?;
        std::fs::copy(deploy(file), root.path().join(dir).join("skiff.conf"))?;
    }
    let root_arg = format!("--root={}", root.path().display());
    run("systemd-sysusers", &[&root_arg])?;
    run("systemd-tmpfiles", &["--create", &root_arg])?;
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd"))?;
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("skiff:"))
        .ok_or_else(|| anyhow::anyhow!("sysusers made no skiff user: {passwd}"))?;
    let fields: Vec<&str> = entry.split(':').collect();
    let (uid, gid) = (fields[2], fields[3]);
    assert_eq!(fields[5], "/var/lib/skiff", "{entry}");
    let state = root.path().join("var/lib/skiff");
    let meta = std::fs::metadata(&state)?;
    assert_eq!(meta.mode() & 0o7777, 0o700, "state directory mode");
    assert_eq!(meta.uid().to_string(), uid, "state directory owner");

    let binary = skiff::binary()?;
    let binary = binary.to_str().expect("utf-8");
    let state_arg = state.to_str().expect("utf-8");
    let as_skiff = |args: &[&str]| {
        let mut argv = vec![
            "--reuid",
            uid,
            "--regid",
            gid,
            "--clear-groups",
            binary,
            "--state-dir",
            state_arg,
        ];
        argv.extend_from_slice(args);
        run("setpriv", &argv)
    };
    as_skiff(&["site", "create", "west", "--link-access", "127.0.0.1:55672"])?;

    let ns = Netns::new("host")?;
    let router = Proc::spawn(
        &ns,
        None,
        &[
            binary,
            "--state-dir",
            state_arg,
            "router",
            "run",
            "--user",
            uid,
        ],
    )?;
    ns.wait_listening(55672, Duration::from_secs(10))?;
    assert_eq!(
        proc_status(router.pid(), "Uid:")?,
        format!("{uid}\t{uid}\t{uid}\t{uid}")
    );
    let status = as_skiff(&["status", "--output", "json"])?;
    assert!(status.contains("\"site\": \"west\""), "{status}");

    // As root: the state directory's parent (/var/lib) is root's.
    run(binary, &["--state-dir", state_arg, "site", "delete"])?;
    assert!(!state.exists(), "{} left behind", state.display());
    router.wait(Duration::from_secs(10))?;
    Ok(())
}
