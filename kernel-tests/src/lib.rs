//! Guards and helpers for privileged tests: each test makes its own network namespace, cgroup
//! and processes through guards that remove them on drop, so nothing is left behind even when
//! an assertion fails half-way.
//!
//! Names carry the test process id and a sequence number (`skt<pid>-<n>-<tag>`), so tests that
//! run at the same time never share a namespace or cgroup.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

pub mod browser;
pub mod skiff;

/// Fails the test unless it runs as root; outside CI it may skip instead, with a printed reason.
///
/// Returns `false` when the caller should skip.
#[must_use]
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "kernel tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and CI is set"
    );
    eprintln!("skipping: kernel tests need root");
    false
}

/// `timeout` stretched by `$SKIFF_TEST_TIME_SCALE` (a whole number, 1 when unset): every
/// helper here waits this long for the event it expects. The VM matrix sets it, since its
/// software-emulated CPUs run 7-10x slower than the host's; nothing else changes.
#[must_use]
pub fn patience(timeout: Duration) -> Duration {
    let scale = std::env::var("SKIFF_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    timeout * scale
}

/// Raises this process's soft limit on open files to its hard limit, as the router does at
/// start (`router::open_files`): the test tools that hold thousands of connections (loadgen's
/// clients and servers) start with the 1024 a service gets from systemd in the VM guests.
///
/// # Errors
/// When the limit cannot be read or set.
pub fn raise_open_files() -> std::io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit; setrlimit reads one, and raising the soft limit up
    // to the hard one needs no privilege.
    let ok = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) == 0
        }
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the kernel is locked down for confidentiality, which refuses BPF programs' reads
/// of kernel memory (skiff's acceleration cannot work then).
#[must_use]
pub fn locked_down_for_confidentiality() -> bool {
    fs::read_to_string("/sys/kernel/security/lockdown")
        .is_ok_and(|l| l.contains("[confidentiality]"))
}

/// Whether this kernel tells a socket's network namespace cookie (`SO_NETNS_COOKIE`, Linux
/// 5.14). Without it skiff's programs cannot tell namespaces apart: the router runs without
/// acceleration and protects loopback in every namespace, saying so at start.
#[must_use]
pub fn kernel_has_netns_cookies() -> bool {
    use std::os::fd::AsRawFd as _;
    let Ok(socket) = std::net::UdpSocket::bind(("127.0.0.1", 0)) else {
        return false;
    };
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    rc == 0
}

fn unique_name(tag: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "skt{}-{}-{tag}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// One line of /proc/PID/status, without its label (`field` is e.g. `"CapEff:"`).
///
/// # Errors
/// When the process is gone or has no such line.
pub fn proc_status(pid: u32, field: &str) -> anyhow::Result<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))
}

/// The processes whose parent is `pid`.
#[must_use]
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
            fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// Runs a command to completion and fails with its stderr if it does not succeed.
