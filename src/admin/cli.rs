//! `castellum admin …`: the admin API from the command line — the tree as a readable table, or
//! `--json` for scripts — and the same levers as the console.

use std::fmt::Write as _;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the admin API refused: {status} {detail}")]
    Refused { status: u16, detail: String },
}

/// Where the admin API is and how to call it.
pub struct AdminTarget {
    pub url: String,
    pub token: String,
    /// PEM CA certificates that verify an https listener (the system's roots are not used).
    pub cacert: Option<Vec<u8>>,
}

/// The URL of a configuration's admin listener, as reached from this machine: an unspecified
/// address (`0.0.0.0`, `[::]`) is reached on loopback. `None`: no admin listener.
pub fn url_of(admin: &crate::config::AdminConfig) -> Option<String> {
    if admin.listen.is_empty() {
        return None;
    }
    let scheme = if admin.tls.is_some() { "https" } else { "http" };
    let host = match admin.listen.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => match a {
            std::net::SocketAddr::V4(a) => format!("127.0.0.1:{}", a.port()),
            std::net::SocketAddr::V6(a) => format!("[::1]:{}", a.port()),
        },
        _ => admin.listen.clone(),
    };
    Some(format!("{scheme}://{host}"))
}

/// One call to the admin API; the JSON answer.
pub fn call(target: &AdminTarget, method: &str, path: &str, body: Option<Value>) -> Result<Value, CliError> {
    let url = format!("{}{path}", target.url.trim_end_matches('/'));
    let unreachable = |reason: String| CliError::Unreachable { url: url.clone(), reason };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| unreachable(e.to_string()))?;
    runtime.block_on(async {
        // An admin listener that accepts but never answers must not hang the operator's shell.
        let mut http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10));
        if let Some(pem) = &target.cacert {
            for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(|e| unreachable(format!("--cacert: {e}")))? {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http.build().map_err(|e| unreachable(e.to_string()))?;
        let request = match method {
            "GET" => http.get(&url),
            _ => http.post(&url).json(&body.unwrap_or(Value::Object(Default::default()))),
        };
        let response = request.bearer_auth(&target.token).send().await.map_err(|e| unreachable(error_chain(&e)))?;
        let status = response.status().as_u16();
        let json: Value = response.json().await.unwrap_or(Value::Null);
        if status >= 400 {
            return Err(CliError::Refused { status, detail: json["detail"].as_str().unwrap_or("").to_string() });
        }
        Ok(json)
    })
}

