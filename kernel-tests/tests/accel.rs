//! The router with socket acceleration (`--accel sockmap --cgroup`): both local legs of a
//! connection (client -> listener, router -> backend) move socket to socket in the kernel.
//! Every test runs the router and its workloads in a cgroup and network namespace of its own.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use kernel_tests::{
    Capture, Cgroup, Netns, Proc, TempDir, children, pattern, proc_status, redis_benchmark,
    redis_server, require_root, run, skiff::Site, socat_transfer,
};

/// The loadgen helper binary built with the tests.
fn loadgen() -> String {
    env!("CARGO_BIN_EXE_loadgen").to_owned()
}

/// An accelerated site in its own namespace and cgroup, with listener `port` routed to a
/// connector for a backend at `port - 1`. Fields drop in order: router first, then the cgroup
/// (which must be empty), then the namespace.
struct Fixture {
    site: Site,
    cgroup: Cgroup,
    ns: Netns,
    port: u16,
}

fn fixture(tag: &str, port: u16) -> anyhow::Result<Fixture> {
    fixture_with(tag, port, &[])
}

/// [`fixture`], with more `router run` arguments.
fn fixture_with(tag: &str, port: u16, run_args: &[&str]) -> anyhow::Result<Fixture> {
    let ns = Netns::new(tag)?;
    let cgroup = Cgroup::new(tag)?;
    let site = if run_args.is_empty() {
        Site::start_in(&ns, Some(&cgroup), "west", None)?
    } else {
        let args: Vec<&str> = ["--accel", "sockmap"]
            .iter()
            .chain(run_args)
            .copied()
            .collect();
        Site::start_with(&ns, Some(&cgroup), "west", None, &[], &args)?
    };
    let backend = (port - 1).to_string();
    site.cli(&[
        "connector",
        "create",
        "sink",
        "--host",
        "127.0.0.1",
        "--port",
        &backend,
    ])?;
    site.cli(&[
        "listener",
        "create",
        "sink",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
    ])?;
    ns.wait_listening(port, Duration::from_secs(10))?;
    Ok(Fixture {
        site,
        cgroup,
        ns,
        port,
    })
}

impl Fixture {
    fn backend(&self) -> u16 {
        self.port - 1
    }

    /// Starts a loadgen checksum sink as the backend, inside the cgroup.
    fn sink(&self) -> anyhow::Result<Proc> {
        let addr = format!("127.0.0.1:{}", self.backend());
        let sink = Proc::spawn(&self.ns, Some(&self.cgroup), &[&loadgen(), "sink", &addr])?;
        self.ns
            .wait_listening(self.backend(), Duration::from_secs(10))?;
        Ok(sink)
    }

    /// Runs `loadgen MODE` against the listener from inside the cgroup.
    fn load(&self, mode: &str, conns: usize, bytes: u64, parallel: usize) -> anyhow::Result<()> {
        let addr = format!("127.0.0.1:{}", self.port);
        let (conns, bytes, parallel) = (conns.to_string(), bytes.to_string(), parallel.to_string());
        Proc::spawn(
            &self.ns,
            Some(&self.cgroup),
            &[&loadgen(), mode, &addr, &conns, &bytes, &parallel],
        )?
        .wait(Duration::from_secs(300))?;
        Ok(())
    }

    fn accel(&self) -> anyhow::Result<serde_json::Value> {
        Ok(self.site.status()?["accel"].clone())
    }
}

/// `--accel auto` attaches where the kernel can tell network namespaces apart and otherwise
/// runs without acceleration, saying why in one line (its status, and its log at start). On
/// kernels without SO_NETNS_COOKIE this is the one test of this file the VM matrix runs.
#[test]
fn auto_acceleration_attaches_or_says_why_not() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let ns = Netns::new("acc9")?;
    let cgroup = Cgroup::new("acc9")?;
    let site = Site::start_with(&ns, Some(&cgroup), "west", None, &[], &["--accel", "auto"])?;
    let mode = site.status()?["accel"]["mode"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // Locked down for confidentiality, the kernel refuses bpf_probe_read_kernel, which the
    // programs use to read sockets' fields.
    let locked_down = kernel_tests::locked_down_for_confidentiality();
    if locked_down {
        // One line that names the lockdown and the verifier's refusal, not the whole log.
        assert!(
            mode.starts_with("off: the kernel is locked down for confidentiality")
                && mode.contains("cannot use helper")
                && !mode.contains('\n'),
            "accel mode: {mode}"
        );
        eprintln!("locked down: {mode}");
    } else if kernel_tests::kernel_has_netns_cookies() {
        assert!(mode.starts_with("sockmap on "), "accel mode: {mode}");
    } else {
        assert!(
            mode.starts_with("off: ") && mode.contains("SO_NETNS_COOKIE"),
            "accel mode: {mode}"
        );
    }
    Ok(())
}

/// Bytes the kernel moved socket to socket, counted per local leg: a message redirected into
/// or out of the router covers one leg, a message that took a shortcut past the router both.
fn leg_bytes(accel: &serde_json::Value) -> u64 {
    let count = |name: &str| accel[name].as_u64().unwrap_or(0);
    count("bytesRedirected") + 2 * count("bytesShortcut")
}

/// Payload bytes in `packets` to or from `port`.
fn payload_on(packets: &[(String, String, u64)], port: u16) -> u64 {
    let suffix = format!(".{port}");
    packets
        .iter()
        .filter(|(src, dst, _)| src.ends_with(&suffix) || dst.ends_with(&suffix))
        .map(|(_, _, len)| len)
        .sum()
}

