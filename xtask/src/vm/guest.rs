//! One guest: QEMU (TCG) booting a Debian kernel with the host's root file system shared
//! read-only over virtio-9p, so the guest runs the very binaries and tools the host built and
//! installed. The guest has no network device.
//!
//! Two serial ports: ttyS0 is the kernel's console (written to a log file), ttyS1 carries the
//! tests' output, which is streamed here line by line. A second 9p share (the run directory,
//! writable) holds the run script and receives each test binary's exit status.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::kernel::Kernel;
use crate::task::Tally;

/// The first stage, in the initramfs: load the modules, mount the host's root read-only with
/// writable /tmp and /run over it, mount the run directory, and hand over to its script.
pub const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "skiff-vm: $*"; poweroff -f; }
while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "skiff-vm: failed to load module $m"
done < /lib/modules/order
opts=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "ro,cache=loose,$opts" hostroot /newroot || fail "cannot mount the host root"
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=755 tmpfs /newroot/run
mkdir /newroot/run/skiff-vm
mount -t 9p -o "$opts" skiffrun /newroot/run/skiff-vm || fail "cannot mount the run directory"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /bin/sh /run/skiff-vm/run.sh
"#;

/// A test binary to run in the guest.
#[derive(Debug, Clone)]
pub struct TestBinary {
    /// The test target's name (`accel`).
    pub name: String,
    /// Its source, as cargo names it in its `Running` line (`tests/accel.rs`).
    pub src: String,
    pub path: PathBuf,
    /// Arguments for it in this guest (a name filter, `--exact`).
    pub args: Vec<String>,
}

/// What to run in one guest.
#[derive(Debug)]
pub struct Plan<'a> {
    pub kernel: &'a Kernel,
    pub lockdown: bool,
    pub binaries: &'a [TestBinary],
    /// The directory the binaries run in (the kernel-tests package, as under cargo).
    pub cwd: &'a Path,
    /// Environment for the tests.
    pub env: &'a [(String, String)],
    /// Host directories under /tmp or /run the tests need (a checkout there, its target
    /// directory): the guest's own /tmp and /run hide the host's, so these are shared again
    /// and mounted read-only at the same paths.
    pub hidden: &'a [PathBuf],
    /// Where the kernel's console log is kept.
    pub console_log: PathBuf,
    /// The guest is killed (by PID) if it runs longer.
    pub timeout: Duration,
}

/// One test binary's outcome in a guest.
#[derive(Debug, Clone)]
pub struct BinaryOutcome {
    pub name: String,
    /// libtest's `test result:` line, as printed.
    pub summary: Option<String>,
    /// The binary's exit status; `None` when the guest ended before it did.
    pub exit: Option<i32>,
    pub seconds: f64,
}

/// What one guest did.
#[derive(Debug)]
pub struct Outcome {
    /// Time from starting QEMU to the run script's first line.
    pub boot: Option<Duration>,
    pub total: Duration,
    pub binaries: Vec<BinaryOutcome>,
    /// The guest's own `skiff-vm:` lines (kernel, lockdown state) and the router's one-line
    /// fallback reasons seen in test output.
    pub notes: Vec<String>,
    pub timed_out: bool,
}

impl Outcome {
    /// Whether every binary ran to the end and passed.
    pub fn passed(&self) -> bool {
        !self.timed_out && self.binaries.iter().all(|b| b.exit == Some(0))
    }
}

/// Boots the guest, streams its test output with `[label]` before each line, counts results
/// into `tally`, and ends QEMU (by PID) when it is done or out of time.
pub fn run(plan: &Plan<'_>, label: &str, tally: &mut Tally) -> anyhow::Result<Outcome> {
    let run_dir = std::env::temp_dir().join(format!("skiff-vm-{}-{label}", std::process::id()));
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&run_dir)?;
    let result = boot(plan, label, &run_dir, tally);
    // The console log outlives the run directory: it is what explains a failure.
    let _ = fs::copy(run_dir.join("console.log"), &plan.console_log);
    let _ = fs::remove_dir_all(&run_dir);
    result
}

