//! `cargo xtask vm-test`: the kernel tests inside VMs, on the Debian kernels gateway nodes run
//! (5.10, 6.1, 6.12) and on a kernel locked down for confidentiality.
//!
//! Each kernel is a Debian package fetched with a private apt configuration and cached (see
//! [`kernel`]). The guest boots it under QEMU with TCG (no KVM: the nested /dev/kvm here stalls)
//! and mounts the host's root file system read-only over virtio-9p, so the tests, the `skiff`
//! binary and every tool they call (iproute2, curl, redis, iperf3, tcpdump, ...) are the host's
//! own; /tmp and /run are the guest's. The guest has no network device.

mod guest;
mod initramfs;
mod kernel;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use self::{
    guest::{Outcome, Plan, TestBinary},
    kernel::{Kernel, RELEASES, Release},
};
use crate::task::{Tally, cargo, is_root, output, status, workspace_root};

/// How much longer the tests wait inside a guest than on the host (TCG runs CPU-bound code
/// 7-10x slower).
const TIME_SCALE: &str = "10";

/// The accel test that checks the router says why acceleration is off where it cannot work.
const ACCEL_FALLBACK_TEST: &str = "auto_acceleration_attaches_or_says_why_not";

/// Tests that fail in the matrix for reasons not yet fixed, by kernel label (`6.1`,
/// `6.12-lockdown`, or `*` for every guest), each with what was seen. `--ci` skips them,
/// printed and counted as skipped; `vm-test` without `--ci` runs them. Each is an open
/// finding in docs/vm-matrix-notes.md: remove it here when it is fixed.
const KNOWN_FAILURES: &[(&str, &str, &str)] = &[];

/// Test binaries that touch no kernel surface the releases differ in, and that a guest could
/// only run far slower: the whole matrix leaves them to the host (named, they still run).
/// `console` drives a headless Chromium over WebDriver.
const HOST_ONLY: &[&str] = &["console"];

/// One guest to boot: a kernel, lockdown or not, which test binaries and with what arguments.
#[derive(Debug, Clone)]
pub struct Run {
    pub release: Release,
    pub lockdown: bool,
    /// Test binaries by name (`accel`); empty means all of kernel-tests.
    pub tests: Vec<String>,
    /// Arguments for each test binary (a name filter).
    pub args: Vec<String>,
    /// Whether the tests in [`KNOWN_FAILURES`] are skipped.
    pub skip_known: bool,
}

/// The release whose kernel series is `label` (`5.10`, `6.1`, `6.12`), or all of them.
///
/// # Errors
/// When no release has that kernel.
pub fn releases(label: &str) -> anyhow::Result<Vec<Release>> {
    if label == "all" {
        return Ok(RELEASES.to_vec());
    }
    RELEASES
        .iter()
        .find(|r| r.label == label)
        .map(|r| vec![*r])
        .with_context(|| {
            let known: Vec<&str> = RELEASES.iter().map(|r| r.label).collect();
            format!(
                "no kernel {label}: choose one of {}, or all",
                known.join(", ")
            )
        })
}

/// What CI boots, and why this much: under TCG the guest runs CPU-bound code 7-10x slower,
/// so the whole suite runs on one kernel and the others run the binaries whose kernel
/// surface differs between releases (docs/vm-matrix-notes.md has the measurements).
pub fn ci_runs() -> Vec<Run> {
    let release = |label: &str| {
        *RELEASES
            .iter()
            .find(|r| r.label == label)
            .expect("the CI matrix names known kernels")
    };
    let run = |label: &str, lockdown: bool, tests: &[&str]| Run {
        release: release(label),
        lockdown,
        tests: tests.iter().map(|t| (*t).to_owned()).collect(),
        args: Vec::new(),
        skip_known: true,
    };
    vec![
        // The newest kernel runs everything.
        run("6.12", false, &[]),
        // The others run what touches the kernel's BPF, io_uring and namespace surface; sites
        // (plain TCP through routers) also on the oldest.
        run(
            "6.1",
            false,
            &["accel", "datapath", "isolation", "redirect"],
        ),
        run("5.10", false, &["accel", "datapath", "isolation", "sites"]),
        run(
            "6.12",
            true,
            &["accel", "datapath", "isolation", "redirect"],
        ),
    ]
}