///
/// # Errors
/// When the command cannot start or exits non-zero.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("failed to start {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace with loopback up, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named after `tag`.
    ///
    /// # Errors
    /// When `ip netns add` fails (no root, no iproute2).
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = unique_name(tag);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, for `ip netns exec`.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace to completion.
    ///
    /// # Errors
    /// When the command fails.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Netns {
    /// The namespace's cookie, as the eBPF programs see it: read from a socket made by a
    /// thread that entered the namespace (the calling thread stays where it is).
    ///
    /// # Errors
    /// When the namespace cannot be entered or the kernel cannot tell the cookie.
    pub fn cookie(&self) -> anyhow::Result<u64> {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<u64> {
                use std::os::fd::AsRawFd as _;
                let file = fs::File::open(&path)?;
                // SAFETY: setns on this thread only, with a namespace file it holds open.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                let socket = std::net::UdpSocket::bind(("127.0.0.1", 0))?;
                let mut cookie = 0u64;
                let mut len = size_of::<u64>() as libc::socklen_t;
                // SAFETY: the kernel writes at most `len` bytes into `cookie`.
                let rc = unsafe {
                    libc::getsockopt(
                        socket.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_NETNS_COOKIE,
                        (&raw mut cookie).cast(),
                        &raw mut len,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                Ok(cookie)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the cookie thread panicked"))?
        })
    }

    /// Bytes charged to the receive queues of all TCP sockets in the namespace, as `ss -m`
    /// reports them (`skmem:(r…)`): what readers have not read yet, redirected bytes included.
    ///
    /// # Errors
    /// When `ss` fails.
    pub fn receive_queues(&self) -> anyhow::Result<u64> {
        let out = self.run(&["ss", "-Htmn"])?;
        Ok(out
            .split("skmem:(r")
            .skip(1)
            .filter_map(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u64>().ok()
            })
            .sum())
    }

    /// Waits until something in the namespace listens on TCP `port`.
    ///
    /// # Errors
    /// When nothing does within `timeout`.
    pub fn wait_listening(&self, port: u16, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + patience(timeout);
        let filter = format!("sport = :{port}");
        loop {
            let out = self.run(&["ss", "-Hltn", &filter])?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "nothing listens on port {port} in {}",
                self.name
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Connects this namespace to `other` with a veth pair on the /30 `10.231.<subnet>.0`, and
    /// returns (this side's address, the other side's address).
    ///
    /// Interface names are short (the kernel allows 15 bytes) and carry the test's pid.
    ///
    /// # Errors
    /// When any `ip` command fails.
    pub fn link(&self, other: &Self, subnet: u8) -> anyhow::Result<(String, String)> {
        let tag = format!("{}{subnet}", std::process::id() % 100_000);
        let (a, b) = (format!("ska{tag}"), format!("skb{tag}"));
        run(
            "ip",
            &[
                "link",
                "add",
                &a,
                "netns",
                &self.name,
                "type",
                "veth",
                "peer",
                "name",
                &b,
                "netns",
                &other.name,
            ],
        )?;
        let (ip_a, ip_b) = (format!("10.231.{subnet}.1"), format!("10.231.{subnet}.2"));
        run(
            "ip",
            &[
                "-n",
                &self.name,
                "addr",
                "add",
                &format!("{ip_a}/30"),
                "dev",
                &a,
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &other.name,
                "addr",
                "add",
                &format!("{ip_b}/30"),
                "dev",
                &b,
            ],
        )?;
        run("ip", &["-n", &self.name, "link", "set", &a, "up"])?;
        run("ip", &["-n", &other.name, "link", "set", &b, "up"])?;
        self.keep_order(&a)?;
        other.keep_order(&b)?;
        // The veth pair goes away with the namespaces.
        Ok((ip_a, ip_b))
    }

    /// Keeps the packets of one flow in order on `device`, one end of a veth pair.
    ///
    /// veth hands each packet to the backlog of the CPU that sends it; TCP sends from the
    /// sending thread and from softirq on whichever CPU an ACK arrives, so one flow's packets
    /// land in two CPUs' backlogs and arrive out of order. The receiver sees reordering, the
    /// sender retransmits spuriously and halves its window: a single stream over the veth pair
    /// made 2.8-6.7 Gbit/s with ~13,000 retransmitted segments in 3 s (nstat), and 6.7-7.1
    /// Gbit/s with 10-19 once RPS (receive packet steering over every CPU) picks the backlog
    /// by the flow's hash instead.
    fn keep_order(&self, device: &str) -> anyhow::Result<()> {
        let cpus = thread::available_parallelism()
            .map_or(1, usize::from)
            .min(32);
        let mask = format!("{:x}", (1u64 << cpus) - 1);
        // `ip netns exec` mounts the namespace's own /sys, where the device is.
        let file = format!("/sys/class/net/{device}/queues/rx-0/rps_cpus");
        self.run(&["sh", "-c", &format!("echo {mask} > {file}")])
            .map(drop)
    }
}

/// A shared Ethernet segment for many namespaces: a bridge in a namespace of its own, each
/// member joined by a veth pair with the address `10.233.<lan>.<host>/24`. Removed with its
/// namespace (and the members' ends with theirs).
#[derive(Debug)]
pub struct Lan {
    hub: Netns,
    lan: u8,
}

impl Lan {
    /// Makes the segment `10.233.<lan>.0/24`.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn new(tag: &str, lan: u8) -> anyhow::Result<Self> {
        let hub = Netns::new(tag)?;
        run(
            "ip",
            &["-n", &hub.name, "link", "add", "br0", "type", "bridge"],
        )?;
        run("ip", &["-n", &hub.name, "link", "set", "br0", "up"])?;
        Ok(Self { hub, lan })
    }

    /// Joins `member` as host `host` (1-254) on its interface `lan0`; returns its address.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn join(&self, member: &Netns, host: u8) -> anyhow::Result<String> {
        let hub_end = format!("p{}-{host}", std::process::id() % 100_000);
        run(
            "ip",
            &[
                "link",
                "add",
                "lan0",
                "netns",
                &member.name,
                "type",
                "veth",
                "peer",
                "name",
                &hub_end,
                "netns",
                &self.hub.name,
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &self.hub.name,
                "link",
                "set",
                &hub_end,
                "master",
                "br0",
            ],
        )?;
        run("ip", &["-n", &self.hub.name, "link", "set", &hub_end, "up"])?;
        let ip = format!("10.233.{}.{host}", self.lan);
        run(
            "ip",
            &[
                "-n",
                &member.name,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "lan0",
            ],
        )?;
        run("ip", &["-n", &member.name, "link", "set", "lan0", "up"])?;
        Ok(ip)
    }

    /// Cuts `host` off the segment, as a pulled cable would: its hub end goes down, and
    /// nothing is sent or closed.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn cut(&self, host: u8) -> anyhow::Result<()> {
        let hub_end = format!("p{}-{host}", std::process::id() % 100_000);
        run(
            "ip",
            &["-n", &self.hub.name, "link", "set", &hub_end, "down"],
        )
        .map(drop)
    }
}