fn boot(
    plan: &Plan<'_>,
    label: &str,
    run_dir: &Path,
    tally: &mut Tally,
) -> anyhow::Result<Outcome> {
    fs::write(run_dir.join("run.sh"), run_script(plan))?;
    let mut append = String::from("console=ttyS0 panic=-1 loglevel=4");
    if plan.lockdown {
        append.push_str(" lockdown=confidentiality");
    }
    let console = run_dir.join("console.log");
    let mut qemu = Command::new("qemu-system-x86_64");
    // The tests keep gigabyte files in the guest's /tmp (tmpfs, half of memory) while TCP
    // buffers fill: with 3 GiB, sends failed with ENOMEM and state files with ENOSPC.
    let memory = std::env::var("SKIFF_VM_MEMORY_MB").unwrap_or_else(|_| "8192".to_owned());
    qemu.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", &memory])
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
        .arg("-kernel")
        .arg(&plan.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&plan.kernel.initramfs)
        .args(["-append", &append])
        .arg("-chardev")
        .arg(format!("file,id=console,path={}", console.display()))
        .args(["-serial", "chardev:console", "-serial", "stdio"])
        .args(["-device", "virtio-rng-pci"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=skiffrun,security_model=none,multidevs=remap",
            run_dir.display()
        ));
    for (i, dir) in plan.hidden.iter().enumerate() {
        qemu.arg("-virtfs").arg(format!(
            "local,path={},mount_tag=hidden{i},security_model=none,readonly=on,multidevs=remap",
            dir.display()
        ));
    }
    qemu.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let started = Instant::now();
    let mut child = qemu.spawn().context("failed to start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu has no stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest and the router colour their output on the guest's serial tty.
            let line = super::strip_ansi(line.trim_end_matches('\r'));
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut outcome = Outcome {
        boot: None,
        total: Duration::ZERO,
        binaries: Vec::new(),
        notes: Vec::new(),
        timed_out: false,
    };
    let mut current: Option<(String, Instant)> = None;
    let deadline = started + plan.timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                println!("[{label}] {line}");
                observe(&line, &mut outcome, &mut current, plan, started, tally);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() > deadline {
            outcome.timed_out = true;
            println!(
                "[{label}] vm-test: out of time after {:?}; ending QEMU (pid {})",
                plan.timeout,
                child.id()
            );
            // Our own child, by PID.
            let _ = child.kill();
            break;
        }
    }
    let status = child.wait()?;
    let _ = reader.join();
    outcome.total = started.elapsed();
    // Exit statuses as the guest recorded them: "NAME STATUS".
    let statuses = fs::read_to_string(run_dir.join("status")).unwrap_or_default();
    for line in statuses.lines() {
        let mut words = line.split_whitespace();
        if let (Some(name), Some(code)) = (words.next(), words.next())
            && let Some(b) = outcome.binaries.iter_mut().find(|b| b.name == name)
        {
            b.exit = code.parse().ok();
        }
    }
    if outcome.boot.is_none() {
        bail!(
            "the {label} guest never reached its run script (qemu exited with {status}); \
             its console:\n{}",
            tail(&run_dir.join("console.log"), 30)
        );
    }
    Ok(outcome)
}

/// Follows the guest's output: cargo-style `Running` lines start a binary, libtest's
/// `test result:` line ends it.
fn observe(
    line: &str,
    outcome: &mut Outcome,
    current: &mut Option<(String, Instant)>,
    plan: &Plan<'_>,
    started: Instant,
    tally: &mut Tally,
) {
    if let Some(note) = line.strip_prefix("skiff-vm: ") {
        if outcome.boot.is_none() {
            outcome.boot = Some(started.elapsed());
        }
        outcome.notes.push(note.to_owned());
    } else if let Some(rest) = line.trim_start().strip_prefix("Running ") {
        let src = rest.split_whitespace().next().unwrap_or_default();
        if let Some(b) = plan.binaries.iter().find(|b| b.src == src) {
            *current = Some((b.name.clone(), Instant::now()));
            outcome.binaries.push(BinaryOutcome {
                name: b.name.clone(),
                summary: None,
                exit: None,
                seconds: 0.0,
            });
        }
    } else if line.trim_start().starts_with("test result: ") {
        tally.add(line);
        // Tests a filter left out did not run in this guest: skipped, never passed.
        tally.ignored += filtered_out(line);
        if let (Some((name, since)), Some(b)) = (current.as_ref(), outcome.binaries.last_mut())
            && &b.name == name
        {
            b.summary = Some(line.trim().to_owned());
            b.seconds = since.elapsed().as_secs_f64();
        }
    } else if is_fallback_reason(line) && !outcome.notes.iter().any(|n| n == line.trim()) {
        outcome.notes.push(line.trim().to_owned());
    }
}

/// The `N filtered out` count of a libtest summary line.
fn filtered_out(line: &str) -> u64 {
    line.split(';')
        .find_map(|part| part.trim().strip_suffix(" filtered out")?.parse().ok())
        .unwrap_or(0)
}

/// The router's one-line reasons for doing without a kernel feature, as its log prints them.
fn is_fallback_reason(line: &str) -> bool {
    [
        "no shortcuts",
        "falling back",
        "falls back",
        "without acceleration",
        "not accelerat",
    ]
    .iter()
    .any(|needle| line.contains(needle))
}

