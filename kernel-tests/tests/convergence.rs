//! Routes converge when a router dies or a link is cut: ten sites, each its own router in its
//! own network namespace on one Ethernet segment, linked into two disjoint paths from c0 to c9.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use kernel_tests::{Lan, Netns, Proc, proc_status, require_root, skiff::Site};
use router::admin::{self, Request};

const SITES: u8 = 10;

/// Whether site `name` is reachable in `network status` JSON.
fn reachable(network: &str, name: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(network).is_ok_and(|v| reachable_in(&v, name))
}

/// c0 - c1 - c2 - c3 - c4 - c9 and c0 - c5 - c6 - c7 - c8 - c9; a connector at c9, a
/// listener at c0. Kill c2's router: c0 must route around it within 2 s (the goal), and new
/// streams reach c9 by the other path. Then cut c6 off the segment: nothing tells anyone, so
/// it is noticed when the kernel gives up on unacknowledged bytes (`TCP_USER_TIMEOUT`, with a
/// Ping in flight at least every 250 ms), within 2 s; then c0 knows c9 is unreachable and
/// resets new clients at once instead of sending them into the dead path.
#[test]
fn routes_converge_when_a_router_dies_or_a_link_is_cut() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lan = Lan::new("lan", 7)?;
    let mut nets = Vec::new();
    let mut sites = Vec::new();
    for i in 0..SITES {
        let ns = Netns::new(&format!("c{i}"))?;
        let ip = lan.join(&ns, i + 1)?;
        let site = Site::start(&ns, &format!("c{i}"), Some(&format!("{ip}:55671")))?;
        nets.push(ns);
        sites.push(site);
    }
    for (a, b) in [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 4),
        (4, 9),
        (0, 5),
        (5, 6),
        (6, 7),
        (7, 8),
        (8, 9),
    ] {
        sites[b].link_from(&sites[a])?;
    }
    let server = Proc::spawn(
        &nets[9],
        None,
        &[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "127.0.0.1",
        ],
    )?;
    nets[9].wait_listening(8080, Duration::from_secs(10))?;
    sites[9].connector("web", 8080)?;
    sites[0].listener("web", 8081)?;
    sites[0].wait_for(&["listener", "status"], Duration::from_secs(20), |out| {
        out.contains("\"reachable\": true")
    })?;
    let curl = |ns: &Netns| {
        ns.run(&[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "10",
            "http://127.0.0.1:8081/",
        ])
    };
    curl(&nets[0])?;

    // A router dies: its neighbours' links end at once (the kernel closes its sockets).
    let killed = Instant::now();
    sites[2].kill();
    sites[0].wait_for(&["network", "status"], Duration::from_secs(10), |out| {
        !reachable(out, "c2") && reachable(out, "c9")
    })?;
    let after_kill = killed.elapsed();
    curl(&nets[0])?;

    // A cable is cut: no FIN, no RST; the unacknowledged Pings find out.
    let cut = Instant::now();
    lan.cut(7)?;
    sites[0].wait_for(&["network", "status"], Duration::from_secs(20), |out| {
        !reachable(out, "c9")
    })?;
    let after_cut = cut.elapsed();
    let refused = Instant::now();
    assert!(
        curl(&nets[0]).is_err(),
        "no path to c9, yet the client was served"
    );
    let refused_in = refused.elapsed();

    let rss: Vec<String> = sites
        .iter()
        .filter_map(|s| s.router_pid())
        .filter_map(|pid| proc_status(pid, "VmRSS:").ok())
        .collect();
    eprintln!(
        "converged {after_kill:?} after a router died, {after_cut:?} after a cut; a client with no path was turned away in {refused_in:?}; router RSS: {rss:?}"
    );
    assert!(
        after_kill <= kernel_tests::patience(Duration::from_secs(2)),
        "{after_kill:?} to route around a dead router"
    );
    assert!(
        after_cut <= kernel_tests::patience(Duration::from_secs(2)),
        "{after_cut:?} to notice a cut link"
    );
    drop(server);
    Ok(())
}