/// Boots each run's guest in turn and runs its tests; counts every result into `tally` and
/// fails when any guest's tests fail or do not finish.
///
/// # Errors
/// When a kernel cannot be fetched, the tests cannot be built, or a guest fails.
pub fn run(runs: &[Run], tally: &mut Tally) -> anyhow::Result<()> {
    crate::setup::ensure_vm()?;
    let started = Instant::now();
    let cache = cache_dir();
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("failed to create the VM cache {}", cache.display()))?;
    println!("vm-test: cache {}", cache.display());
    let mut kernels: Vec<Kernel> = Vec::new();
    for run in runs {
        if !kernels.iter().any(|k| k.release == run.release) {
            kernels.push(kernel::prepare(&cache, run.release, guest::INIT)?);
        }
    }
    let fetched = started.elapsed();
    let built = Instant::now();
    let binaries = build()?;
    let build_time = built.elapsed();
    let hidden = hidden_from_guests(&[workspace_root(), target_dir()]);
    let logs = workspace_root().join("target/vm-test");
    std::fs::create_dir_all(&logs)?;
    let mut env = vec![
        (
            "SKIFF_BIN".to_owned(),
            skiff_binary()?.display().to_string(),
        ),
        // The guest's CPUs are emulated: wait longer for what the tests expect, as measured
        // (docs/vm-matrix-notes.md).
        ("SKIFF_TEST_TIME_SCALE".to_owned(), TIME_SCALE.to_owned()),
    ];
    if let Ok(ci) = std::env::var("CI") {
        env.push(("CI".to_owned(), ci));
    }

    let mut reports = Vec::new();
    for run in runs {
        let kernel = kernels
            .iter()
            .find(|k| k.release == run.release)
            .expect("every run's kernel was prepared");
        let label = format!(
            "{}{}",
            run.release.label,
            if run.lockdown { "-lockdown" } else { "" }
        );
        let chosen = select(run, &label, &binaries)?;
        println!(
            "vm-test: booting {label} ({}, {}) for {}",
            kernel.version,
            kernel.package,
            chosen
                .iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let plan = Plan {
            kernel,
            lockdown: run.lockdown,
            binaries: &chosen,
            cwd: &workspace_root().join("kernel-tests"),
            env: &env,
            hidden: &hidden,
            console_log: logs.join(format!("{label}.console.log")),
            timeout: Duration::from_secs(timeout_minutes() * 60),
        };
        let outcome = guest::run(&plan, &label, tally);
        // The binaries this guest did not run are counted as skipped, never as passed.
        let left_out: Vec<&TestBinary> = binaries
            .iter()
            .filter(|b| !chosen.iter().any(|c| c.name == b.name))
            .collect();
        if !left_out.is_empty() {
            let mut count = 0;
            for b in &left_out {
                count += listed_tests(&b.path)?;
            }
            tally.ignored += count;
            println!(
                "vm-test: {label}: {count} tests of {} not run in this guest, counted as skipped",
                left_out
                    .iter()
                    .map(|b| b.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        reports.push((label, kernel.version.clone(), chosen, outcome));
    }

    println!(
        "vm-test: kernels ready in {:.0} s, tests built in {:.0} s, {:.0} s in all",
        fetched.as_secs_f64(),
        build_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let mut failed = Vec::new();
    for (label, version, chosen, outcome) in &reports {
        if !report(label, version, chosen, outcome) {
            failed.push(label.as_str());
        }
    }
    if !failed.is_empty() {
        bail!("kernel tests failed in the {} guest(s)", failed.join(", "));
    }
    Ok(())
}

/// Prints one guest's summary; returns whether it passed.
fn report(
    label: &str,
    version: &str,
    chosen: &[TestBinary],
    outcome: &anyhow::Result<Outcome>,
) -> bool {
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            println!("vm-test: {label} ({version}): FAILED: {e:#}");
            return false;
        }
    };
    println!(
        "vm-test: {label} ({version}): {} after {:.0} s (boot {:.1} s)",
        if outcome.passed() { "ok" } else { "FAILED" },
        outcome.total.as_secs_f64(),
        outcome.boot.map_or(0.0, |b| b.as_secs_f64()),
    );
    for note in &outcome.notes {
        // The router's log lines without their timestamps.
        let note = note
            .split_once(" router::app: ")
            .map_or(note.as_str(), |(_, rest)| rest);
        println!("vm-test:   {note}");
    }
    for b in chosen {
        match outcome.binaries.iter().find(|o| o.name == b.name) {
            Some(o) => println!(
                "vm-test:   {:<12} {:>6.0} s  exit {:<4} {}",
                o.name,
                o.seconds,
                o.exit.map_or_else(|| "none".to_owned(), |c| c.to_string()),
                o.summary.as_deref().unwrap_or("(no test result line)")
            ),
            None => println!("vm-test:   {:<12} did not start", b.name),
        }
    }
    if outcome.timed_out {
        println!("vm-test:   out of time: the guest was ended before its tests were");
    }
    outcome.passed()
        && chosen
            .iter()
            .all(|b| outcome.binaries.iter().any(|o| o.name == b.name))
}

/// Where kernels and apt state are kept between runs: `$SKIFF_VM_CACHE`, else
/// /var/cache/skiff-vm as root and target/vm-cache otherwise.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SKIFF_VM_CACHE") {
        return dir.into();
    }
    if is_root() {
        "/var/cache/skiff-vm".into()
    } else {
        workspace_root().join("target/vm-cache")
    }
}

