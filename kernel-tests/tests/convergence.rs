//! Routes converge when a router dies or a link is cut: ten sites, each its own router in its
//! own network namespace on one Ethernet segment, linked into two disjoint paths from c0 to c9.

use std::time::{Duration, Instant};

use kernel_tests::{Lan, Netns, Proc, proc_status, require_root, skiff::Site};

const SITES: u8 = 10;

/// Whether site `name` is reachable in `network status` JSON.
fn reachable(network: &str, name: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(network).is_ok_and(|v| {
        v.as_array().is_some_and(|rows| {
            rows.iter()
                .any(|r| r["site"] == name && r["reachable"] == true)
        })
    })
}

/// c0 - c1 - c2 - c3 - c4 - c9 and c0 - c5 - c6 - c7 - c8 - c9; a connector at c9, a
/// listener at c0. Kill c2's router: c0 must route around it within 2 s (the goal), and new
/// streams reach c9 by the other path. Then cut c6 off the segment: nothing tells anyone, so
/// it is noticed when its neighbours' heartbeats go unanswered (5 s), after which c0 knows c9
/// is unreachable and resets new clients at once instead of sending them into the dead path.
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

    // A cable is cut: no FIN, no RST; the heartbeat finds out.
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
        after_kill <= Duration::from_secs(2),
        "{after_kill:?} to route around a dead router"
    );
    assert!(
        after_cut <= router::link::DEAD_AFTER + Duration::from_secs(3),
        "{after_cut:?} to notice a cut link"
    );
    drop(server);
    Ok(())
}