/// The second stage, run as PID 1 from the host's root: mounts what the tests need, says
/// which kernel and lockdown mode it runs, runs each binary with cargo's heading, records
/// its exit status, and powers off.
fn run_script(plan: &Plan<'_>) -> String {
    let mut s = String::from(
        "exec >/dev/ttyS1 2>&1\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t securityfs securityfs /sys/kernel/security\n\
         mkdir -p /dev/pts /dev/shm\n\
         mount -t devpts devpts /dev/pts\n\
         mount -t tmpfs tmpfs /dev/shm\n\
         ip link set lo up\n\
         echo \"skiff-vm: kernel $(uname -r), lockdown: \
         $(cat /sys/kernel/security/lockdown 2>/dev/null || echo 'not built in')\"\n",
    );
    // Open files as systemd limits a service (DefaultLimitNOFILE=1024:524288), not as the
    // kernel limits init (1024:4096): the router raises its soft limit to the hard one, and a
    // gateway's hard limit is systemd's or the container runtime's.
    s.push_str("ulimit -Hn 524288 && ulimit -Sn 1024\n");
    s.push_str("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n");
    s.push_str("export HOME=/tmp\n");
    for (i, dir) in plan.hidden.iter().enumerate() {
        let dir = quote(&dir.display().to_string());
        let _ = writeln!(
            s,
            "mkdir -p {dir} && mount -t 9p -o ro,cache=loose,trans=virtio,version=9p2000.L,\
             msize=262144 hidden{i} {dir} || echo \"skiff-vm: cannot mount {dir}\""
        );
    }
    for (key, value) in plan.env {
        let _ = writeln!(s, "export {key}={}", quote(value));
    }
    s.push_str(PROBE);
    let _ = writeln!(s, "cd {}", quote(&plan.cwd.display().to_string()));
    for b in plan.binaries {
        let args: Vec<String> = b.args.iter().map(|a| quote(a)).collect();
        let path = b.path.display().to_string();
        let _ = writeln!(s, "echo '     Running {} ({path})'", b.src);
        let _ = writeln!(s, "{} {}", quote(&path), args.join(" "));
        let _ = writeln!(s, "echo \"{} $?\" >> /run/skiff-vm/status", b.name);
    }
    s.push_str("sync\nexec busybox poweroff -f\n");
    s
}

/// Starts one router with `--accel auto` and namespace isolation on a cgroup of its own and
/// reports the lines in which it says what it runs with on this kernel (and why not).
const PROBE: &str = r#"probe=/tmp/skiff-vm-probe cg=/sys/fs/cgroup/skiff-vm-probe
mkdir -p "$cg/ns"
if "$SKIFF_BIN" --state-dir "$probe" site create probe --isolate-namespaces \
        --namespace "probe=$cg/ns" >/dev/null 2>"$probe.err"; then
    "$SKIFF_BIN" --state-dir "$probe" router run --accel auto --cgroup "$cg" >"$probe.log" 2>&1 &
    pid=$!
    i=0
    while [ $i -lt 600 ] && ! grep -q 'router running' "$probe.log" && kill -0 $pid 2>/dev/null; do
        sleep 0.1; i=$((i + 1))
    done
    grep -E 'acceleration|data path|io_uring|isolation|shortcuts|bpffs|ERROR|error' "$probe.log" |
        sed 's/^/skiff-vm: router: /'
    kill -INT $pid 2>/dev/null
    wait $pid
else
    echo "skiff-vm: router: site create failed: $(cat "$probe.err")"
fi
rm -rf "$probe" "$probe.log" "$probe.err"
rmdir "$cg/ns" "$cg"
"#;

/// Single-quotes `s` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filtered_out_tests_are_read_from_the_summary_line() {
        let line = "test result: ok. 1 passed; 0 failed; 2 ignored; 0 measured; 11 filtered out; finished in 4.78s";
        assert_eq!(filtered_out(line), 11);
        assert_eq!(filtered_out("test result: ok. 1 passed; 0 failed"), 0);
    }

    #[test]
    fn the_run_script_quotes_arguments_and_records_each_exit_status() {
        let kernel = Kernel {
            release: super::super::kernel::RELEASES[0],
            version: "5.10.0-32-amd64".into(),
            vmlinuz: "/k".into(),
            initramfs: "/i".into(),
            package: "p.deb".into(),
        };
        let binaries = [TestBinary {
            name: "accel".into(),
            src: "tests/accel.rs".into(),
            path: "/t/accel-1".into(),
            args: vec!["it's".to_owned()],
        }];
        let plan = Plan {
            kernel: &kernel,
            lockdown: false,
            binaries: &binaries,
            cwd: Path::new("/w/kernel-tests"),
            env: &[],
            hidden: &["/tmp/ci".into()],
            console_log: "/c".into(),
            timeout: Duration::from_secs(1),
        };
        let script = run_script(&plan);
        assert!(script.contains("'/t/accel-1' 'it'\\''s'"), "{script}");
        assert!(
            script.contains("mkdir -p '/tmp/ci' && mount -t 9p -o ro,cache=loose"),
            "{script}"
        );
        assert!(script.contains("echo \"accel $?\" >> /run/skiff-vm/status"));
        assert!(script.trim_end().ends_with("exec busybox poweroff -f"));
    }
}