/// Sites in the large run unless `SKIFF_SITES` says otherwise.
const MESH_SITES: u8 = 30;

/// The large run, `cargo xtask scale`: `SKIFF_SITES` (default 30) sites on one segment in a
/// ring with chords (every even site below n/2 also linked to the one opposite), a listener at
/// m0 and a connector a third of the way round. A router on one shortest path dies, then the
/// first link of the other is silently cut (its two ends discard what they send each other). For each
/// fault: how long until every live router's view shows it, how many of the clients started
/// every 100 ms meanwhile failed, and each router's RSS. Figures in docs/reliability.md.
#[test]
#[ignore = "dozens of routers for minutes: run with `cargo xtask scale`"]
fn a_mesh_converges_around_a_dead_router_and_a_cut_link() -> anyhow::Result<()> {
    anyhow::ensure!(require_root(), "the mesh needs root (network namespaces)");
    let n: u8 = std::env::var("SKIFF_SITES")
        .ok()
        .map(|v| v.parse().context("SKIFF_SITES"))
        .transpose()?
        .unwrap_or(MESH_SITES);
    anyhow::ensure!((6..=250).contains(&n), "SKIFF_SITES must be 6 to 250");
    let name = |i: u8| format!("m{i}");
    let lan = Lan::new("mesh", 8)?;
    let (mut nets, mut sites, mut ips) = (Vec::new(), Vec::new(), Vec::new());
    let started = Instant::now();
    for i in 0..n {
        let ns = Netns::new(&name(i))?;
        let ip = lan.join(&ns, i + 1)?;
        sites.push(Site::start(&ns, &name(i), Some(&format!("{ip}:55671")))?);
        nets.push(ns);
        ips.push(ip);
    }
    let mut edges: Vec<(u8, u8)> = (0..n).map(|i| (i, (i + 1) % n)).collect();
    edges.extend((0..n / 2).step_by(2).map(|i| (i, i + n / 2)));
    for &(a, b) in &edges {
        sites[usize::from(b)].link_from(&sites[usize::from(a)])?;
    }
    let service = n / 3;
    let _server = Proc::spawn(
        &nets[usize::from(service)],
        None,
        &[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "127.0.0.1",
        ],
    )?;
    nets[usize::from(service)].wait_listening(8080, Duration::from_secs(10))?;
    sites[usize::from(service)].connector("web", 8080)?;
    sites[0].listener("web", 8081)?;
    sites[0].wait_for(&["listener", "status"], Duration::from_secs(60), |out| {
        out.contains("\"reachable\": true")
    })?;
    let sockets: Vec<PathBuf> = sites
        .iter()
        .map(|s| s.state_dir().join("admin.sock"))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let everyone_sees = |what: &str, live: &[usize], seen: &dyn Fn(&serde_json::Value) -> bool| {
        runtime.block_on(converged(what, &sockets, live, seen))
    };
    let all: Vec<usize> = (0..usize::from(n)).collect();
    let reachable_all = |live: &[usize]| {
        let names: Vec<String> = live.iter().map(|&i| name(i as u8)).collect();
        move |view: &serde_json::Value| names.iter().all(|s| reachable_in(view, s))
    };
    everyone_sees("the whole mesh", &all, &reachable_all(&all))?;
    eprintln!(
        "{n} sites, {} links, up and converged in {:?}",
        edges.len(),
        started.elapsed()
    );

    // Clients every 100 ms from m0 through both faults.
    let client_log = kernel_tests::TempFile::new("mesh-clients");
    let clients = Proc::spawn_logged(
        &nets[0],
        None,
        &[
            "sh",
            "-c",
            "while :; do curl -s -o /dev/null -w '%{http_code}\\n' --max-time 5 \
             http://127.0.0.1:8081/; sleep 0.1; done",
        ],
        client_log.path(),
    )?;

    // A router on one of m0's shortest paths to the service dies.
    let dead = usize::from(n / 2);
    let live: Vec<usize> = all.iter().copied().filter(|&i| i != dead).collect();
    let gone = name(dead as u8);
    sites[dead].kill();
    let kill = everyone_sees("a dead router", &live, &|view| !reachable_in(view, &gone))?;

    // The other's first link is cut: m0 and m(n-1) discard what they send each other.
    let (a, b) = (0usize, usize::from(n - 1));
    nets[a].blackhole(&ips[b])?;
    nets[b].blackhole(&ips[a])?;
    let (na, nb) = (name(a as u8), name(b as u8));
    let cut = everyone_sees("a cut link", &live, &|view| {
        !has_edge(view, &na, &nb) && !has_edge(view, &nb, &na)
    })?;
    everyone_sees("the rest of the mesh", &live, &reachable_all(&live))?;
    // Five more answers after convergence, so the log shows the mesh serving again.
    let answered =
        || std::fs::read_to_string(client_log.path()).map_or(0, |log| log.lines().count());
    let settled = answered();
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered() < settled + 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(clients);
    let outcomes = std::fs::read_to_string(client_log.path())?;
    let failed = outcomes.lines().filter(|l| l.trim() != "200").count();

    let mut rss: Vec<u64> = sites
        .iter()
        .filter_map(Site::router_pid)
        .filter_map(|pid| proc_status(pid, "VmRSS:").ok())
        .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .collect();
    rss.sort_unstable();
    eprintln!("router died: {kill}");
    eprintln!("link cut: {cut}");
    eprintln!(
        "clients every 100 ms through both faults: {} of {} failed",
        failed,
        outcomes.lines().count()
    );
    eprintln!(
        "router RSS: min {} KiB, median {} KiB, max {} KiB",
        rss.first().unwrap_or(&0),
        rss.get(rss.len() / 2).unwrap_or(&0),
        rss.last().unwrap_or(&0)
    );
    Ok(())
}