impl Netns {
    /// Discards every packet this namespace sends to `ip` (a blackhole route): with the same
    /// at the other end, the one path between two hosts of a segment is cut, silently for
    /// both (nothing is sent, so nothing is refused or reset), and the rest is untouched.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn blackhole(&self, ip: &str) -> anyhow::Result<()> {
        run(
            "ip",
            &[
                "-n",
                &self.name,
                "route",
                "add",
                "blackhole",
                &format!("{ip}/32"),
            ],
        )
        .map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: {e:#}");
        }
    }
}

/// The cgroup v2 mount point, read from /proc/mounts (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, unified hosts at /sys/fs/cgroup).
///
/// # Errors
/// When no cgroup2 file system is mounted.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("failed to read /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .context("no cgroup2 file system is mounted")
}

/// A cgroup v2 directory of this test's own, removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates a cgroup named after `tag` directly under the cgroup2 mount.
    ///
    /// # Errors
    /// When cgroup2 is not mounted or the directory cannot be created.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let path = cgroup2_mount()?.join(unique_name(tag));
        fs::create_dir(&path).with_context(|| format!("failed to create {}", path.display()))?;
        Ok(Self { path })
    }

    /// The cgroup's directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the cgroup at `path`, somewhere below one of the test's own (drop it before
    /// its parent).
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn at(path: &Path) -> anyhow::Result<Self> {
        fs::create_dir(path).with_context(|| format!("failed to create {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Creates a child cgroup named `name` (drop it before its parent).
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn child(&self, name: &str) -> anyhow::Result<Self> {
        let path = self.path.join(name);
        fs::create_dir(&path).with_context(|| format!("failed to create {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes the test started are killed by their own guards first; rmdir fails while a
        // zombie is still being reaped, so retry briefly.
        let deadline = Instant::now() + patience(Duration::from_secs(5));
        while let Err(e) = fs::remove_dir(&self.path) {
            if Instant::now() > deadline {
                eprintln!("warning: failed to remove {}: {e}", self.path.display());
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A process the test started, killed (by its PID) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    /// Whether the process has ended (it is reaped then).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Starts `argv` inside `netns`, and inside `cgroup` when given.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn spawn(netns: &Netns, cgroup: Option<&Cgroup>, argv: &[&str]) -> anyhow::Result<Self> {
        Self::start(netns, cgroup, argv, Stdio::piped(), Stdio::piped())
    }

    /// Like [`Proc::spawn`], for long-running processes: output goes to `log`, so a chatty
    /// process never blocks on a pipe nobody reads.
    ///
    /// # Errors
    /// When the log cannot be created or the process cannot be started.
    pub fn spawn_logged(
        netns: &Netns,
        cgroup: Option<&Cgroup>,
        argv: &[&str],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let file =
            fs::File::create(log).with_context(|| format!("failed to create {}", log.display()))?;
        let file2 = file.try_clone()?;
        Self::start(netns, cgroup, argv, file.into(), file2.into())
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn start(
        netns: &Netns,
        cgroup: Option<&Cgroup>,
        argv: &[&str],
        stdout: Stdio,
        stderr: Stdio,
    ) -> anyhow::Result<Self> {
        let procs = cgroup.map_or_else(String::new, |cg| {
            format!(
                "echo $$ > '{}' && ",
                cg.path().join("cgroup.procs").display()
            )
        });
        // nsenter switches only the network namespace; `ip netns exec` would also remount /sys,
        // hiding the host's cgroup tree and bpffs from a router that attaches programs.
        let script = format!(
            "{procs}exec nsenter --net=/run/netns/'{}' -- \"$@\"",
            netns.name()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(argv)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("failed to start {}", argv.join(" ")))?;
        Ok(Self {
            child,
            what: argv.join(" "),
        })
    }

    /// Waits up to `timeout` for the process to exit successfully.
    ///
    /// # Errors
    /// When it exits non-zero (with its stderr) or does not exit in time.
    pub fn wait(mut self, timeout: Duration) -> anyhow::Result<String> {
        let timeout = patience(timeout);
        // Both pipes are drained while the child runs: a child that prints more than a pipe
        // holds would otherwise block on its write and never exit.
        let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            thread::spawn(move || {
                let mut text = String::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_string(&mut text);
                }
                text
            })
        };
        let stdout = drain(
            self.child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        );
        let stderr = drain(
            self.child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        );
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                // Dropping self kills the child, which closes the pipes and ends the readers.
                bail!("{} did not exit within {timeout:?}", self.what);
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        ensure!(
            status.success(),
            "{} exited with {status}: {}",
            self.what,
            stderr.trim()
        );
        Ok(stdout)
    }

    /// Waits until the process prints a line on stderr that contains `needle`.
    ///
    /// # Errors
    /// When stderr closes first.
    pub fn wait_for_stderr(&mut self, needle: &str) -> anyhow::Result<()> {
        let stderr = self.child.stderr.take().context("stderr already taken")?;
        let mut lines = BufReader::new(stderr).lines();
        for line in lines.by_ref() {
            if line?.contains(needle) {
                // Keep draining so the process never blocks on a full pipe.
                thread::spawn(move || lines.for_each(drop));
                return Ok(());
            }
        }
        bail!("{} closed stderr before printing {needle:?}", self.what)
    }

    /// Sends SIGINT and waits for the process to exit (tcpdump flushes its file on SIGINT).
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn interrupt(self) -> anyhow::Result<()> {
        // Long enough for a router to drain its connections (10 s) and exit.
        self.interrupt_within(Duration::from_secs(15))
    }

    /// [`Proc::interrupt`], waiting up to `limit` (scaled by [`patience`]) for the exit.
    ///
    /// # Errors
    /// When the signal cannot be sent, or the process is still running after `limit`.
    pub fn interrupt_within(mut self, limit: Duration) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions; pid is our own child.
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            bail!("failed to signal {}", self.what);
        }
        let deadline = Instant::now() + patience(limit);
        while self.child.try_wait()?.is_none() {
            ensure!(Instant::now() < deadline, "{} ignored SIGINT", self.what);
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // Kill only our own child, by PID; the shell and nsenter exec, so that is the workload.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A packet capture on a namespace's loopback, for proving what did and did not cross it.
#[derive(Debug)]
pub struct Capture {
    tcpdump: Proc,
    file: PathBuf,
}

impl Capture {
    /// Starts tcpdump on `netns`'s loopback with a capture `filter`, and waits until it listens.
    ///
    /// # Errors
    /// When tcpdump cannot start.
    pub fn start(netns: &Netns, filter: &str) -> anyhow::Result<Self> {
        let file = std::env::temp_dir().join(format!("{}.pcap", unique_name("cap")));
        let file_arg = file.to_str().context("temp path is not UTF-8")?;
        let mut argv = vec![
            "tcpdump", "-i", "lo", "-nn", "-U", "-B", "16384", "-w", file_arg,
        ];
        argv.extend(filter.split_whitespace());
        let mut tcpdump = Proc::spawn(netns, None, &argv)?;
        tcpdump.wait_for_stderr("listening on")?;
        Ok(Self { tcpdump, file })
    }

    /// Stops the capture and returns, for each packet, `(source, destination, payload bytes)`.
    ///
    /// # Errors
    /// When the capture file cannot be read back.
    pub fn stop(self) -> anyhow::Result<Vec<(String, String, u64)>> {
        self.tcpdump.interrupt()?;
        let file = self.file.to_str().context("temp path is not UTF-8")?;
        let text = run("tcpdump", &["-r", file, "-nn", "-q"]);
        let _ = fs::remove_file(&self.file);
        // Lines look like: "12:00:00.000 IP 127.0.0.1.7101 > 127.0.0.1.40000: tcp 1448"
        Ok(text?
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace().skip(2);
                let src = words.next()?.to_owned();
                words.next()?;
                let dst = words.next()?.trim_end_matches(':').to_owned();
                let len = line.rsplit(' ').next()?.parse().ok()?;
                Some((src, dst, len))
            })
            .collect())
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a transfer can be checked byte for byte.
#[must_use]
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut state = seed;
    fill(&mut out, &mut state);
    out
}

/// A temporary file removed on drop.
#[derive(Debug)]
pub struct TempFile(PathBuf);

impl TempFile {
    /// A new path under the temp directory (the file is not created).
    #[must_use]
    pub fn new(tag: &str) -> Self {
        Self(std::env::temp_dir().join(unique_name(tag)))
    }

    /// The file's path as a string for command lines.
    ///
    /// # Panics
    /// When the temp directory's path is not UTF-8.
    #[must_use]
    pub fn arg(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8 here")
    }

    /// The file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Prometheus, unpacked from Debian's package by `cargo xtask setup` (not installed, so that no
/// service of its own runs on the machine).
pub const PROMETHEUS: &str = "/var/cache/skiff/tools/prometheus/usr/bin/prometheus";

/// A temporary directory removed (with its contents) on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a new directory under the temp directory.
    ///
    /// # Errors
    /// When it cannot be created.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(unique_name(tag));
        fs::create_dir_all(&path)
            .with_context(|| format!("failed to create {}", path.display()))?;
        Ok(Self(path))
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A word-at-a-time streaming checksum, independent of how bytes are split into reads.
#[derive(Debug, Default)]
pub struct Checksum {
    hash: u64,
    pending: Vec<u8>,
    total: u64,
}

impl Checksum {
    /// Adds `data`.
    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if !self.pending.is_empty() {
            let take = (8 - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == 8 {
                let word = std::mem::take(&mut self.pending);
                self.mix(&word);
            }
        }
        let whole = data.len() / 8 * 8;
        for word in data[..whole].chunks_exact(8) {
            self.mix(word);
        }
        self.pending.extend_from_slice(&data[whole..]);
    }

    fn mix(&mut self, word: &[u8]) {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        self.hash = (self.hash ^ u64::from_le_bytes(w))
            .wrapping_mul(0x0100_0000_01b3)
            .rotate_left(5);
    }

    /// The checksum and byte count, as 16 little-endian bytes.
    #[must_use]
    pub fn finish_bytes(mut self) -> [u8; 16] {
        for byte in std::mem::take(&mut self.pending) {
            self.hash = (self.hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.hash.to_le_bytes());
        out[8..].copy_from_slice(&self.total.to_le_bytes());
        out
    }
}

/// Fills `buf` with xorshift output from `state`.
pub fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Starts redis-server on 127.0.0.1:`port` in `netns` (inside `cgroup` when given), with no
/// persistence, and waits until it listens.
///
/// # Errors
/// When it cannot start or does not listen within 10 s.
pub fn redis_server(netns: &Netns, cgroup: Option<&Cgroup>, port: u16) -> anyhow::Result<Proc> {
    let port_arg = port.to_string();
    let server = Proc::spawn(
        netns,
        cgroup,
        &[
            "redis-server",
            "--port",
            &port_arg,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    )?;
    netns.wait_listening(port, Duration::from_secs(10))?;
    Ok(server)
}

/// Runs `redis-benchmark -p PORT -t set,get -c 20 -q EXTRA...` (inside `cgroup` when given),
/// prints its report and returns it.
///
/// # Errors
/// When it fails, or does not report a rate for both SET and GET.
pub fn redis_benchmark(
    netns: &Netns,
    cgroup: Option<&Cgroup>,
    port: u16,
    extra: &[&str],
) -> anyhow::Result<String> {
    let port = port.to_string();
    let mut argv = vec![
        "redis-benchmark",
        "-p",
        &port,
        "-t",
        "set,get",
        "-c",
        "20",
        "-q",
    ];
    argv.extend_from_slice(extra);
    let report = Proc::spawn(netns, cgroup, &argv)?.wait(Duration::from_secs(120))?;
    eprintln!("{report}");
    ensure!(
        report.matches("requests per second").count() >= 2,
        "redis-benchmark reported: {report}"
    );
    Ok(report)
}

/// Sends `data` one way with socat, from a client at `connect` to a server listening on
/// `listen_ip:listen_port` (each inside `cgroup` when given), and returns what the server wrote
/// out. Nothing flows back, so the transfer never depends on data sent after a half-close.
///
/// # Errors
/// When either socat fails or times out.
pub fn socat_transfer(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    listen_ip: &str,
    listen_port: u16,
    connect: &str,
    data: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let input = TempFile::new("in");
    let output = TempFile::new("out");
    fs::write(input.path(), data)?;
    let listen = if listen_ip.contains(':') {
        format!("TCP6-LISTEN:{listen_port},bind=[{listen_ip}],reuseaddr")
    } else {
        format!("TCP-LISTEN:{listen_port},bind={listen_ip},reuseaddr")
    };
    let sink = format!("OPEN:{},creat,trunc", output.arg());
    let server = Proc::spawn(ns, cgroup, &["socat", "-u", &listen, &sink])?;
    ns.wait_listening(listen_port, Duration::from_secs(10))?;
    let connect = format!("TCP:{connect},retry=50,interval=0.1");
    let source = format!("OPEN:{}", input.arg());
    Proc::spawn(ns, cgroup, &["socat", "-u", &source, &connect])?.wait(Duration::from_secs(60))?;
    server.wait(Duration::from_secs(60))?;
    Ok(fs::read(output.path())?)
}