#[test]
fn both_local_legs_skip_the_network_stack_and_outsiders_still_work() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let f = fixture("acc1", 7302)?;
    let (port, backend) = (f.port, f.backend());
    let data = pattern(8 << 20, 7);
    let listener = format!("127.0.0.1:{port}");

    let capture = Capture::start(&f.ns, &format!("tcp port {port} or tcp port {backend}"))?;
    let got = socat_transfer(
        &f.ns,
        Some(&f.cgroup),
        "127.0.0.1",
        backend,
        &listener,
        &data,
    )?;
    let packets = capture.stop()?;
    let accel = f.accel()?;
    eprintln!("client in the cgroup: {accel}");
    assert!(
        got == data,
        "transfer through the accelerated router corrupted"
    );
    assert_eq!(payload_on(&packets, port), 0, "client leg crossed loopback");
    assert_eq!(
        payload_on(&packets, backend),
        0,
        "backend leg crossed loopback"
    );
    assert!(
        leg_bytes(&accel) >= 2 * (8 << 20),
        "both legs redirected: {accel}"
    );

    // A client outside the cgroup is served too; only its own leg uses the network stack.
    let backend_server = Proc::spawn(
        &f.ns,
        Some(&f.cgroup),
        &[
            "socat",
            "-u",
            &format!("TCP-LISTEN:{backend},bind=127.0.0.1,reuseaddr"),
            "OPEN:/dev/null",
        ],
    )?;
    f.ns.wait_listening(backend, Duration::from_secs(10))?;
    let capture = Capture::start(&f.ns, &format!("tcp port {port} or tcp port {backend}"))?;
    Proc::spawn(
        &f.ns,
        None,
        &[
            "socat",
            "-u",
            "OPEN:/dev/zero,readbytes=4194304",
            &format!("TCP:{listener}"),
        ],
    )?
    .wait(Duration::from_secs(60))?;
    backend_server.wait(Duration::from_secs(30))?;
    let packets = capture.stop()?;
    assert!(
        payload_on(&packets, port) > 0,
        "outsider's leg should use the network stack"
    );
    assert_eq!(
        payload_on(&packets, backend),
        0,
        "backend leg stays redirected"
    );
    Ok(())
}

#[test]
fn sockhash_returns_to_baseline_after_ten_thousand_connections() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let f = fixture("acc3", 7322)?;
    let _sink = f.sink()?;
    let baseline = f.accel()?["sockets"].as_u64().unwrap_or(0);
    let counted = f.accel()?["countedSockets"].as_u64().unwrap_or(0);
    f.load("push", 10_000, 64, 16)?;
    // Sockets leave the map as they close; the last ones may still be closing.
    let sockets = wait_for_sockets(&f, baseline)?;
    let mut accel = f.accel()?;
    for _ in 0..50 {
        if accel["countedSockets"].as_u64() == Some(counted) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        accel = f.accel()?;
    }
    eprintln!("after 10,000 connections: {accel}");
    assert_eq!(sockets, baseline, "sockhash back at its baseline");
    // Each client and backend socket was counted for shortcuts; sock_ops removed every entry
    // when its socket closed.
    assert_eq!(
        accel["countedSockets"].as_u64(),
        Some(counted),
        "sent map back at its baseline: {accel}"
    );
    assert!(
        accel["socketsInserted"].as_u64() >= Some(4 * 10_000),
        "{accel}"
    );
    Ok(())
}

#[test]
#[ignore = "known kernel behaviour (issue 4): a socket in a sockhash that has half-closed gets \
            EAGAIN from a blocking read of the reply in 3-26% of connections (well before its \
            30 s read timeout): the ACK of its own FIN wakes the reader (FIN_WAIT1 -> \
            FIN_WAIT2) and tcp_bpf_recvmsg does not wait again; seen without skiff's router too"]
fn replies_after_half_close_survive_redirection() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let f = fixture("acc2", 7312)?;
    let _sink = f.sink()?;
    // Each connection half-closes, then waits for the sink's checksum reply.
    f.load("send", 300, 100_000, 1)?;
    f.load("send", 200, 256 << 10, 200)?;
    f.load("send", 1, 1 << 30, 1)?;
    Ok(())
}

#[test]
fn nothing_is_left_in_the_kernel_after_exit_or_after_a_crash() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let mut f = fixture("acc4", 7332)?;
    let pins = PathBuf::from(f.accel()?["pinDir"].as_str().unwrap_or_default());
    assert!(
        pins.join("SKIFF_SOCKS").exists(),
        "maps pinned under {}",
        pins.display()
    );
    let cgroup = f.cgroup.path().to_str().expect("utf-8").to_owned();
    let attached = || -> anyhow::Result<usize> {
        Ok(run("bpftool", &["cgroup", "show", &cgroup])?
            .matches("skiff_sock_ops")
            .count())
    };
    assert_eq!(attached()?, 1, "sock_ops attached while running");

    // A crash leaves the pinned link, so the program stays attached...
    f.site.kill();
    assert!(pins.exists(), "a crashed router leaves its pins");
    assert_eq!(attached()?, 1);
    // ...until the next start clears the leftovers and attaches afresh, once.
    f.site.run(&f.ns, Some(&f.cgroup))?;
    f.ns.wait_listening(f.port, Duration::from_secs(10))?;
    let _sink = f.sink()?;
    f.load("push", 4, 1 << 20, 4)?;
    assert_eq!(
        attached()?,
        1,
        "exactly one program attached after the restart"
    );
    assert!(leg_bytes(&f.accel()?) > 0);

    // A clean exit detaches and unpins everything.
    f.site.stop()?;
    assert!(!pins.exists(), "pins removed on exit");
    // The shared parent goes too when no other site pins there (other tests may be between
    // removing their pins and removing the parent, so allow them a moment).
    if let Some(parent) = pins.parent() {
        let empty_and_present =
            || std::fs::read_dir(parent).is_ok_and(|mut entries| entries.next().is_none());
        let mut tries = 0;
        while empty_and_present() && tries < 40 {
            std::thread::sleep(Duration::from_millis(50));
            tries += 1;
        }
        assert!(
            !empty_and_present(),
            "{} left behind empty",
            parent.display()
        );
    }
    assert_eq!(attached()?, 0, "program detached on exit");
    Ok(())
}

