//! Every drill, in its short form, on SQLite and on PostgreSQL where it applies: the command
//! exits 0 only when every promise held, and leaves its report folder.

mod common;

use common::*;

fn drill(name: &str, postgres: bool) {
    drill_with(name, postgres, &[]);
}

/// [`drill`] with more arguments.
fn drill_with(name: &str, postgres: bool, args: &[&str]) {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = drill_command(name, out.path());
    cmd.args(args);
    if postgres {
        cmd.args(["--postgres", &postgres_admin_url()]);
    }
    let output = cmd.output().expect("castellum drill runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{name}: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("every promise held"), "{stdout}");
    let report = std::fs::read_dir(out.path()).unwrap().next().expect("a report folder").unwrap().path();
    let logs: &[&str] = match name.starts_with("lb-") {
        true => &["castellum-1/engine.log", "castellum-2/engine.log", "castellum-3/engine.log", "haproxy.log"],
        false => &["engine/engine.log"],
    };
    for file in ["summary.md", "series.csv", "chart.svg"].iter().chain(logs) {
        assert!(report.join(file).exists(), "{name}: {file} missing");
    }
    let svg = std::fs::read_to_string(report.join("chart.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("fault"), "the chart marks the fault");
    if name == "issuance-queues-2020" {
        // Both storms ran as processes of their own and reported; the chart draws them.
        for storm in ["storm.json", "control-storm.json"] {
            let report: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(report.join(storm)).unwrap()).unwrap();
            assert!(report["sent"].as_u64().unwrap() > 1_000, "{storm}: {report}");
        }
        assert!(svg.contains("retry storm"), "the chart draws the storm");
    }
}

/// `castellum drill NAME --short` with the dev keys and the shipped HAProxy configuration.
fn drill_command(name: &str, out: &std::path::Path) -> std::process::Command {
    drill_command_with(name, out, &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy.cfg"))
}

fn drill_command_with(name: &str, out: &std::path::Path, haproxy: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_castellum"));
    cmd.args(["drill", name, "--short", "--keys-dev"]).arg(dev_keys()).arg("--out").arg(out);
    cmd.arg("--haproxy-config").arg(haproxy);
    cmd
}

/// Issue 15: three instances behind HAProxy, each restarted in turn under mixed load.
#[test]
fn lb_rolling_restart_on_postgres() {
    drill("lb-rolling-restart", true);
}

/// Issue 15: three instances behind HAProxy, one killed with SIGKILL under load and started again.
#[test]
fn lb_kill_9_on_postgres() {
    drill("lb-kill-9", true);
}

#[test]
fn lb_rolling_restart_catches_a_stop_without_drain() {
    sabotaged_drill(
        "lb-rolling-restart",
        true,
        &["stop-without-drain"],
        &["zero failed requests", "on SIGTERM HAProxy takes"],
    );
}

#[test]
fn lb_kill_9_catches_keyed_failures_that_stick() {
    sabotaged_drill(
        "lb-kill-9",
        true,
        &["sticky-keyed-failures"],
        &["a client retrying with its Idempotency-Key gets exactly one certificate"],
    );
}

/// The deployment broken as well as the engine: HAProxy given `fall 10` (a dead instance is
/// taken out after ~2.7 s, not within the shipped file's fall × inter) and no retry of a refused
/// connection on another instance (leastconn then sends thousands of requests to the dead one:
/// 503s), and instances that open a connection of their own per synchronous request, outside
/// their pools.
#[test]
fn lb_kill_9_catches_a_slow_take_out_and_connections_outside_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let text = std::fs::read_to_string(deploy.join("haproxy.cfg")).unwrap();
    assert!(text.contains(" fall 2 "), "the shipped file's fall");
    std::fs::create_dir(dir.path().join("errors")).unwrap();
    for page in std::fs::read_dir(deploy.join("errors")).unwrap() {
        let page = page.unwrap();
        std::fs::copy(page.path(), dir.path().join("errors").join(page.file_name())).unwrap();
    }
    let slow = dir.path().join("haproxy.cfg");
    let broken = text.replace(" fall 2 ", " fall 10 ").replace("    retries 2\n", "    retries 0\n");
    let broken: String =
        broken.lines().filter(|l| !l.contains("option redispatch")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&slow, broken).unwrap();
    sabotaged_drill_with(
        "lb-kill-9",
        true,
        &["connection-per-request"],
        Some(&slow),
        &[],
        &[
            "HAProxy stops sending to the killed instance",
            "only the requests in flight on the killed instance fail",
            "the instances stay within the connection budget",
        ],
    );
}

#[test]
fn issuance_queues_2020_on_sqlite() {
    drill("issuance-queues-2020", false);
}

/// Issue 17: every CA key on a SoftHSM token; the fault is the failing CAs' token losing its
/// storage.
#[test]
fn issuance_queues_2020_with_keys_on_token() {
    drill_with("issuance-queues-2020", false, &["--keys-on-token"]);
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

/// A drill run against an engine built with deliberate defects: its stdout, once it has exited 1
/// (a promise failed) with every promise in `failing` marked FAIL. Without this, a drill's
/// verdicts would prove nothing.
fn sabotaged_drill(name: &str, postgres: bool, defects: &[&str], failing: &[&str]) -> String {
    sabotaged_drill_with(name, postgres, defects, None, &[], failing)
}

/// [`sabotaged_drill`] with another HAProxy configuration (a broken deployment file).
fn sabotaged_drill_with(
    name: &str,
    postgres: bool,
    defects: &[&str],
    haproxy: Option<&std::path::Path>,
    args: &[&str],
    failing: &[&str],
) -> String {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = match haproxy {
        Some(file) => drill_command_with(name, out.path(), file),
        None => drill_command(name, out.path()),
    };
    cmd.args(args);
    for defect in defects {
        cmd.args(["--sabotage", defect]);
    }
    if postgres {
        cmd.args(["--postgres", &postgres_admin_url()]);
    }
    let output = cmd.output().expect("castellum drill runs");
    let stdout = String::from_utf8_lossy(&output.stdout).replace('\r', "\n");
    assert_eq!(
        output.status.code(),
        Some(1),
        "{name} with {defects:?}: expected a failed promise\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("A PROMISE FAILED"), "{stdout}");
    for promise in failing {
        assert_eq!(verdict(&stdout, promise), "FAIL", "{name} with {defects:?}: {promise:?}\n{stdout}");
    }
    stdout
}

/// The verdict (`held` or `FAIL`) the drill printed for the promise starting with `promise`.
fn verdict<'a>(stdout: &'a str, promise: &str) -> &'a str {
    let line = stdout
        .lines()
        .map(str::trim_start)
        .find(|l| l.strip_prefix('[').and_then(|l| l.split_once("] ")).is_some_and(|(_, p)| p.starts_with(promise)))
        .unwrap_or_else(|| panic!("no verdict for {promise:?} in\n{stdout}"));
    &line[1..line.find(']').unwrap()]
}

#[test]
fn issuance_queues_2020_catches_a_global_back_off() {
    sabotaged_drill(
        "issuance-queues-2020",
        false,
        &["global-back-off"],
        &["healthy CA keeps 100% success", "only the failing CAs' breakers open", "no global back-off"],
    );
}

/// With the fault coming from a token, the drill still catches the incident's global back-off.
#[test]
fn issuance_queues_2020_with_keys_on_token_catches_a_global_back_off() {
    sabotaged_drill_with(
        "issuance-queues-2020",
        false,
        &["global-back-off"],
        None,
        &["--keys-on-token"],
        &["healthy CA keeps 100% success", "no global back-off"],
    );
}

#[test]
fn issuance_queues_2020_catches_a_back_off_of_background_work() {
    sabotaged_drill(
        "issuance-queues-2020",
        false,
        &["background-back-off"],
        &["background work for valid CAs keeps at least half its baseline rate"],
    );
}

#[test]
fn issuance_queues_2020_catches_disabled_cas_queued() {
    sabotaged_drill(
        "issuance-queues-2020",
        false,
        &["ignore-ca-state"],
        &["requests for disabled CAs are refused at intake"],
    );
}

#[test]
fn issuance_queues_2020_catches_a_park_that_does_not_hold() {
    sabotaged_drill("issuance-queues-2020", false, &["ignore-park"], &["parked work is held, then all issued"]);
}

/// The storm's promises (issue 12), each shown failing against an engine broken on purpose.
#[test]
fn issuance_queues_2020_catches_refusals_written_one_row_each() {
    sabotaged_drill(
        "issuance-queues-2020",
        false,
        &["audit-each-refusal"],
        &["the storm writes at most 1 database row per 100 refusals"],
    );
}

#[test]
fn issuance_queues_2020_catches_csr_work_before_the_refusal() {
    sabotaged_drill(
        "issuance-queues-2020",
        false,
        &["csr-before-state"],
        &[
            "under the retry storm, the healthy CA keeps 100% success and p99 within 2x",
            "the healthy CA loses no more throughput to the storm than to the control storm",
        ],
    );
}

#[test]
fn issuance_queues_2020_catches_a_disable_that_reaches_the_other_instance_late() {
    sabotaged_drill(
        "issuance-queues-2020",
        true,
        &["deaf-registry"],
        &["an admin disable during the storm answers within 1 s, and the other instance refuses the CA within 1 s"],
    );
}

/// Signing slower than the deadline is what makes deadlines matter: with it alone the engine
/// signs nothing late (the control: the judge does not fail on slowness), with deadlines ignored
/// as well it does, and the drill must say so.
#[test]
fn issuance_queues_2020_catches_work_signed_after_its_deadline() {
    let slow_only = sabotaged_drill(
        "issuance-queues-2020",
        false,
        &["slow-interactive-signing"],
        &["healthy CA keeps 100% success"],
    );
    assert_eq!(verdict(&slow_only, "nothing is signed after its deadline"), "held", "{slow_only}");
    sabotaged_drill(
        "issuance-queues-2020",
        false,
        &["slow-interactive-signing", "ignore-deadlines"],
        &["nothing is signed after its deadline"],
    );
}

#[test]
fn connection_surge_2024_catches_connections_outside_the_pools() {
    sabotaged_drill(
        "connection-surge-2024",
        true,
        &["connection-per-request"],
        &["database connections never exceed the configured budget"],
    );
}

#[test]
fn connection_surge_2024_catches_excess_load_left_to_time_out() {
    sabotaged_drill(
        "connection-surge-2024",
        true,
        &["timeouts-not-refusals"],
        &["excess load gets fast 503/429, not timeouts"],
    );
}

#[test]
fn connection_surge_2024_catches_admitted_work_past_its_deadline() {
    sabotaged_drill(
        "connection-surge-2024",
        true,
        &["slow-interactive-signing", "ignore-deadlines"],
        &["p99 of admitted requests stays inside the deadline"],
    );
}

#[test]
fn connection_surge_2024_catches_no_recovery() {
    sabotaged_drill(
        "connection-surge-2024",
        true,
        &["sticky-overload"],
        &["full recovery after the surge without a restart"],
    );
}

#[test]
fn pool_leak_2023_catches_a_silent_leak() {
    sabotaged_drill("pool-leak-2023", false, &["silent-leaks"], &["the leak is reported"]);
}

#[test]
fn pool_leak_2023_catches_issuance_without_its_own_pool() {
    sabotaged_drill(
        "pool-leak-2023",
        false,
        &["shared-pool"],
        &["the issuance path keeps serving from its own bulkhead"],
    );
}

#[test]
fn pool_leak_2023_catches_a_console_that_needs_the_pool() {
    sabotaged_drill("pool-leak-2023", false, &["brittle-console"], &["the admin and health endpoints keep answering"]);
}

#[test]
fn pool_too_small_2024_catches_a_blind_check_config() {
    sabotaged_drill(
        "pool-too-small-2024",
        false,
        &["blind-check-config"],
        &["check-config flags the pool given the expected rate"],
    );
}

#[test]
fn pool_too_small_2024_catches_a_quiet_readiness() {
    sabotaged_drill(
        "pool-too-small-2024",
        false,
        &["quiet-readiness"],
        &["the pool-wait metric and /readyz make the cause obvious"],
    );
}

#[test]
fn pool_too_small_2024_catches_bare_errors() {
    sabotaged_drill("pool-too-small-2024", false, &["bare-errors"], &["errors are 503 with Retry-After"]);
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
