//! Sites in their own network namespaces, linked over veth by a token, with real servers and
//! real clients from Debian's packages on either side of the service network.

use std::time::Duration;

use kernel_tests::{
    Netns, Proc, TempDir, proc_status, redis_benchmark, redis_server, require_root, skiff::Site,
};

/// Two namespaces joined by a veth pair; `west` accepts links on its veth address.
struct Pair {
    west_ns: Netns,
    east_ns: Netns,
    west: Site,
    east: Site,
}

fn pair(subnet: u8) -> anyhow::Result<Pair> {
    pair_with(subnet, Site::start)
}

/// [`pair`], with each router started by `start` (as root, or as `nobody`).
fn pair_with(
    subnet: u8,
    start: fn(&Netns, &str, Option<&str>) -> anyhow::Result<Site>,
) -> anyhow::Result<Pair> {
    let west_ns = Netns::new("west")?;
    let east_ns = Netns::new("east")?;
    let (west_ip, _east_ip) = west_ns.link(&east_ns, subnet)?;
    let west = start(&west_ns, "west", Some(&format!("{west_ip}:55671")))?;
    let east = start(&east_ns, "east", None)?;
    west.link_from(&east)?;
    Ok(Pair {
        west_ns,
        east_ns,
        west,
        east,
    })
}

/// python's http.server on 127.0.0.1:8080 in `ns`, serving `body` as index.html (kept in
/// a temporary directory removed with the guard).
fn web_server(ns: &Netns, tag: &str, body: &str) -> anyhow::Result<(Proc, TempDir)> {
    let page = TempDir::new(tag)?;
    std::fs::write(page.path().join("index.html"), body)?;
    let dir = page.path().to_str().unwrap_or_default();
    let server = Proc::spawn(
        ns,
        None,
        &[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "127.0.0.1",
            "--directory",
            dir,
        ],
    )?;
    Ok((server, page))
}

/// Binds `key` to `backend_port` at west and listens for it on east's loopback at `port`.
fn expose(p: &Pair, key: &str, backend_port: u16, port: u16) -> anyhow::Result<()> {
    p.west_ns
        .wait_listening(backend_port, Duration::from_secs(10))?;
    p.west.connector(key, backend_port)?;
    p.east.listener(key, port)?;
    p.east
        .wait_for(&["listener", "status"], Duration::from_secs(10), |out| {
            out.contains("\"reachable\": true")
        })?;
    Ok(())
}

#[test]
fn curl_fetches_a_page_across_sites() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let p = pair(1)?;
    let _server = web_server(&p.west_ns, "www", "hello from west\n")?;
    expose(&p, "web", 8080, 9080)?;
    let body = p.east_ns.run(&[
        "curl",
        "-sS",
        "--fail",
        "--retry",
        "20",
        "--retry-connrefused",
        "--retry-delay",
        "0",
        "--max-time",
        "10",
        "http://127.0.0.1:9080/index.html",
    ])?;
    assert_eq!(body, "hello from west\n");
    let network = p.east.cli(&["network", "status"])?;
    assert!(
        network.contains("west") && network.contains("web"),
        "{network}"
    );
    Ok(())
}

#[test]
fn redis_benchmark_runs_through_the_service_network() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let p = pair(2)?;
    let _redis = redis_server(&p.west_ns, None, 6379)?;
    expose(&p, "cache", 6379, 7379)?;
    let set = p
        .east_ns
        .run(&["redis-cli", "-p", "7379", "set", "skiff", "across"])?;
    assert_eq!(set.trim(), "OK");
    let get = p
        .east_ns
        .run(&["redis-cli", "-p", "7379", "get", "skiff"])?;
    assert_eq!(get.trim(), "across");
    redis_benchmark(&p.east_ns, None, 7379, &["-n", "20000"])?;
    Ok(())
}

#[test]
fn iperf3_streams_across_sites() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let p = pair(3)?;
    let _server = Proc::spawn(
        &p.west_ns,
        None,
        &["iperf3", "-s", "-p", "5201", "-B", "127.0.0.1"],
    )?;
    expose(&p, "perf", 5201, 6201)?;
    let mut last = String::new();
    for _ in 0..5 {
        match p.east_ns.run(&[
            "iperf3",
            "-c",
            "127.0.0.1",
            "-p",
            "6201",
            "-t",
            "2",
            "-P",
            "2",
            "-J",
        ]) {
            Ok(report) => {
                let report: serde_json::Value = serde_json::from_str(&report)?;
                let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
                let bps = report["end"]["sum_received"]["bits_per_second"]
                    .as_f64()
                    .unwrap_or(0.0);
                eprintln!("iperf3 through two sites: {:.2} Gbit/s", bps / 1e9);
                assert!(received > 0, "iperf3 moved no data");
                let links = p.east.cli(&["link", "status", "--output", "json"])?;
                let links: serde_json::Value = serde_json::from_str(&links)?;
                assert!(links[0]["bytesOut"].as_u64() > Some(0));
                return Ok(());
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    anyhow::bail!("iperf3 never ran: {last}")
}

#[test]
fn without_acceleration_routers_run_as_nobody_with_no_capabilities() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let p = pair_with(4, Site::start_unprivileged)?;
    for site in [&p.west, &p.east] {
        let pid = site
            .router_pid()
            .ok_or_else(|| anyhow::anyhow!("no router"))?;
        assert_eq!(proc_status(pid, "Uid:")?, "65534\t65534\t65534\t65534");
        for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(
                proc_status(pid, caps)?,
                "0000000000000000",
                "{caps} of the {} router",
                site.name
            );
        }
    }
    // The unprivileged routers linked above by token (TLS, CSR) and serve a real service.
    let _server = web_server(&p.west_ns, "nobody-web", "served without privileges\n")?;
    expose(&p, "web", 8080, 8081)?;
    let page = Proc::spawn(
        &p.east_ns,
        None,
        &[
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "http://127.0.0.1:8081/",
        ],
    )?
    .wait(Duration::from_secs(20))?;
    assert_eq!(page, "served without privileges\n");
    Ok(())
}