#[test]
fn ipv6_and_v4_mapped_legs_are_redirected_too() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let ns = Netns::new("acc6")?;
    let cgroup = Cgroup::new("acc6")?;
    let site = Site::start_in(&ns, Some(&cgroup), "west", None)?;
    // IPv6 on both legs: the backend and the listener on ::1.
    site.cli(&[
        "connector",
        "create",
        "six",
        "--host",
        "::1",
        "--port",
        "7331",
    ])?;
    site.cli(&[
        "listener", "create", "six", "--host", "::1", "--port", "7332",
    ])?;
    // v4-mapped: a dual-stack listener on :: reached over IPv4, so the router's accepted
    // socket sees ::ffff:127.0.0.1 while the client's is plain IPv4.
    site.cli(&[
        "connector",
        "create",
        "mapped",
        "--host",
        "127.0.0.1",
        "--port",
        "7333",
    ])?;
    site.cli(&[
        "listener", "create", "mapped", "--host", "::", "--port", "7334",
    ])?;
    ns.wait_listening(7332, Duration::from_secs(10))?;
    ns.wait_listening(7334, Duration::from_secs(10))?;
    let accel = || -> anyhow::Result<u64> { Ok(leg_bytes(&site.status()?["accel"])) };
    let data = pattern(4 << 20, 11);
    for (what, backend_ip, backend, connect, listener) in [
        ("IPv6", "::1", 7331, "[::1]:7332", 7332),
        ("v4-mapped", "127.0.0.1", 7333, "127.0.0.1:7334", 7334),
    ] {
        let before = accel()?;
        let capture = Capture::start(&ns, &format!("tcp port {listener} or tcp port {backend}"))?;
        let got = socat_transfer(&ns, Some(&cgroup), backend_ip, backend, connect, &data)?;
        let packets = capture.stop()?;
        let redirected = accel()? - before;
        assert!(got == data, "{what}: transfer corrupted");
        assert_eq!(
            payload_on(&packets, listener),
            0,
            "{what}: client leg crossed loopback"
        );
        assert_eq!(
            payload_on(&packets, backend),
            0,
            "{what}: backend leg crossed loopback"
        );
        assert!(
            redirected >= 2 * data.len() as u64,
            "{what}: both legs redirected ({redirected} bytes)"
        );
    }
    Ok(())
}

/// Runs a one-way checksummed transfer of `data` to `listener_port` (landing at a socat on
/// `backend`) on another thread while `during` runs; returns whether the transfer was still
/// going when `during` finished, and what arrived.
fn transfer_during(
    ns: &Netns,
    cgroup: &Cgroup,
    (listener_port, backend): (u16, u16),
    data: &[u8],
    during: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<(bool, Vec<u8>)> {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let flowing = scope.spawn(|| {
            let listener = format!("127.0.0.1:{listener_port}");
            let got = socat_transfer(ns, Some(cgroup), "127.0.0.1", backend, &listener, data);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            got
        });
        // Act only once the client's connection is established: writing the 1 GiB input
        // file and starting socat took over 6 s under CI's load, and acting before the
        // connect (deleting the listener) made the client's connect fail instead.
        let filter = format!("( dport = :{listener_port} )");
        let within = kernel_tests::patience(Duration::from_secs(60));
        let deadline = Instant::now() + within;
        loop {
            let established = ns.run(&["ss", "-Htn", "state", "established", &filter])?;
            if !established.trim().is_empty() || done.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the transfer's connection to :{listener_port} was not established within {} s",
                    within.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let acted = during();
        let overlapped = !done.load(std::sync::atomic::Ordering::SeqCst);
        let got = flowing
            .join()
            .map_err(|_| anyhow::anyhow!("transfer thread panicked"))?;
        acted?;
        Ok((overlapped, got?))
    })
}

