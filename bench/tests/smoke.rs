//! The benchmark harness runs end to end, through every scenario with every client, and
//! writes its results (no timing is asserted).

use std::process::Command;

#[test]
fn smoke_run_writes_results_for_every_requested_scenario() -> anyhow::Result<()> {
    if !kernel_tests::require_root() {
        return Ok(());
    }
    let out = kernel_tests::TempDir::new("bench-smoke")?;
    let status = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--smoke", "--connect-latency", "--out"])
        .arg(out.path())
        .status()?;
    assert!(status.success(), "bench exited with {status}");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json"))?)?;
    let rows = results["rows"].as_array().expect("rows");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["scenario"].as_str()).collect();
    assert_eq!(
        names,
        [
            "direct",
            "socat",
            "haproxy",
            "nginx",
            "skiff-hop",
            "skiff-hop-uring",
            "skiff-hop-accel",
            "direct-sockmap",
            "haproxy-tls",
            "stunnel",
            "skiff-chain",
            "skiff-chain-uring",
            "skiff-mtls",
            "skiff-mtls-uring",
            "skiff-mtls-accel",
        ]
    );
    for row in rows {
        for figure in [
            "throughput_gbps",
            "parallel_gbps",
            "rtt_p50_us",
            "rtt_p99_us",
            "conns_per_second",
        ] {
            assert!(
                row[figure]["median"].as_f64() > Some(0.0),
                "{figure}: {row}"
            );
        }
        let accelerated = row["scenario"]
            .as_str()
            .is_some_and(|name| name.ends_with("-accel"));
        assert_eq!(
            row["shortcut_share"]["median"].is_number(),
            accelerated,
            "the shortcut share is read exactly where skiff accelerates: {row}"
        );
        let relayed =
            !["direct", "direct-sockmap"].contains(&row["scenario"].as_str().unwrap_or(""));
        assert_eq!(
            row["kib_per_1000_idle_streams"].is_number(),
            relayed,
            "memory is read exactly where something relays: {row}"
        );
    }
    for row in rows.iter().filter_map(|r| r["samples"].as_array()) {
        let runs: Vec<_> = row.iter().map(|s| s["run"].as_u64()).collect();
        assert_eq!(runs, [Some(1)], "each sample says which run it is");
    }
    let md = std::fs::read_to_string(out.path().join("results.md"))?;
    assert!(md.contains("Run for run"), "{md}");
    assert!(out.path().join("chart.svg").exists());
    let connect = std::fs::read_to_string(out.path().join("connect.md"))?;
    assert!(connect.contains("added by the hooks"), "{connect}");
    Ok(())
}
