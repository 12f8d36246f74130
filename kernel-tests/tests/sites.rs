//! Sites in their own network namespaces, linked over veth by a token, with real servers and
//! real clients from Debian's packages on either side of the service network.

use std::time::Duration;

use kernel_tests::{
    Netns, PROMETHEUS, Proc, TempDir, proc_status, redis_benchmark, redis_server, require_root,
    skiff::Site,
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

/// `http://127.0.0.1:PORT/index.html` from `ns` with curl, retried while the path comes up.
fn fetch(ns: &Netns, port: u16) -> anyhow::Result<String> {
    ns.run(&[
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
        &format!("http://127.0.0.1:{port}/index.html"),
    ])
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
    let body = fetch(&p.east_ns, 9080)?;
    assert_eq!(body, "hello from west\n");
    let network = p.east.cli(&["network", "status"])?;
    assert!(
        network.contains("west") && network.contains("web"),
        "{network}"
    );
    // The request left a flow record at east's listener, going to west.
    let flows = p.east.cli(&["flows"])?;
    assert!(
        flows.contains("listener") && flows.contains("west") && flows.contains("ok"),
        "{flows}"
    );
    // The same network drawn by Graphviz: both sites, the link, the key and its listener.
    let svg = p.east.cli(&["network", "status", "--output", "svg"])?;
    assert!(svg.contains("<svg"), "{svg}");
    for text in ["east", "west", "web", "cost 1", "listener web"] {
        assert!(svg.contains(text), "{text} not drawn: {svg}");
    }
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

/// A site whose router serves metrics on 127.0.0.1:9464 of its namespace.
fn start_with_metrics(ns: &Netns, name: &str, link_access: Option<&str>) -> anyhow::Result<Site> {
    Site::start_with(
        ns,
        None,
        name,
        link_access,
        &[],
        &["--metrics-addr", "127.0.0.1:9464"],
    )
}

/// Debian's Prometheus scrapes the router of a two-site network, and PromQL through its HTTP
/// API answers with the labelled series after traffic crossed the link: the metrics are what
/// a real Prometheus can parse and query, not a string match on `/metrics`.
#[test]
fn prometheus_scrapes_a_router_and_answers_a_query() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let p = pair_with(5, start_with_metrics)?;
    let _server = web_server(&p.west_ns, "prom-web", "counted\n")?;
    expose(&p, "web", 8080, 9082)?;
    for _ in 0..3 {
        let body = fetch(&p.east_ns, 9082)?;
        assert_eq!(body, "counted\n");
    }

    let dir = TempDir::new("prometheus")?;
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: skiff\n    static_configs:\n      - targets: ['127.0.0.1:9464']\n",
    )?;
    let (config_arg, storage_arg) = (
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", dir.path().join("data").display()),
    );
    let _prometheus = Proc::spawn_logged(
        &p.west_ns,
        None,
        &[
            PROMETHEUS,
            &config_arg,
            &storage_arg,
            "--web.listen-address=127.0.0.1:9190",
        ],
        &dir.path().join("prometheus.log"),
    )?;
    let query = |promql: &str| -> anyhow::Result<serde_json::Value> {
        let answer = p.west_ns.run(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--get",
            "--data-urlencode",
            &format!("query={promql}"),
            "http://127.0.0.1:9190/api/v1/query",
        ])?;
        Ok(serde_json::from_str(&answer)?)
    };
    let value = |answer: &serde_json::Value| {
        answer["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
    };
    // Prometheus starts, scrapes once a second: ask until the answer has the three requests.
    let served = r#"sum by (routing_key) (skiff_connector_connections_total{connector="web"})"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let answer = query(served);
        if let Ok(a) = &answer
            && value(a) >= Some(3.0)
        {
            break answer?;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "Prometheus gave no count of 3 for {served} within 60 s: {answer:?}; log: {}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        answer["data"]["result"][0]["metric"]["routing_key"], "web",
        "{answer}"
    );
    let link = query(r#"skiff_link_connections{peer="east", direction="incoming"}"#)?;
    assert_eq!(value(&link), Some(1.0), "{link}");
    let bytes = query(r#"skiff_connector_received_bytes_total{connector="web"}"#)?;
    assert!(value(&bytes) > Some(0.0), "{bytes}");

    // The Grafana dashboard (deploy/grafana) asks only for series docs/metrics.md lists, in
    // PromQL this Prometheus accepts.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let documented = std::fs::read_to_string(root.join("docs/metrics.md"))?;
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("deploy/grafana/skiff.json"),
    )?)?;
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(exprs.len() >= 10, "{dashboard}");
    for expr in exprs {
        for series in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("skiff_"))
        {
            assert!(
                documented.contains(&format!("`{series}`")),
                "{series} (in {expr}) is not in docs/metrics.md"
            );
        }
        let promql = expr
            .replace("$instance", ".*")
            .replace("$__rate_interval", "1m");
        let answer = query(&promql)?;
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
    }
    Ok(())
}