fn wait_for_sockets(f: &Fixture, at_most: u64) -> anyhow::Result<u64> {
    let mut sockets = u64::MAX;
    for _ in 0..100 {
        sockets = f.accel()?["sockets"].as_u64().unwrap_or(u64::MAX);
        if sockets <= at_most {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(sockets)
}

#[test]
fn a_gigabyte_survives_its_listener_being_deleted_and_a_restart_leaves_clean_maps()
-> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    // A gigabyte may take longer than the default 10 s drain on a loaded 2-core machine (CI
    // saw the client reset when the drain ran out), and far longer on a guest's emulated
    // CPUs: the stop below must wait for it.
    let drain = format!(
        "{}s",
        kernel_tests::patience(Duration::from_secs(120)).as_secs()
    );
    let mut f = fixture_with("acc7", 7342, &["--drain-timeout", &drain])?;
    let baseline = f.accel()?["sockets"].as_u64().unwrap_or(0);
    let data = pattern(1 << 30, 3);
    let ports = (f.port, f.backend());

    // The listener goes while a gigabyte crosses it: the established stream finishes
    // byte-exact, the port closes, the sockhash returns to its baseline.
    let (overlapped, got) = transfer_during(&f.ns, &f.cgroup, ports, &data, || {
        f.site.cli(&["listener", "delete", "sink"]).map(drop)
    })?;
    assert!(overlapped, "the delete must land while the transfer runs");
    assert!(
        got == data,
        "1 GiB through a deleted listener arrived corrupted"
    );
    let listening = f.ns.run(&["ss", "-Htln"])?;
    assert!(
        !listening.contains(&format!(":{} ", f.port)),
        "the deleted listener's port is closed: {listening}"
    );
    assert_eq!(
        wait_for_sockets(&f, baseline)?,
        baseline,
        "sockhash back at its baseline"
    );

    // A graceful stop while a gigabyte flows: the router drains it before exiting; the next
    // router starts with clean maps and redirects again.
    let port = f.port.to_string();
    f.site.cli(&[
        "listener",
        "create",
        "sink",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
    ])?;
    f.ns.wait_listening(f.port, Duration::from_secs(10))?;
    let (ns, cgroup, site) = (&f.ns, &f.cgroup, &mut f.site);
    let (overlapped, got) = transfer_during(ns, cgroup, ports, &data, || {
        site.stop_within(Duration::from_secs(130))
    })?;
    assert!(overlapped, "the stop must begin while the transfer runs");
    assert!(
        got == data,
        "1 GiB during a graceful stop arrived corrupted"
    );
    f.site.run(&f.ns, Some(&f.cgroup))?;
    f.ns.wait_listening(f.port, Duration::from_secs(10))?;
    let fresh = f.accel()?;
    assert_eq!(fresh["sockets"].as_u64(), Some(baseline), "{fresh}");
    let small = pattern(4 << 20, 5);
    let listener = format!("127.0.0.1:{}", f.port);
    let got = socat_transfer(
        &f.ns,
        Some(&f.cgroup),
        "127.0.0.1",
        f.backend(),
        &listener,
        &small,
    )?;
    assert!(got == small, "transfer after the restart corrupted");
    // Every byte redirected on both legs, unless the router fell behind and its client was
    // diverted to TCP for the rest (in the 6.1 guest, whose emulated CPUs the router runs on
    // at a tenth of the host's speed, 4 MiB passes its queue limit).
    let accel = f.accel()?;
    let diverted = accel["sendersDiverted"].as_u64().unwrap_or(0)
        + accel["sendersUnderPressure"].as_u64().unwrap_or(0);
    let legs = leg_bytes(&accel);
    assert!(
        legs >= 2 * small.len() as u64 || (legs > 0 && diverted > 0),
        "the restarted router redirects again: {accel}"
    );
    Ok(())
}

/// 200 clients push 4 MiB each at once through an accelerated hop; every stream arrives byte
/// for byte, and no client's send fails (in 8 GiB guests they got ENOMEM before sk_msg
/// diverted senders under TCP memory pressure).
#[test]
fn two_hundred_concurrent_streams_arrive_byte_exact() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    // It takes TCP's memory past tcp_mem's low mark: it runs alone.
    let _memory = TCP_MEMORY
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let f = fixture("acc8", 7352)?;
    let (conns, bytes) = (200, 4u64 << 20);
    let backend = format!("127.0.0.1:{}", f.backend());
    let verify = Proc::spawn(
        &f.ns,
        Some(&f.cgroup),
        &[
            &loadgen(),
            "verify",
            &backend,
            &conns.to_string(),
            &bytes.to_string(),
        ],
    )?;
    f.ns.wait_listening(f.backend(), Duration::from_secs(10))?;
    // All 200 at once, each with its own pseudo-random bytes, checked at the backend.
    f.load("push", conns, bytes, conns)?;
    let tally = verify.wait(Duration::from_secs(120))?;
    eprintln!("backend: {tally}");
    let accel = f.accel()?;
    // Every leg redirected, unless TCP's memory passed tcp_mem's low mark (an 8 GiB guest's
    // does, 200 x 2 legs x up to the queue limit): then senders took the TCP path instead of
    // failing with ENOMEM, and sk_msg says so.
    let pressured = accel["sendersUnderPressure"].as_u64().unwrap_or(0);
    assert!(
        leg_bytes(&accel) >= 2 * conns as u64 * bytes || pressured > 0,
        "both legs of every stream redirected: {accel}"
    );
    Ok(())
}

/// Largest sum of the namespace's receive queues seen while `running` runs (sampled every
/// 100 ms for at most `within`).
fn peak_receive_queues(ns: &Netns, within: Duration) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < within {
        peak = peak.max(ns.receive_queues()?);
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(peak)
}

/// Held by the tests that measure the kernel's queues against [`held_back`], so that they take
/// turns. The bound assumes the router runs when its flow control's timer fires; two of these
/// pushers at once on this 2-core machine, beside the rest of the file, kept the routers from
/// running in time and the peaks went past it (128,025,381 and 125,862,730 B against
/// 117,440,512 in one CI run; 70 MB and 33 MB when they ran alone).
static QUEUE_BOUND_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// TCP's memory, which the kernel counts for all network namespaces together. Past
/// tcp_mem's low mark sk_msg diverts every sender, the router's too. The 200-stream test takes
/// it past that mark, so it holds this lock for writing and runs alone. Every other test
/// holds it for reading ([`shared_tcp_memory`]). Beside the 200-stream test, a stopped
/// router's client was diverted for pressure instead of by the queue limit (one CI run:
/// `sendersDiverted 0, sendersUnderPressure 1`). In another run, in the 6.12 guest, 819,344
/// bytes of a backend leg that should have stayed redirected crossed loopback.
static TCP_MEMORY: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A turn among the tests that leave TCP's memory under its low mark.
fn shared_tcp_memory() -> std::sync::RwLockReadGuard<'static, ()> {
    TCP_MEMORY
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the kernel may hold for one stream whose reader falls behind, with the router's flow
/// control: the router's queue limit on each of the two redirected queues (the backend's and
/// the router's), and once the sender is diverted, one TCP receive buffer, which autotuning
/// grows up to tcp_rmem's maximum (32 MiB here). Without it, a stalled reader let a pushing
/// client park 1.8 GB within four seconds here.
fn held_back(ns: &Netns, accel: &serde_json::Value) -> anyhow::Result<u64> {
    let rmem = ns.run(&["cat", "/proc/sys/net/ipv4/tcp_rmem"])?;
    let tcp_max: u64 = rmem
        .split_whitespace()
        .nth(2)
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected tcp_rmem: {rmem}"))?;
    let limit = accel["queueLimit"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no queue limit in {accel}"))?;
    Ok(2 * limit + tcp_max + (16 << 20))
}

/// Pushes `mib` MiB from a client through fixture `tag`'s router into a backend that reads
/// nothing past the seed for `stall_ms`, the client pausing `pause_ms` after its seed. Checks
/// that every byte arrives and that the kernel held less than [`held_back`] meanwhile; returns
/// the router's accel status.
fn push_into_stalled_backend(
    tag: &str,
    port: u16,
    mib: u64,
    stall_ms: u64,
    pause_ms: u64,
) -> anyhow::Result<serde_json::Value> {
    let _turn = QUEUE_BOUND_TESTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let f = fixture(tag, port)?;
    let bytes = (mib << 20).to_string();
    let backend = format!("127.0.0.1:{}", f.backend());
    let verify = Proc::spawn(
        &f.ns,
        Some(&f.cgroup),
        &[
            &loadgen(),
            "verify",
            &backend,
            "1",
            &bytes,
            &stall_ms.to_string(),
        ],
    )?;
    f.ns.wait_listening(f.backend(), Duration::from_secs(10))?;
    let listener = format!("127.0.0.1:{}", f.port);
    let push = Proc::spawn(
        &f.ns,
        Some(&f.cgroup),
        &[
            &loadgen(),
            "push",
            &listener,
            "1",
            &bytes,
            "1",
            &pause_ms.to_string(),
        ],
    )?;
    // Sampled while the backend stalls; it drains its queue afterwards.
    let peak = peak_receive_queues(&f.ns, Duration::from_millis(stall_ms))?;
    push.wait(Duration::from_secs(120))?;
    let tally = verify.wait(Duration::from_secs(120))?;
    let accel = f.accel()?;
    eprintln!("peak receive queues {peak} B; {tally}; {accel}");
    let bound = held_back(&f.ns, &accel)?;
    assert!(
        peak < bound,
        "the kernel held {peak} B (bound {bound}) for a stalled reader"
    );
    Ok(accel)
}

/// Redirection puts bytes straight into the reader's queue, past its receive buffer. The
/// router holds back its own writes to a backend that stops reading, then diverts the client
/// whose bytes pile up at the router to the TCP path, whose flow control stops it. When the
/// backend reads again, every byte arrives, in order.
#[test]
fn a_stalled_backend_holds_back_an_accelerated_client() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let accel = push_into_stalled_backend("acc7", 7352, 512, 4000, 0)?;
    assert!(accel["writesPaused"].as_u64() >= Some(1), "{accel}");
    assert!(accel["sendersDiverted"].as_u64() >= Some(1), "{accel}");
    assert!(accel["messagesDiverted"].as_u64() > Some(0), "{accel}");
    Ok(())
}

