//! The benchmark harness runs end to end and writes its results (no timing is asserted).

use std::process::Command;

#[test]
fn smoke_run_writes_results_for_every_requested_scenario() -> anyhow::Result<()> {
    if !kernel_tests::require_root() {
        return Ok(());
    }
    let out = kernel_tests::TempDir::new("bench-smoke")?;
    let status = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "--smoke",
            "--connect-latency",
            "direct",
            "skiff-hop",
            "--out",
        ])
        .arg(out.path())
        .status()?;
    assert!(status.success(), "bench exited with {status}");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json"))?)?;
    let rows = results["rows"].as_array().expect("rows");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["scenario"].as_str()).collect();
    assert_eq!(names, ["direct", "skiff-hop"]);
    for row in rows {
        assert!(
            row["throughput_gbps"]["median"].as_f64() > Some(0.0),
            "{row}"
        );
    }
    assert!(out.path().join("results.md").exists() && out.path().join("throughput.svg").exists());
    let connect = std::fs::read_to_string(out.path().join("connect.md"))?;
    assert!(connect.contains("added by the hooks"), "{connect}");
    Ok(())
}