/// An error with its causes (reqwest's own message omits why a TLS handshake failed).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn table(out: &mut String, headers: &[&str], rows: Vec<Vec<String>>) {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).chain(std::iter::once(headers[i].len())).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<String>| {
        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    let _ = writeln!(out, "  {}", line(headers.iter().map(|h| h.to_string()).collect()));
    for row in rows {
        let _ = writeln!(out, "  {}", line(row));
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The status as the operator reads it.
pub fn render_status(status: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "instance {} · registry version {}", s(&status["instance"]), s(&status["registry_version"]));
    for w in status["warnings"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "WARNING: {}", s(w));
    }
    let _ = writeln!(out, "\nCluster");
    let instances = status["instances"].as_array().cloned().unwrap_or_default();
    table(
        &mut out,
        &["INSTANCE", "ADDRESS", "UPTIME", "REGISTRY", "STALE"],
        instances
            .iter()
            .map(|i| {
                vec![
                    s(&i["id"]),
                    s(&i["address"]),
                    format!("{}s", s(&i["uptime_s"])),
                    s(&i["registry_version"]),
                    s(&i["stale"]),
                ]
            })
            .collect(),
    );
    for peer in instances.iter().filter(|i| i["id"] != status["instance"]) {
        let _ = writeln!(out, "\n  {} (as it last published):", s(&peer["id"]));
        let cells = peer["tree"]["cells"].as_array().cloned().unwrap_or_default();
        table(
            &mut out,
            &["CA", "STATE", "BREAKER", "INTERACTIVE", "BACKGROUND", "IN FLIGHT", "SIGNED"],
            cells
                .iter()
                .map(|c| {
                    vec![
                        s(&c["ca"]),
                        s(&c["state"]),
                        s(&c["breaker"]),
                        s(&c["interactive_queued"]),
                        s(&c["background_queued"]),
                        s(&c["in_flight"]),
                        s(&c["signatures"]),
                    ]
                })
                .collect(),
        );
    }
    let _ = writeln!(out, "\nCA cells of this instance (Registry → Intake → cells)");
    let cells = status["cells"].as_array().cloned().unwrap_or_default();
    table(
        &mut out,
        &[
            "CA",
            "STATE",
            "BREAKER",
            "KEY",
            "INTERACTIVE",
            "BACKGROUND",
            "PARKED",
            "IN FLIGHT",
            "SIGNED",
            "MEAN SIGN",
            "RESTARTS",
        ],
        cells
            .iter()
            .map(|c| {
                vec![
                    s(&c["ca"]),
                    s(&c["state"]),
                    s(&c["breaker"]),
                    if c["key_available"] == Value::Bool(true) { "loaded".into() } else { "UNAVAILABLE".into() },
                    format!("{} ({} ms)", s(&c["interactive_queued"]), s(&c["interactive_oldest_ms"])),
                    format!("{} ({} ms)", s(&c["background_queued"]), s(&c["background_oldest_ms"])),
                    s(&c["parked"]),
                    s(&c["in_flight"]),
                    s(&c["signatures"]),
                    format!("{} µs", s(&c["mean_sign_us"])),
                    s(&c["restarts"]),
                ]
            })
            .collect(),
    );
    let store = &status["store"];
    let _ = writeln!(
        out,
        "\nStore: {} workers, {} batches in flight, {} writes waiting{}",
        s(&store["workers"]),
        s(&store["batches_in_flight"]),
        s(&store["pending_writes"]),
        if store["database_down"] == Value::Bool(true) { ", DATABASE DOWN" } else { "" }
    );
    if let Some(identities) = status.get("identities") {
        let stock: Vec<String> = identities["key_stock"]
            .as_array()
            .map(|a| a.iter().map(|k| format!("{} {}/{}", s(&k["key"]), s(&k["stocked"]), s(&k["target"]))).collect())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "Identities: keys in stock {}; vault: {} signatures waiting",
            if stock.is_empty() { "none".to_string() } else { stock.join(", ") },
            s(&identities["vault_waiting"])
        );
    }
    let _ = writeln!(out, "\nDatabase pools");
    let pools = status["pools"].as_array().cloned().unwrap_or_default();
    table(
        &mut out,
        &["POOL", "IN USE", "IDLE", "MAX", "WAIT P99", "TIMEOUTS", "LONGEST HOLD"],
        pools
            .iter()
            .map(|p| {
                vec![
                    s(&p["name"]),
                    s(&p["in_use"]),
                    s(&p["idle"]),
                    s(&p["max"]),
                    format!("{:.2} ms", p["wait_p99_ms"].as_f64().unwrap_or(0.0)),
                    s(&p["timeouts"]),
                    format!("{} ms", s(&p["longest_hold_ms"])),
                ]
            })
            .collect(),
    );
    let _ = writeln!(out, "\nProfiles");
    let profiles = status["profiles"].as_array().cloned().unwrap_or_default();
    table(&mut out, &["PROFILE", "STATE"], profiles.iter().map(|p| vec![s(&p[0]), s(&p[1])]).collect());
    let refusals = status["refusals"].as_array().cloned().unwrap_or_default();
    if !refusals.is_empty() {
        let _ = writeln!(out, "\nRefusals over the last minute, per CA (who is retrying)");
        table(
            &mut out,
            &["CA", "PER SECOND", "BY REASON", "REFUSED MOST"],
            refusals
                .iter()
                .map(|r| {
                    let pairs = |v: &Value, f: &dyn Fn(&Value) -> String| {
                        v.as_array()
                            .map(|a| {
                                a.iter().map(|p| format!("{} {}", s(&p[0]), f(&p[1]))).collect::<Vec<_>>().join(", ")
                            })
                            .unwrap_or_default()
                    };
                    vec![
                        s(&r["ca"]),
                        format!("{:.1}", r["per_second"].as_f64().unwrap_or(0.0)),
                        pairs(&r["by_reason"], &|n| format!("{:.1}/s", n.as_f64().unwrap_or(0.0))),
                        pairs(&r["top_clients"], &s),
                    ]
                })
                .collect(),
        );
    }
    let chains = status["audit_chains"].as_array().cloned().unwrap_or_default();
    if !chains.is_empty() {
        let verified = &status["audit_verified"];
        let said = match (&verified["at"], &verified["fault"]) {
            (Value::Null, _) => "not yet verified by this instance".to_string(),
            (_, Value::String(fault)) => format!("verified at {} ms: BROKEN: {fault}", s(&verified["at"])),
            _ => format!("verified at {} ms: {} rows hold", s(&verified["at"]), s(&verified["verified"])),
        };
        let _ = writeln!(out, "\nAudit hash chains (verify with `castellum audit verify`; {said})");
        table(
            &mut out,
            &["INSTANCE", "SEQ", "HEAD"],
            chains.iter().map(|h| vec![s(&h["instance"]), s(&h["seq"]), s(&h["hash"])]).collect(),
        );
    }
    let _ = writeln!(out, "\nRecent audit events");
    let audit = status["audit"].as_array().cloned().unwrap_or_default();
    table(
        &mut out,
        &["WHO", "ACTION", "TARGET", "OUTCOME"],
        audit
            .iter()
            .take(10)
            .map(|a| vec![s(&a["actor"]), s(&a["action"]), s(&a["target"]), s(&a["outcome"])])
            .collect(),
    );
    out
}