/// A sender on the shortcut whose reader stops is held to the queue limit: the router offers
/// the shortcut while the client pauses after its seed, the client then pushes into a backend
/// that reads nothing for two seconds, and once the backend holds the limit unread the
/// client's messages go to the router (which paces and diverts them) instead of piling up in
/// the backend's queue. The programs count both reasons a sender with a shortcut goes to the
/// router, and every byte arrives.
#[test]
fn a_shortcut_whose_reader_stops_is_held_to_the_limit() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let accel = push_into_stalled_backend("acc13", 7392, 256, 2000, 300)?;
    let count = |name: &str| accel[name].as_u64().unwrap_or(0);
    assert!(count("shortcutsOffered") >= 1, "{accel}");
    assert!(count("messagesShortcut") > 0, "{accel}");
    // The backend's queue reached the limit while the router had forwarded everything...
    assert!(count("messagesOverBudget") >= 1, "{accel}");
    // ...and the messages after that found the router behind.
    assert!(count("messagesBehindRouter") >= 1, "{accel}");
    Ok(())
}

/// A link is slower than redirection, so a client pushing through an accelerated router to
/// another site outruns it. Before the router diverted such senders, the kernel queued their
/// bytes until the client got ENOMEM (every benchmark run of this path failed that way).
#[test]
fn an_accelerated_client_sending_across_a_link_is_held_back() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let _turn = QUEUE_BOUND_TESTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let west_ns = Netns::new("acc8w")?;
    let east_ns = Netns::new("acc8e")?;
    let cgroup = Cgroup::new("acc8")?;
    let (west_ip, _) = west_ns.link(&east_ns, 9)?;
    let west = Site::start(&west_ns, "west", Some(&format!("{west_ip}:55671")))?;
    let east = Site::start_in(&east_ns, Some(&cgroup), "east", None)?;
    west.link_from(&east)?;

    // iperf3 writes as fast as redirection takes it, which is what the benchmark saw fail.
    let server = Proc::spawn(
        &west_ns,
        None,
        &["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", "7361"],
    )?;
    west_ns.wait_listening(7361, Duration::from_secs(10))?;
    west.connector("upload", 7361)?;
    east.listener("upload", 7362)?;
    east.wait_for(&["listener", "status"], Duration::from_secs(10), |out| {
        out.contains("\"reachable\": true")
    })?;
    let client = Proc::spawn(
        &east_ns,
        Some(&cgroup),
        &["iperf3", "-c", "127.0.0.1", "-p", "7362", "-t", "3"],
    )?;
    let peak = peak_receive_queues(&east_ns, Duration::from_secs(3))?;
    let report = client.wait(Duration::from_secs(60))?;
    server.wait(Duration::from_secs(30))?;
    let tally = report
        .lines()
        .rev()
        .find(|l| l.contains("sender"))
        .unwrap_or_default()
        .to_owned();
    let status = east.status()?;
    let accel = &status["accel"];
    eprintln!("peak receive queues at east {peak} B; {tally}; {accel}");
    let bound = held_back(&east_ns, accel)?;
    assert!(peak < bound, "east's kernel held {peak} B (bound {bound})");
    assert!(accel["sendersDiverted"].as_u64() >= Some(1), "{accel}");
    Ok(())
}