/// Minutes one guest may run before it is ended (`$SKIFF_VM_TIMEOUT_MINUTES`, default 40).
fn timeout_minutes() -> u64 {
    std::env::var("SKIFF_VM_TIMEOUT_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(40)
}

/// Builds `skiff`, the kernel tests' helper binaries and their test binaries; returns the
/// integration-test binaries.
fn build() -> anyhow::Result<Vec<TestBinary>> {
    println!("vm-test: building skiff and the kernel tests");
    status(cargo().args(["build", "--package", "router", "--bin", "skiff"]))?;
    status(cargo().args(["build", "--package", "kernel-tests", "--bins"]))?;
    let json = output(cargo().args([
        "test",
        "--package",
        "kernel-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]))?;
    let mut binaries = Vec::new();
    for line in json.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let target = &msg["target"];
        let is_test = target["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if msg["reason"] != "compiler-artifact" || !is_test {
            continue;
        }
        let (Some(name), Some(src), Some(exe)) = (
            target["name"].as_str(),
            target["src_path"].as_str(),
            msg["executable"].as_str(),
        ) else {
            continue;
        };
        let package = workspace_root().join("kernel-tests");
        let src = Path::new(src)
            .strip_prefix(&package)
            .map_or_else(|_| src.to_owned(), |p| p.display().to_string());
        binaries.push(TestBinary {
            name: name.to_owned(),
            src,
            path: exe.into(),
            args: Vec::new(),
        });
    }
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    if binaries.is_empty() {
        bail!("cargo built no kernel-tests test binaries");
    }
    Ok(binaries)
}

/// The test binaries `run` boots with, each with its arguments: what the kernel cannot do is
/// left to the test that checks the router says so, and with `skip_known` the open findings
/// are skipped by name (printed, and counted as skipped by libtest's `filtered out`).
fn select(run: &Run, label: &str, binaries: &[TestBinary]) -> anyhow::Result<Vec<TestBinary>> {
    let mut chosen = choose(binaries, &run.tests)?;
    let no_accel = if run.lockdown {
        Some("lockdown=confidentiality refuses bpf_probe_read_kernel")
    } else {
        run.release.no_accel
    };
    for b in &mut chosen {
        b.args.clone_from(&run.args);
        if let (Some(why), "accel") = (no_accel, b.name.as_str()) {
            println!(
                "vm-test: {label}: socket acceleration cannot work ({why}): accel runs only {ACCEL_FALLBACK_TEST}"
            );
            b.args = ["--exact", ACCEL_FALLBACK_TEST].map(String::from).to_vec();
        }
    }
    if run.skip_known {
        let known: Vec<&(&str, &str, &str)> = KNOWN_FAILURES
            .iter()
            .filter(|(kernel, _, _)| *kernel == "*" || *kernel == label)
            .collect();
        // Only where no name filter chose the tests already.
        for b in chosen
            .iter_mut()
            .filter(|b| b.args.iter().all(|a| a.starts_with("--")))
        {
            let listed = output(std::process::Command::new(&b.path).arg("--list"))?;
            for (_, test, seen) in &known {
                if listed.lines().any(|l| l == format!("{test}: test")) {
                    println!("vm-test: {label}: known failure skipped: {test}: {seen}");
                    if !b.args.iter().any(|a| a == "--exact") {
                        b.args.push("--exact".to_owned());
                    }
                    b.args.extend(["--skip".to_owned(), (*test).to_owned()]);
                }
            }
        }
    }
    // The redirect test loads and attaches the programs itself (sk_msg reads socket
    // memory with bpf_probe_read_kernel and filters by the namespace cookie).
    if let Some(why) = no_accel {
        println!("vm-test: {label}: redirect left out ({why}), counted as skipped");
        chosen.retain(|b| b.name != "redirect");
    }
    Ok(chosen)
}

/// How many tests a test binary has (`--list` only lists; nothing runs).
fn listed_tests(binary: &Path) -> anyhow::Result<u64> {
    let listed = output(std::process::Command::new(binary).arg("--list"))?;
    Ok(listed.lines().filter(|l| l.ends_with(": test")).count() as u64)
}

/// The binaries named in `tests` (all when empty).
fn choose(binaries: &[TestBinary], tests: &[String]) -> anyhow::Result<Vec<TestBinary>> {
    if tests.is_empty() {
        return Ok(binaries
            .iter()
            .filter(|b| !HOST_ONLY.contains(&b.name.as_str()))
            .cloned()
            .collect());
    }
    tests
        .iter()
        .map(|t| {
            binaries
                .iter()
                .find(|b| &b.name == t)
                .cloned()
                .with_context(|| format!("kernel-tests has no test binary {t}"))
        })
        .collect()
}

/// This workspace's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// Those of `dirs` that a guest's own /tmp and /run would hide, without any that another
/// of them contains.
fn hidden_from_guests(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let dirs: Vec<PathBuf> = dirs
        .iter()
        .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()))
        .filter(|d| d.starts_with("/tmp") || d.starts_with("/run"))
        .collect();
    let mut kept: Vec<PathBuf> = Vec::new();
    for dir in &dirs {
        let inside_another = dirs
            .iter()
            .any(|other| other != dir && dir.starts_with(other));
        if !inside_another && !kept.contains(dir) {
            kept.push(dir.clone());
        }
    }
    kept
}

/// The `skiff` binary the guests run, from this workspace's target directory.
fn skiff_binary() -> anyhow::Result<PathBuf> {
    let bin = target_dir().join("debug/skiff");
    anyhow::ensure!(bin.exists(), "no {} after the build", bin.display());
    Ok(std::fs::canonicalize(bin)?)
}

/// `text` without terminal colour sequences (the router's log has them).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(name: &str) -> TestBinary {
        TestBinary {
            name: name.to_owned(),
            src: format!("tests/{name}.rs"),
            path: format!("/nonexistent/{name}").into(),
            args: Vec::new(),
        }
    }

    #[test]
    fn a_checkout_under_tmp_is_shared_again_once_and_one_elsewhere_is_not() {
        let hidden = hidden_from_guests(&[
            "/tmp/nonexistent-ci".into(),
            "/tmp/nonexistent-ci/target".into(),
            "/nonexistent/work/target".into(),
        ]);
        assert_eq!(hidden, [PathBuf::from("/tmp/nonexistent-ci")]);
        assert!(hidden_from_guests(&["/nonexistent/work".into()]).is_empty());
    }

    #[test]
    fn without_netns_cookies_accel_runs_only_its_fallback_test_and_redirect_is_left_out() {
        let binaries = ["accel", "isolation", "redirect"].map(binary);
        let run = Run {
            release: releases("5.10").expect("5.10 is known")[0],
            lockdown: false,
            tests: Vec::new(),
            args: vec!["some_filter".to_owned()],
            skip_known: false,
        };
        let chosen = select(&run, "5.10", &binaries).expect("selects");
        let names: Vec<&str> = chosen.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["accel", "isolation"]);
        assert_eq!(chosen[0].args, ["--exact", ACCEL_FALLBACK_TEST]);
        assert_eq!(chosen[1].args, ["some_filter"]);
    }

    #[test]
    fn a_locked_down_guest_treats_acceleration_as_unavailable_and_six_one_does_not() {
        let binaries = ["accel", "redirect"].map(binary);
        let mut run = Run {
            release: releases("6.12").expect("6.12 is known")[0],
            lockdown: true,
            tests: Vec::new(),
            args: Vec::new(),
            skip_known: false,
        };
        let chosen = select(&run, "6.12-lockdown", &binaries).expect("selects");
        assert_eq!(chosen.len(), 1);
        assert_eq!(chosen[0].args, ["--exact", ACCEL_FALLBACK_TEST]);
        run.lockdown = false;
        run.release = releases("6.1").expect("6.1 is known")[0];
        let chosen = select(&run, "6.1", &binaries).expect("selects");
        assert_eq!(chosen.len(), 2);
        assert!(chosen.iter().all(|b| b.args.is_empty()));
        assert!(releases("4.19").is_err());
    }
}
