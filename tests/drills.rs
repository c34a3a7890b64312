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