/// The bound on a workload's redirected bytes holds without the router running: with the
/// router stopped (SIGSTOP), nothing in userspace can look at its queue or divert the client,
/// yet sk_msg diverts the client at the message that would take the router's socket past the
/// limit, and TCP then holds it back. Before sk_msg did, a router kept from running let the
/// kernel hold whatever the client sent (the CI run that saw 121 MB against a 117 MB bound
/// had a busy router, not a stopped one). Every byte still arrives once the router runs again.
#[test]
fn a_stopped_router_still_holds_an_accelerated_client_to_the_limit() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let _turn = QUEUE_BOUND_TESTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let f = fixture("acc14", 7402)?;
    let bytes = (256u64 << 20).to_string();
    let verify = Proc::spawn(
        &f.ns,
        Some(&f.cgroup),
        &[
            &loadgen(),
            "verify",
            &format!("127.0.0.1:{}", f.backend()),
            "1",
            &bytes,
            "0",
        ],
    )?;
    f.ns.wait_listening(f.backend(), Duration::from_secs(10))?;
    let router = f
        .site
        .router_pid()
        .ok_or_else(|| anyhow::anyhow!("no router"))?;
    let stopped = Stopped::new(router)?;
    let push = Proc::spawn(
        &f.ns,
        Some(&f.cgroup),
        &[
            &loadgen(),
            "push",
            &format!("127.0.0.1:{}", f.port),
            "1",
            &bytes,
            "1",
            "0",
        ],
    )?;
    let peak = peak_receive_queues(&f.ns, Duration::from_secs(2))?;
    drop(stopped);
    push.wait(Duration::from_secs(120))?;
    let tally = verify.wait(Duration::from_secs(120))?;
    let accel = f.accel()?;
    eprintln!("peak receive queues {peak} B with the router stopped; {tally}; {accel}");
    // One limit of redirected bytes and one TCP receive buffer; the router wrote nothing.
    let bound = held_back(&f.ns, &accel)?;
    assert!(peak < bound, "the kernel held {peak} B (bound {bound})");
    assert!(accel["sendersDiverted"].as_u64() >= Some(1), "{accel}");
    assert!(tally.contains("\"ok\": 1"), "{tally}");
    Ok(())
}

/// A diverted client comes back to redirection: the client pushes 512 MiB through an
/// accelerated router to a backend across a link (no shortcut past the router there). The
/// router is stopped at first, so sk_msg diverts the client at the queue limit and TCP's
/// window stops it. Then the router is let go; the client pauses between two writes after
/// 64 MiB until the router has read everything that took the TCP path (the router's reads
/// past a lost wakeup, see `accel::Inflow::read_stuck`: before them it waited for good), and
/// its next message is redirected again. Every byte arrives in order.
///
/// The pause is the client's own, between writes: a client stopped by a signal may be inside
/// a write whose verdict was already given, and its next message then finds its last bytes
/// not yet acknowledged. A bulk sender that never pauses comes back only when a write finds
/// the TCP path empty.
#[test]
fn a_diverted_client_returns_to_redirection_once_the_router_catches_up() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let _turn = QUEUE_BOUND_TESTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let west_ns = Netns::new("acc15w")?;
    let east_ns = Netns::new("acc15e")?;
    let cgroup = Cgroup::new("acc15")?;
    let (west_ip, _) = west_ns.link(&east_ns, 15)?;
    let west = Site::start(&west_ns, "west", Some(&format!("{west_ip}:55671")))?;
    let east = Site::start_in(&east_ns, Some(&cgroup), "east", None)?;
    west.link_from(&east)?;
    let bytes = (512u64 << 20).to_string();
    let verify = Proc::spawn(
        &west_ns,
        None,
        &[&loadgen(), "verify", "127.0.0.1:7411", "1", &bytes, "0"],
    )?;
    west_ns.wait_listening(7411, Duration::from_secs(10))?;
    west.connector("upload", 7411)?;
    east.listener("upload", 7412)?;
    east.wait_for(&["listener", "status"], Duration::from_secs(10), |out| {
        out.contains("\"reachable\": true")
    })?;
    let router = east
        .router_pid()
        .ok_or_else(|| anyhow::anyhow!("no router"))?;
    let router_stopped = Stopped::new(router)?;
    // The client pauses between two writes once 64 MiB are out, until the gate opens.
    let gate_dir = TempDir::new("acc15-gate")?;
    let gate = gate_dir.path().join("open");
    let gate_arg = gate.to_string_lossy();
    let mut push = Proc::spawn(
        &east_ns,
        Some(&cgroup),
        &[
            &loadgen(),
            "push-gated",
            "127.0.0.1:7412",
            &bytes,
            &(64u64 << 20).to_string(),
            &gate_arg,
        ],
    )?;
    // Recv-Q and Send-Q count only what took the TCP path (redirected bytes are not in them).
    let tcp_path = |filter: &str| -> anyhow::Result<(u64, u64)> {
        let listed = east_ns.run(&["ss", "-Htn", "state", "established", filter])?;
        Ok(listed.lines().fold((0, 0), |(r, w), line| {
            let mut fields = line
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            (
                r + fields.next().unwrap_or(0),
                w + fields.next().unwrap_or(0),
            )
        }))
    };
    let (router_end, client_end) = ("( sport = :7412 )", "( dport = :7412 )");
    wait_until("the client is diverted", || Ok(tcp_path(router_end)?.0 > 0))?;
    drop(router_stopped);
    push.wait_for_stderr("at the gate")?;
    wait_until("the router has read the TCP path dry", || {
        Ok(tcp_path(router_end)?.0 == 0 && tcp_path(client_end)?.1 == 0)
    })?;
    std::fs::write(&gate, b"")?;
    push.wait(Duration::from_secs(120))?;
    let tally = verify.wait(Duration::from_secs(120))?;
    let status = east.status()?;
    let accel = &status["accel"];
    eprintln!("{tally}; {accel}");
    assert!(tally.contains("\"ok\": 1"), "{tally}");
    let count = |name: &str| accel[name].as_u64().unwrap_or(0);
    assert!(count("sendersDiverted") >= 1, "{accel}");
    assert!(count("sendersReturned") >= 1, "{accel}");
    Ok(())
}

