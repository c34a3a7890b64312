//! Every drill, in its short form, on SQLite and on PostgreSQL where it applies: the command
//! exits 0 only when every promise held, and leaves its report folder.

mod common;

use common::*;

fn drill(name: &str, postgres: bool) {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_castellum"));
    cmd.args(["drill", name, "--short", "--keys-dev"]).arg(dev_keys()).arg("--out").arg(out.path());
    if postgres {
        cmd.args(["--postgres", &postgres_admin_url()]);
    }
    let output = cmd.output().expect("castellum drill runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{name}: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("every promise held"), "{stdout}");
    let report = std::fs::read_dir(out.path()).unwrap().next().expect("a report folder").unwrap().path();
    for file in ["summary.md", "series.csv", "chart.svg", "engine/engine.log"] {
        assert!(report.join(file).exists(), "{name}: {file} missing");
    }
    let svg = std::fs::read_to_string(report.join("chart.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("fault"), "the chart marks the fault");
}

#[test]
fn issuance_queues_2020_on_sqlite() {
    drill("issuance-queues-2020", false);
}

#[test]
fn issuance_queues_2020_on_postgres() {
    drill("issuance-queues-2020", true);
}

#[test]
fn connection_surge_2024_on_postgres() {
    drill("connection-surge-2024", true);
}

#[test]
fn pool_leak_2023_on_sqlite() {
    drill("pool-leak-2023", false);
}

#[test]
fn pool_leak_2023_on_postgres() {
    drill("pool-leak-2023", true);
}

#[test]
fn pool_too_small_2024_on_sqlite() {
    drill("pool-too-small-2024", false);
}

#[test]
fn pool_too_small_2024_on_postgres() {
    drill("pool-too-small-2024", true);
}

#[test]
fn connection_surge_needs_postgres_and_says_so() {
    let out = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_castellum"))
        .args(["drill", "connection-surge-2024", "--short", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("needs PostgreSQL"));
}

/// Each drill run against an engine built to break one of its promises: the drill must say so
/// (exit code 1, that promise marked FAIL), or its verdicts prove nothing.
fn sabotaged_drill(name: &str, postgres: bool, defect: &str, promise: &str) {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_castellum"));
    cmd.args(["drill", name, "--short", "--sabotage", defect, "--keys-dev"])
        .arg(dev_keys())
        .arg("--out")
        .arg(out.path());
    if postgres {
        cmd.args(["--postgres", &postgres_admin_url()]);
    }
    let output = cmd.output().expect("castellum drill runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{name} with {defect}: expected a failed promise\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("A PROMISE FAILED"), "{stdout}");
    let failed: Vec<&str> = stdout.lines().filter(|l| l.trim_start().starts_with("[FAIL]")).collect();
    assert!(
        failed.iter().any(|l| l.contains(promise)),
        "{name} with {defect}: expected {promise:?} to fail; failed: {failed:#?}\n{stdout}"
    );
}

#[test]
fn issuance_queues_2020_catches_a_global_back_off() {
    sabotaged_drill("issuance-queues-2020", false, "global-back-off", "only the failing CAs' breakers open");
}

#[test]
fn issuance_queues_2020_catches_disabled_cas_queued() {
    sabotaged_drill(
        "issuance-queues-2020",
        false,
        "ignore-ca-state",
        "requests for disabled CAs are refused at intake",
    );
}

#[test]
fn connection_surge_2024_catches_connections_outside_the_pools() {
    sabotaged_drill(
        "connection-surge-2024",
        true,
        "connection-per-request",
        "database connections never exceed the configured budget",
    );
}

#[test]
fn pool_leak_2023_catches_a_silent_leak() {
    sabotaged_drill("pool-leak-2023", false, "silent-leaks", "the leak is reported");
}

#[test]
fn pool_too_small_2024_catches_a_quiet_readiness() {
    sabotaged_drill("pool-too-small-2024", false, "quiet-readiness", "/readyz make the cause obvious");
}

#[test]
fn an_unknown_sabotage_is_refused() {
    let out = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_castellum"))
        .args(["drill", "pool-leak-2023", "--short", "--sabotage", "no-such-defect", "--keys-dev"])
        .arg(dev_keys())
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown --sabotage \"no-such-defect\""));
}