/// Whether `name` is reachable in a `network status` view.
fn reachable_in(view: &serde_json::Value, name: &str) -> bool {
    view.as_array().is_some_and(|rows| {
        rows.iter()
            .any(|r| r["site"] == name && r["reachable"] == true)
    })
}

/// Whether `from`'s advertisement, as `view` holds it, lists a link to `to`.
fn has_edge(view: &serde_json::Value, from: &str, to: &str) -> bool {
    view.as_array().is_some_and(|rows| {
        rows.iter().any(|r| {
            r["site"] == from
                && r["links"]
                    .as_array()
                    .is_some_and(|ls| ls.iter().any(|l| l["peer"] == to))
        })
    })
}

/// Polls the routers in `live` (admin sockets in `sockets`) until each one's network view
/// satisfies `seen`; returns when the first and the last got there, from the call.
async fn converged(
    what: &str,
    sockets: &[PathBuf],
    live: &[usize],
    seen: &dyn Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<String> {
    let start = Instant::now();
    let mut at: Vec<Option<Duration>> = vec![None; sockets.len()];
    while live.iter().any(|&i| at[i].is_none()) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: routers {:?} never saw it",
            live.iter()
                .filter(|&&i| at[i].is_none())
                .collect::<Vec<_>>()
        );
        for &i in live {
            if at[i].is_none()
                && let Ok(view) = admin::call(&sockets[i], &Request::NetworkStatus).await
                && seen(&view)
            {
                at[i] = Some(start.elapsed());
            }
        }
    }
    let mut times: Vec<Duration> = live.iter().filter_map(|&i| at[i]).collect();
    times.sort_unstable();
    Ok(format!(
        "every live router saw it within {:?} (first {:?}, median {:?})",
        times.last().copied().unwrap_or_default(),
        times.first().copied().unwrap_or_default(),
        times[times.len() / 2]
    ))
}