/// Polls `done` every 20 ms until it holds, for up to 20 s (scaled for slow machines).
fn wait_until(what: &str, done: impl Fn() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + kernel_tests::patience(Duration::from_secs(20));
    while !done()? {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A process kept stopped (SIGSTOP) until dropped (SIGCONT).
struct Stopped(libc::pid_t);

impl Stopped {
    fn new(pid: u32) -> anyhow::Result<Self> {
        let pid = libc::pid_t::try_from(pid)?;
        // SAFETY: kill has no memory-safety preconditions; pid is the test's own router.
        anyhow::ensure!(
            unsafe { libc::kill(pid, libc::SIGSTOP) } == 0,
            "SIGSTOP failed"
        );
        Ok(Self(pid))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// With acceleration on, only the start needs privilege: the router attaches its programs as
/// root, then runs as nobody with every capability set empty before it opens a socket, and
/// keeps redirecting through the maps it holds open. A keeper that stays root with no
/// capabilities removes the pins, and so detaches the programs, when the router goes: even
/// when it is killed.
#[test]
fn an_accelerated_router_runs_as_nobody_and_its_keeper_cleans_up() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let ns = Netns::new("acc9")?;
    let cgroup = Cgroup::new("acc9")?;
    let mut site = Site::start_accelerated_as(&ns, &cgroup, "west", "nobody")?;
    let pid = site
        .router_pid()
        .ok_or_else(|| anyhow::anyhow!("no router"))?;
    assert_eq!(proc_status(pid, "Uid:")?, "65534\t65534\t65534\t65534");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(proc_status(pid, caps)?, "0000000000000000", "router {caps}");
    }
    assert_eq!(proc_status(pid, "NoNewPrivs:")?, "1");
    let keepers = children(pid);
    assert_eq!(keepers.len(), 1, "one keeper: {keepers:?}");
    let keeper = keepers[0];
    assert_eq!(proc_status(keeper, "Uid:")?, "0\t0\t0\t0");
    for caps in ["CapPrm:", "CapEff:", "CapBnd:"] {
        assert_eq!(
            proc_status(keeper, caps)?,
            "0000000000000000",
            "keeper {caps}"
        );
    }

    // The unprivileged router still redirects both legs.
    site.connector("nobody", 7371)?;
    site.listener("nobody", 7372)?;
    ns.wait_listening(7372, Duration::from_secs(10))?;
    let data = pattern(4 << 20, 13);
    let got = socat_transfer(
        &ns,
        Some(&cgroup),
        "127.0.0.1",
        7371,
        "127.0.0.1:7372",
        &data,
    )?;
    assert!(
        got == data,
        "transfer through the unprivileged router corrupted"
    );
    let status = site.status()?;
    let accel = &status["accel"];
    assert!(leg_bytes(accel) >= 2 * (4 << 20), "{accel}");

    // Killed, the router cannot clean up; its keeper does, at once.
    let pins = PathBuf::from(accel["pinDir"].as_str().unwrap_or_default());
    assert!(pins.join("SKIFF_SOCKS").exists(), "{}", pins.display());
    let cgroup_path = cgroup.path().to_str().expect("utf-8").to_owned();
    site.kill();
    let deadline = Instant::now() + kernel_tests::patience(Duration::from_secs(5));
    while pins.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pins.exists(), "the keeper removed {}", pins.display());
    let attached = || -> anyhow::Result<bool> {
        Ok(run("bpftool", &["cgroup", "show", &cgroup_path])?.contains("skiff_sock_ops"))
    };
    assert!(!attached()?, "sock_ops detached after the kill");

    // Started again, and stopped cleanly: the router waits for its keeper to clean up.
    site.run(&ns, Some(&cgroup))?;
    assert!(pins.join("SKIFF_SOCKS").exists() && attached()?);
    site.stop()?;
    assert!(!pins.exists(), "pins removed on a clean exit");
    assert!(!attached()?, "sock_ops detached on a clean exit");
    Ok(())
}

/// With both workloads of a local hop redirected, the router offers each sender a shortcut
/// into the other workload's socket once it has forwarded everything, and the bytes skip the
/// router. A sender whose reader holds the queue limit unread, here 4 MiB (tcp_rmem's maximum
/// in this namespace), goes back to the router until the router catches up and offers again;
/// no such switch may reorder a byte. Requests of every size up to 2 MiB, written up to three
/// at a time before the client reads the echo (so that about one round in eighteen has more
/// than the limit in flight), are compared byte for byte.
#[test]
fn the_router_steps_out_of_a_local_hop_without_reordering_a_byte() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let ns = Netns::new("acc10")?;
    ns.run(&["sysctl", "-qw", "net.ipv4.tcp_rmem=4096 131072 4194304"])?;
    let cgroup = Cgroup::new("acc10")?;
    let site = Site::start_in(&ns, Some(&cgroup), "west", None)?;
    site.cli(&[
        "connector",
        "create",
        "echo",
        "--host",
        "127.0.0.1",
        "--port",
        "7361",
    ])?;
    site.cli(&[
        "listener",
        "create",
        "echo",
        "--host",
        "127.0.0.1",
        "--port",
        "7362",
    ])?;
    let _echo = Proc::spawn(&ns, Some(&cgroup), &[&loadgen(), "echo", "127.0.0.1:7361"])?;
    ns.wait_listening(7361, Duration::from_secs(10))?;
    ns.wait_listening(7362, Duration::from_secs(10))?;

    let (conns, rounds, max_len) = (8, 60, 2 << 20);
    let tally = Proc::spawn(
        &ns,
        Some(&cgroup),
        &[
            &loadgen(),
            "rounds",
            "127.0.0.1:7362",
            &conns.to_string(),
            &rounds.to_string(),
            &max_len.to_string(),
        ],
    )?
    .wait(Duration::from_secs(180))?;
    let tally: serde_json::Value = serde_json::from_str(tally.trim())?;
    let accel = site.status()?["accel"].clone();
    eprintln!("{tally}; {accel}");
    let bytes = tally["bytes"].as_u64().unwrap_or(0);
    assert_eq!(accel["queueLimit"].as_u64(), Some(4 << 20), "{accel}");
    // Both directions: what the clients sent and what the echo server sent back.
    let shortcut = accel["bytesShortcut"].as_u64().unwrap_or(0);
    assert!(
        shortcut >= 2 * bytes * 9 / 10,
        "{shortcut} of {} B took the shortcut",
        2 * bytes
    );
    // Offered again and again, beyond the first offer of each of the 16 directions. (That the
    // limit bounds the far queue is the stalled-reader tests' business: with sk_msg ignoring
    // it, 537 MB queued there.)
    let offers = accel["shortcutsOffered"].as_u64().unwrap_or(0);
    assert!(offers > 16, "{offers} offers for {shortcut} B: {accel}");
    assert_eq!(accel["shortcutsGivenUp"].as_u64(), Some(0), "{accel}");
    Ok(())
}

