//! Namespace isolation at connect(): the cgroup connect4/connect6 hooks refuse (EPERM)
//! connections to a listener from namespaces it does not allow. Namespaces are child cgroups
//! of a cgroup each test creates; the router runs in the parent.

use std::time::Duration;

use kernel_tests::{Cgroup, Netns, Proc, proc_status, require_root, skiff::Site};

const CONNECT: &str = "import socket, sys
host, port = sys.argv[1].rsplit(':', 1)
host = host.strip('[]')
s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
s.settimeout(3)
try:
    s.connect((host, int(port)))
    print('ok')
except OSError as e:
    print(e.errno)";

/// Connects from a process in `cgroup`: "ok", or the errno ("1" is EPERM, "111" refused).
fn connect(ns: &Netns, cgroup: &Cgroup, addr: &str) -> anyhow::Result<String> {
    let out = Proc::spawn(ns, Some(cgroup), &["python3", "-c", CONNECT, addr])?
        .wait(Duration::from_secs(10))?;
    let out = out.trim();
    // ECONNRESET means the handshake completed and the router then reset the connection (these
    // listeners have no connector): connect() itself got past the hook.
    Ok(if out == "104" { "ok" } else { out }.to_owned())
}

const EPERM: &str = "1";

const REFUSED: &str = "111";

/// Namespaces `names` as child cgroups of `parent`, and the site options that register them
/// and turn isolation on.
fn namespaces<const N: usize>(
    parent: &Cgroup,
    names: [&str; N],
) -> anyhow::Result<([Cgroup; N], Vec<String>)> {
    let mut options = Vec::new();
    let mut cgroups = Vec::new();
    for name in names {
        let cgroup = parent.child(name)?;
        options.push("--namespace".to_owned());
        options.push(format!("{name}={}", cgroup.path().display()));
        cgroups.push(cgroup);
    }
    options.push("--isolate-namespaces".to_owned());
    let cgroups = cgroups
        .try_into()
        .map_err(|_| anyhow::anyhow!("one cgroup per name"))?;
    Ok((cgroups, options))
}

fn strs(options: &[String]) -> Vec<&str> {
    options.iter().map(String::as_str).collect()
}

/// Creates listener `name` on `host`:`port` in `namespace`, open also to `allow`.
fn listen(
    site: &Site,
    name: &str,
    (host, port): (&str, &str),
    namespace: &str,
    allow: &[&str],
) -> anyhow::Result<()> {
    let mut args = vec![
        "listener",
        "create",
        name,
        "--host",
        host,
        "--port",
        port,
        "--namespace",
        namespace,
    ];
    for other in allow {
        args.extend(["--allow-namespace", other]);
    }
    site.cli(&args)?;
    Ok(())
}