/// A real request/response client through the accelerated hop: redis-benchmark (pipelined,
/// 20 connections) against redis-server, both in the cgroup. After each connection's first
/// exchange its requests and replies take the shortcuts past the router; a 1 MB value written
/// and read back with redis-cli arrives intact.
#[test]
fn redis_through_an_accelerated_hop_takes_the_shortcut() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let f = fixture("acc11", 7372)?;
    let _redis = redis_server(&f.ns, Some(&f.cgroup), f.backend())?;
    let port = f.port.to_string();
    let in_cgroup = |argv: &[&str]| -> anyhow::Result<String> {
        Proc::spawn(&f.ns, Some(&f.cgroup), argv)?.wait(Duration::from_secs(120))
    };
    redis_benchmark(
        &f.ns,
        Some(&f.cgroup),
        f.port,
        &["-n", "100000", "-P", "16", "-d", "512"],
    )?;
    // The value goes through stdin (-x): a megabyte does not fit in an argument list.
    let script = format!(
        "set -e; f=$(mktemp); trap 'rm -f $f' EXIT; \
         head -c 750000 /dev/urandom | base64 -w0 > $f; \
         redis-cli -p {port} -x set big < $f >/dev/null; \
         [ \"$(redis-cli -p {port} get big)\" = \"$(cat $f)\" ] && echo same"
    );
    assert_eq!(in_cgroup(&["sh", "-c", &script])?.trim(), "same");
    let accel = f.accel()?;
    eprintln!("{accel}");
    let count = |name: &str| accel[name].as_u64().unwrap_or(0);
    // Requests and replies of 512-byte values, 200,000 of them: at least 90% of the bytes
    // took the shortcut (a router-path byte is counted once per leg, so twice).
    let (shortcut, routed) = (count("bytesShortcut"), count("bytesRedirected") / 2);
    assert!(shortcut >= 9 * routed && shortcut > 0, "{accel}");
    Ok(())
}

/// The review's tenant: a process in the accelerated cgroup connecting straight to a
/// connector's backend port, whose receiver never reads, had both ends redirected with none of
/// the router's flow control, and the kernel queued hundreds of MiB. Now neither end of a
/// connection without the router enters the sockhash (counted as not the router's), so TCP's
/// own window holds the sender; and a pair in another network namespace at the same address
/// and port is left alone too. The router's own connections are still accelerated.
#[test]
fn only_connections_with_the_router_at_one_end_are_redirected() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let _memory = shared_tcp_memory();
    let f = fixture("accf", 7392)?;
    let backend = f.backend();
    let before = f.accel()?;

    // The tenant: connects to the backend port directly and pushes 128 MiB into a reader
    // that reads nothing for 3 s, then checks every byte.
    let bytes = (128u64 << 20).to_string();
    let target = format!("127.0.0.1:{backend}");
    let verify = Proc::spawn(
        &f.ns,
        Some(&f.cgroup),
        &[&loadgen(), "verify", &target, "1", &bytes, "3000"],
    )?;
    f.ns.wait_listening(backend, Duration::from_secs(10))?;
    let push = Proc::spawn(
        &f.ns,
        Some(&f.cgroup),
        &[&loadgen(), "push", &target, "1", &bytes, "1"],
    )?;
    let peak = peak_receive_queues(&f.ns, Duration::from_millis(3000))?;
    push.wait(Duration::from_secs(120))?;
    let tally = verify.wait(Duration::from_secs(120))?;
    eprintln!("tenant pair: {tally}");

    // Another network namespace, same cgroup, same address and port: its own pair.
    let other = Netns::new("accg")?;
    let data = pattern(1 << 20, 11);
    let got = socat_transfer(
        &other,
        Some(&f.cgroup),
        "127.0.0.1",
        backend,
        &format!("127.0.0.1:{backend}"),
        &data,
    )?;
    assert!(got == data, "the other namespace's transfer corrupted");

    let after = f.accel()?;
    eprintln!("tenant pair: kernel queues peaked at {peak} B; {after}");
    let field = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    assert!(
        field(&after, "socketsNotTheRouters") >= field(&before, "socketsNotTheRouters") + 2,
        "the tenant's sockets were counted as not the router's: {after}"
    );
    assert_eq!(
        field(&after, "socketsInserted"),
        field(&before, "socketsInserted"),
        "no socket without the router entered the sockhash: {after}"
    );
    // TCP's window bounds what a non-reading receiver holds (its tcp_rmem maximum, 32 MiB
    // here, and the sender's send buffer): far below what redirection queued.
    assert!(
        peak < 96 << 20,
        "the kernel held {peak} B for a receiver that does not read"
    );

    // The router's own connections are still taken.
    let got = socat_transfer(
        &f.ns,
        Some(&f.cgroup),
        "127.0.0.1",
        backend,
        &format!("127.0.0.1:{}", f.port),
        &data,
    )?;
    assert!(got == data, "transfer through the router corrupted");
    let last = f.accel()?;
    assert!(
        field(&last, "socketsInserted") >= field(&after, "socketsInserted") + 4,
        "both legs of the router's connection were accelerated: {last}"
    );
    Ok(())
}