#[test]
fn listeners_are_reachable_only_from_their_own_and_allowed_namespaces() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new("iso")?;
    let parent = Cgroup::new("iso")?;
    let ([a, b, c], options) = namespaces(&parent, ["a", "b", "c"])?;
    let mut site = Site::start_with(
        &ns,
        Some(&parent),
        "west",
        Some("127.0.0.1:55690"),
        &strs(&options),
        &["--metrics-addr", "127.0.0.1:9464"],
    )?;
    listen(&site, "web", ("127.0.0.1", "8601"), "a", &[])?;
    listen(&site, "api", ("0.0.0.0", "8602"), "a", &["b"])?;
    listen(&site, "six", ("::", "8603"), "a", &[])?;

    // Own namespace in, others out, at every address the listener answers on.
    assert_eq!(connect(&ns, &a, "127.0.0.1:8601")?, "ok");
    assert_eq!(connect(&ns, &b, "127.0.0.1:8601")?, EPERM);
    assert_eq!(connect(&ns, &c, "127.0.0.1:8601")?, EPERM);
    assert_eq!(
        connect(&ns, &b, "127.0.0.1:8602")?,
        "ok",
        "b is allowed on api"
    );
    assert_eq!(connect(&ns, &c, "127.0.0.1:8602")?, EPERM);
    assert_eq!(
        connect(&ns, &c, "127.0.0.5:8602")?,
        EPERM,
        "loopback alias of a wildcard listener"
    );
    assert_eq!(connect(&ns, &a, "[::1]:8603")?, "ok");
    assert_eq!(connect(&ns, &b, "[::1]:8603")?, EPERM, "IPv6");
    assert_eq!(
        connect(&ns, &b, "127.0.0.1:8603")?,
        EPERM,
        "IPv4 to a dual-stack listener"
    );
    assert_eq!(
        connect(&ns, &b, "[::ffff:127.0.0.1]:8603")?,
        EPERM,
        "v4-mapped"
    );
    // Callers in no namespace (the router's own cgroup) are outside every namespace.
    assert_eq!(connect(&ns, &parent, "127.0.0.1:8601")?, EPERM);

    // The router's link-access port is closed to workload namespaces, open to the rest.
    assert_eq!(
        connect(&ns, &a, "127.0.0.1:55690")?,
        EPERM,
        "link access from a workload"
    );
    assert_eq!(
        connect(&ns, &parent, "127.0.0.1:55690")?,
        "ok",
        "link access from outside namespaces"
    );

    // A cgroup created under a namespace root belongs to it at once.
    let a_new = a.child("new")?;
    assert_eq!(connect(&ns, &a_new, "127.0.0.1:8601")?, "ok");
    let c_new = c.child("new")?;
    assert_eq!(connect(&ns, &c_new, "127.0.0.1:8601")?, EPERM);

    // Unrelated traffic is untouched.
    let other = Proc::spawn(
        &ns,
        Some(&a),
        &[
            "python3",
            "-m",
            "http.server",
            "8700",
            "--bind",
            "127.0.0.1",
        ],
    )?;
    ns.wait_listening(8700, Duration::from_secs(10))?;
    assert_eq!(connect(&ns, &c, "127.0.0.1:8700")?, "ok");

    // Changes apply at once: a deleted listener is just a closed port, a new one protects again.
    site.cli(&["listener", "delete", "web"])?;
    assert_eq!(connect(&ns, &b, "127.0.0.1:8601")?, REFUSED);
    listen(&site, "web", ("127.0.0.1", "8601"), "a", &["b"])?;
    assert_eq!(connect(&ns, &b, "127.0.0.1:8601")?, "ok");
    assert_eq!(connect(&ns, &c, "127.0.0.1:8601")?, EPERM);

    // Denials are counted and listed, with the namespace they came from (the list arrives
    // through the ring buffer: wait for it).
    let counted = |status: &serde_json::Value| {
        let isolation = &status["isolation"];
        isolation["denied"].as_u64() >= Some(9)
            && isolation["deniedByNamespace"]["c"].as_u64() >= Some(4)
            && isolation["recentDenials"]
                .as_array()
                .is_some_and(|d| !d.is_empty())
    };
    let waited = site.wait_for(&["status"], Duration::from_secs(5), |out| {
        serde_json::from_str(out).is_ok_and(|v| counted(&v))
    });
    let status = site.status()?;
    assert!(
        waited.is_ok() && counted(&status),
        "{}",
        status["isolation"]
    );
    let metrics = ns.run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:9464/metrics",
    ])?;
    let denied_c = metrics
        .lines()
        .find(|l| l.starts_with("skiff_isolation_denied_connects_total{namespace=\"c\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(denied_c >= Some(4), "metrics: {metrics}");

    // A restarted router protects its restored listeners again.
    site.stop()?;
    assert_eq!(
        connect(&ns, &c, "127.0.0.1:8601")?,
        REFUSED,
        "router gone: nothing listens"
    );
    site.run(&ns, Some(&parent))?;
    ns.wait_listening(8601, Duration::from_secs(10))?;
    assert_eq!(connect(&ns, &c, "127.0.0.1:8601")?, EPERM);
    assert_eq!(connect(&ns, &b, "127.0.0.1:8601")?, "ok");

    // Processes first, then the cgroups they ran in, children before parents.
    drop((site, other));
    drop((a_new, c_new));
    drop((a, b, c));
    Ok(())
}

#[test]
fn fifty_namespaces_each_see_only_what_they_may() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new("iso50")?;
    let parent = Cgroup::new("iso50")?;
    let children = (0..50)
        .map(|i| parent.child(&format!("n{i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // This site is declared in YAML (the CRD schema), namespaces and all.
    let mut yaml = String::from(
        "apiVersion: skiff.io/v1alpha1\nkind: Site\nmetadata: {name: west}\nspec:\n  isolateNamespaces: true\n  namespaces:\n",
    );
    for (i, cg) in children.iter().enumerate() {
        yaml.push_str(&format!("    n{i}: {}\n", cg.path().display()));
    }
    let file = kernel_tests::TempFile::new("site.yaml");
    std::fs::write(file.path(), yaml)?;
    let site = Site::start_from_yaml(&ns, Some(&parent), "west", file.path(), &[])?;
    listen(&site, "db", ("127.0.0.1", "8611"), "n7", &["n42"])?;
    for (i, cg) in children.iter().enumerate() {
        let expected = if i == 7 || i == 42 { "ok" } else { EPERM };
        assert_eq!(
            connect(&ns, cg, "127.0.0.1:8611")?,
            expected,
            "namespace n{i}"
        );
    }
    drop(site);
    drop(children);
    Ok(())
}

/// The connect hooks are attached before the router gives up privilege (`--user nobody`); the
/// unprivileged router still protects a listener it creates afterwards (a map update through
/// the descriptor it kept) and reads the refusals from the ring buffer. It holds no capability,
/// but CAP_BPF alone on kernels that check it on every bpf() call (before 5.19, with
/// kernel.unprivileged_bpf_disabled set, as Debian 11's 5.10 has it).
#[test]
fn isolation_holds_when_the_router_runs_as_nobody() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new("isou")?;
    let parent = Cgroup::new("isou")?;
    let ([a, b], options) = namespaces(&parent, ["a", "b"])?;
    let site = Site::start_as(&ns, &parent, "west", &strs(&options), &[], "nobody")?;
    let pid = site
        .router_pid()
        .ok_or_else(|| anyhow::anyhow!("no router"))?;
    assert_eq!(proc_status(pid, "Uid:")?, "65534\t65534\t65534\t65534");
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let kept = if router::privilege::bpf_refuses_the_unprivileged(
        &read("/proc/sys/kernel/osrelease"),
        &read("/proc/sys/kernel/unprivileged_bpf_disabled"),
    ) {
        "0000008000000000"
    } else {
        "0000000000000000"
    };
    for caps in ["CapPrm:", "CapEff:", "CapBnd:"] {
        assert_eq!(proc_status(pid, caps)?, kept, "router {caps}");
    }
    for caps in ["CapInh:", "CapAmb:"] {
        assert_eq!(proc_status(pid, caps)?, "0000000000000000", "router {caps}");
    }
    listen(&site, "web", ("127.0.0.1", "8611"), "a", &[])?;
    assert_eq!(connect(&ns, &a, "127.0.0.1:8611")?, "ok");
    assert_eq!(connect(&ns, &b, "127.0.0.1:8611")?, EPERM);
    let deadline = std::time::Instant::now() + kernel_tests::patience(Duration::from_secs(5));
    loop {
        let isolation = site.status()?["isolation"].clone();
        if isolation["deniedByNamespace"]["b"].as_u64() >= Some(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the refusal reached the unprivileged router: {isolation}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The review's bypass and its class: from a denied namespace, the unspecified address in
/// each form the kernel turns into loopback (`0.0.0.0`, `[::]`, `::ffff:0.0.0.0`), and an
/// address added to the namespace after the listener exists, all reach a wildcard listener
/// unless the hooks refuse them. A process in another network namespace connecting to its own
/// loopback at the same port reaches its own host, not the router, and is left alone.
#[test]
fn no_address_of_this_host_bypasses_isolation() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new("isoa")?;
    let other = Netns::new("isoo")?;
    let parent = Cgroup::new("isoa")?;
    let ([a, b], options) = namespaces(&parent, ["a", "b"])?;
    let site = Site::start_with(&ns, Some(&parent), "west", None, &strs(&options), &[])?;
    for (name, host, port) in [("four", "0.0.0.0", "8621"), ("dual", "::", "8622")] {
        listen(&site, name, (host, port), "a", &[])?;
    }

    for addr in [
        "0.0.0.0:8621",
        "[::ffff:0.0.0.0]:8621",
        "[::]:8622",
        "0.0.0.0:8622",
        "[::ffff:0.0.0.0]:8622",
    ] {
        assert_eq!(connect(&ns, &a, addr)?, "ok", "own namespace at {addr}");
        assert_eq!(
            connect(&ns, &b, addr)?,
            EPERM,
            "{addr} from a denied namespace"
        );
    }

    // An address that arrives after the listeners: protected as soon as the router hears of
    // it (rtnetlink); until then a connect may pass, so wait for the refusal, bounded.
    ns.run(&["ip", "addr", "add", "198.18.213.1/32", "dev", "lo"])?;
    ns.run(&[
        "ip",
        "addr",
        "add",
        "fd00:5c1f:213::1/128",
        "dev",
        "lo",
        "nodad",
    ])?;
    for addr in ["198.18.213.1:8621", "[fd00:5c1f:213::1]:8622"] {
        let deadline = std::time::Instant::now() + kernel_tests::patience(Duration::from_secs(5));
        loop {
            let got = connect(&ns, &b, addr)?;
            if got == EPERM {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{addr}, added after the listener, still reachable from b: {got}"
            );
        }
        assert_eq!(connect(&ns, &a, addr)?, "ok", "own namespace at {addr}");
    }

    // Another network namespace's loopback is its own: nothing listens there. A kernel that
    // cannot tell network namespaces apart (no SO_NETNS_COOKIE before Linux 5.14) makes the
    // router protect loopback in every namespace, as it says at start: refused there too.
    let elsewhere = if kernel_tests::kernel_has_netns_cookies() {
        REFUSED
    } else {
        EPERM
    };
    for addr in ["127.0.0.1:8621", "0.0.0.0:8621", "[::1]:8622"] {
        assert_eq!(
            connect(&other, &b, addr)?,
            elsewhere,
            "{addr} in another netns"
        );
    }
    Ok(())
}

/// Acceleration and isolation share one load of the eBPF object: the router holds each of
/// skiff's maps once. (Each part used to load the object itself, so every map existed twice.)
#[test]
fn acceleration_and_isolation_share_one_copy_of_each_map() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new("isom")?;
    let parent = Cgroup::new("isom")?;
    let ([a], options) = namespaces(&parent, ["a"])?;
    let started = Site::start_with(
        &ns,
        Some(&parent),
        "west",
        None,
        &strs(&options),
        &["--accel", "sockmap"],
    );
    if !kernel_tests::kernel_has_netns_cookies() || kernel_tests::locked_down_for_confidentiality()
    {
        // Acceleration cannot work on this kernel: asked for by name (not `auto`), the router
        // refuses to start, and its last line says why in one line.
        let refused = started.expect_err("--accel sockmap cannot start on this kernel");
        let last = format!("{refused:#}");
        let last = last.lines().last().unwrap_or_default();
        assert!(
            last.contains("socket acceleration failed to start: the kernel"),
            "{refused:#}"
        );
        return Ok(());
    }
    let site = started?;
    let pid = site
        .router_pid()
        .ok_or_else(|| anyhow::anyhow!("no router"))?;
    // The maps the router holds, by the ids its descriptors name.
    let mut ids = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("map_id:")) {
            ids.insert(id.trim().to_owned());
        }
    }
    let mut names = Vec::new();
    for id in &ids {
        let shown: serde_json::Value = serde_json::from_str(&kernel_tests::run(
            "bpftool",
            &["map", "show", "id", id, "-j"],
        )?)?;
        if let Some(name) = shown["name"].as_str().filter(|n| n.starts_with("SKIFF_")) {
            names.push(name.to_owned());
        }
    }
    names.sort();
    let mut once = names.clone();
    once.dedup();
    assert!(
        once.iter().any(|n| n == "SKIFF_SOCKS") && once.iter().any(|n| n == "SKIFF_PROTECTED"),
        "both parts' maps are held: {names:?}"
    );
    assert_eq!(names, once, "each map once");
    drop(site);
    drop(a);
    Ok(())
}
