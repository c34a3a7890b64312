//! `castellum`: the reference monolith. The HTTP API on the engine, plus operator commands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use castellum::check::check_config;
use castellum::config::Config;
use castellum::{Engine, StartError};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "castellum", version, about = "Certificate-issuance engine for certificate authorities")]
struct Cli {
    /// Configuration file (TOML); it must exist. CASTELLUM_* variables override it.
    #[arg(long, short, global = true, env = "CASTELLUM_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum AdminAction {
    /// The actor tree, pools, cluster and recent audit events.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Set a CA's state: enabled, parked, draining, disabled, retired.
    CaState { ca: String, state: String },
    /// Feed a CA's parked requests back at its resubmit rate.
    Resubmit { ca: String },
    /// Revoke one certificate (any RFC 5280 reason: keyCompromise, cACompromise, superseded, ...).
    Revoke {
        serial: String,
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
    /// Revoke every issued certificate of a CA (disable the CA first to stop new ones).
    RevokeCa {
        ca: String,
        #[arg(long, default_value = "cACompromise")]
        reason: String,
    },
    /// Close a CA's circuit breaker.
    ResetBreaker { ca: String },
    /// Enable or disable a profile.
    Profile {
        profile: String,
        #[arg(value_parser = ["enable", "disable"])]
        action: String,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Check every instance's chain (and its checkpoint): names the first row changed, deleted,
    /// inserted or reordered; exits 1 if any chain is broken.
    Verify,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine and its HTTP API.
    Serve,
    /// Validate a configuration, listing every problem with its key path.
    CheckConfig {
        /// Also check the pools can sustain this many requests per second.
        #[arg(long)]
        expected_rate: Option<f64>,
        /// With --expected-rate: how long one request holds a connection.
        #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
        hold: std::time::Duration,
        /// How many instances will share the database (instead of `database.instances`); on
        /// PostgreSQL their pools are checked against the limits the server itself reports.
        #[arg(long)]
        instances: Option<u32>,
    },
    /// Run pending database migrations.
    Migrate,
    /// Print the HTTP API's OpenAPI 3.1 description (as served at `/openapi.json`; kept in
    /// docs/openapi.json).
    Openapi,
    /// Generate a fresh development PKI (root + one issuing CA per key type).
    DevPki {
        #[arg(long, default_value = "keys-dev")]
        out: PathBuf,
    },
    /// Replay an incident against an engine and report whether it held its promises.
    Drill {
        /// issuance-queues-2020, connection-surge-2024, pool-leak-2023, pool-too-small-2024,
        /// lb-rolling-restart, lb-kill-9 (or --list).
        name: Option<String>,
        #[arg(long)]
        list: bool,
        /// Seconds instead of minutes.
        #[arg(long)]
        short: bool,
        /// Run on a fresh database on this PostgreSQL server instead of SQLite.
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
        /// Drive an engine already running instead of starting one.
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        admin_url: Option<String>,
        #[arg(long, default_value = "dev-admin-token", env = "CASTELLUM_ADMIN_TOKEN")]
        admin_token: String,
        #[arg(long, default_value = "dev-key-demo", env = "CASTELLUM_API_KEY")]
        api_key: String,
        #[arg(long, default_value = "keys-dev")]
        keys_dev: PathBuf,
        /// Where report folders are written.
        #[arg(long, default_value = "drill-reports")]
        out: PathBuf,
        /// Start the engine with this deliberate defect (dev mode; repeatable) to see the drill
        /// fail (the defects are listed in docs/TESTING.md).
        #[arg(long, value_name = "DEFECT")]
        sabotage: Vec<String>,
        /// Start this `castellum` binary's engine instead of this one's (to measure an earlier
        /// build with this drill).
        #[arg(long, value_name = "BINARY")]
        engine: Option<PathBuf>,
        /// The HAProxy configuration the lb-* drills put in front of their instances.
        #[arg(long, default_value = "deploy/haproxy.cfg")]
        haproxy_config: PathBuf,
        /// issuance-queues-2020 only: every CA key on a SoftHSM token (the failing CAs' on a
        /// token of their own, whose storage the fault takes away) instead of key files.
        #[arg(long)]
        keys_on_token: bool,
    },
    /// Benchmark end-to-end issuance against the machine's crypto ceiling (use a release build).
    Bench {
        /// Run on a fresh database on this PostgreSQL server instead of SQLite.
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        concurrency: Vec<usize>,
        /// Measured time per concurrency level.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        #[arg(long, default_value = "keys-dev")]
        keys_dev: PathBuf,
        #[arg(long, default_value = "drill-reports")]
        out: PathBuf,
        /// Measure refusals instead: the same load against a disabled CA.
        #[arg(long)]
        refusals: bool,
        /// After the levels, open this many keep-alive connections (one request each, then
        /// idle, as a load balancer keeps them) and measure c=64 again beside them (0: skip).
        #[arg(long, default_value_t = 5000)]
        idle_connections: usize,
        /// Benchmark this castellum binary's engine instead of this one's (an older build, to
        /// compare two builds in one run).
        #[arg(long, value_name = "BINARY")]
        engine: Option<PathBuf>,
        /// Generate this many issued certificates (with their audit rows) in the database before
        /// the levels, in bulk, to measure issuance beside a CA's history (0: empty database).
        #[arg(long, default_value_t = 0)]
        prefill: u64,
        /// Measure OCSP instead: answers from the cache at each concurrency, beside a control
        /// (`GET /healthz`) at the same concurrency in the same run.
        #[arg(long, conflicts_with_all = ["refusals", "prefill"])]
        ocsp: bool,
        /// Measure a CA key on a SoftHSM2 token against the same key in memory (P-256 and
        /// RSA-3072): signatures/s, and issuances/s at each concurrency.
        #[arg(long, conflicts_with_all = ["refusals", "prefill", "ocsp", "postgres"])]
        token: bool,
        /// With `--ocsp`: measure the same loads with wrk as well (apt-get install wrk).
        #[arg(long, requires = "ocsp")]
        wrk: bool,
        /// With `--ocsp`: measure each concurrency at this fixed total rate too (requests per
        /// second), its latency counted from when each request was due.
        #[arg(long, requires = "ocsp", value_parser = clap::value_parser!(u32).range(1..=200_000))]
        rate: Option<u32>,
    },
    /// A retry storm against engines on this machine: requests at a fixed rate, whatever they
    /// are answered (no back-off), then a JSON report of the answers on stdout. Loopback only,
    /// bounded in time and requests. The incident-003 drill runs it as a process of its own.
    Storm {
        /// An engine's base URL (repeatable: requests go to each in turn).
        #[arg(long = "url", required = true)]
        urls: Vec<String>,
        /// A profile asked for (repeatable: asked for in turn), each with the `--csr` at its place.
        #[arg(long = "profile", required = true)]
        profiles: Vec<String>,
        /// A PEM CSR file for the `--profile` at the same place.
        #[arg(long = "csr", required = true)]
        csrs: Vec<PathBuf>,
        #[arg(long, env = "CASTELLUM_STORM_API_KEY", hide_env_values = true)]
        api_key: String,
        /// Requests per second.
        #[arg(long, default_value_t = 2_000)]
        rate: u32,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Requests outstanding at once (a request due past this is skipped and counted).
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        #[arg(long, default_value_t = 1_000_000)]
        max_requests: u64,
    },
    /// The admin API from the command line (status, and the console's levers).
    Admin {
        /// The admin API's URL. Default: the configuration's admin listener (with `-c`), else
        /// http://127.0.0.1:8081.
        #[arg(long, env = "CASTELLUM_ADMIN_URL")]
        admin_url: Option<String>,
        /// The admin token. A command line is visible to the machine's other users: prefer the
        /// environment or --token-file.
        #[arg(long, env = "CASTELLUM_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file holding the admin token (its first line).
        #[arg(long, env = "CASTELLUM_ADMIN_TOKEN_FILE", conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// PEM certificates of the CAs that issued an https admin listener's certificate.
        #[arg(long, env = "CASTELLUM_ADMIN_CACERT")]
        cacert: Option<PathBuf>,
        #[command(subcommand)]
        action: AdminAction,
    },
    /// The audit log's hash chains.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Print the SHA-256 of an API key, for a client's `api_key_sha256`.
    HashKey { key: String },
}

fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("configuration cannot be read:");
        for p in e.problems() {
            eprintln!("  {p}");
        }
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    castellum::telemetry::init(cli.log_json);
    let config = cli.config.as_deref();
    match cli.command {
        Command::CheckConfig { expected_rate, hold, instances } => load(config).map_or_else(
            |code| code,
            |mut c| {
                if let Some(n) = instances {
                    c.database.instances = n;
                }
                check(&c, expected_rate, hold)
            },
        ),
        Command::Migrate => load(config).map_or_else(|code| code, |c| migrate(&c)),
        Command::Openapi => {
            print!("{}", castellum::http::openapi::document());
            ExitCode::SUCCESS
        }
        Command::DevPki { out } => dev_pki(&out),
        Command::Drill {
            name,
            list,
            short,
            postgres,
            url,
            admin_url,
            admin_token,
            api_key,
            keys_dev,
            out,
            sabotage,
            engine,
            haproxy_config,
            keys_on_token,
        } => {
            let Some(name) = name.filter(|_| !list) else {
                for (name, what) in castellum::drill::DRILLS {
                    println!("{name:24} {what}");
                }
                return ExitCode::SUCCESS;
            };
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            drill(castellum::drill::DrillOptions {
                name,
                short,
                postgres,
                url,
                admin_url,
                admin_token,
                api_key,
                keys_dev,
                out,
                command,
                sabotage,
                engine,
                haproxy_config,
                keys_on_token,
            })
        }
        Command::Bench {
            postgres,
            concurrency,
            duration,
            keys_dev,
            out,
            refusals,
            idle_connections,
            engine,
            prefill,
            ocsp,
            token,
            wrk,
            rate,
        } => bench(
            castellum::bench::BenchOptions {
                postgres,
                concurrency,
                duration,
                keys_dev,
                out,
                refusals,
                idle_connections,
                engine,
                prefill,
                wrk,
                rate,
            },
            match (ocsp, token) {
                (true, _) => BenchKind::Ocsp,
                (_, true) => BenchKind::Token,
                _ => BenchKind::Issuance,
            },
        ),
        Command::Storm { urls, profiles, csrs, api_key, rate, duration, in_flight, max_requests } => {
            if profiles.len() != csrs.len() {
                eprintln!(
                    "storm: give one --csr for each --profile ({} profiles, {} CSRs)",
                    profiles.len(),
                    csrs.len()
                );
                return ExitCode::from(2);
            }
            let mut requests = Vec::new();
            for (profile, path) in profiles.into_iter().zip(csrs) {
                match std::fs::read_to_string(&path) {
                    Ok(csr) => requests.push((profile, csr)),
                    Err(e) => {
                        eprintln!("storm: {}: {e}", path.display());
                        return ExitCode::from(2);
                    }
                }
            }
            let plan =
                castellum::drill::storm::StormPlan { urls, api_key, requests, rate, duration, in_flight, max_requests };
            storm(&plan)
        }
        Command::Admin { admin_url, token, token_file, cacert, action } => {
            match admin_target(config, admin_url, token, token_file, cacert) {
                Ok(target) => admin(&target, &action),
                Err(e) => {
                    eprintln!("admin: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Audit { action: AuditAction::Verify } => load(config).map_or_else(|code| code, |c| audit_verify(&c)),
        Command::HashKey { key } => {
            println!("{}", hex::encode(openssl::sha::sha256(key.as_bytes())));
            ExitCode::SUCCESS
        }
        Command::Serve => load(config).map_or_else(
            |code| code,
            |c| match actix_web::rt::System::new().block_on(serve(c, cli.log_json)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            },
        ),
    }
}

/// `check-config`: every problem at once; warnings never fail it.
fn check(config: &Config, expected_rate: Option<f64>, hold: std::time::Duration) -> ExitCode {
    let (mut problems, _) = check_config(config);
    if let Some(rate) = expected_rate {
        problems.extend(castellum::check::check_capacity(config, rate, hold));
    }
    if config.database.is_postgres() {
        match castellum::db::server_limits::ServerLimits::read(&config.database.url) {
            Ok(server) => {
                let (found, budget) = castellum::check::check_server_budget(config, &server);
                println!("connection budget: {budget}");
                problems.extend(found);
            }
            // Checking a configuration away from its database is legitimate: say what was not.
            Err(e) => eprintln!(
                "  warning: the server's connection limits could not be read ({e}): judged against database.server_max_connections only"
            ),
        }
    }
    let (warnings, problems): (Vec<_>, Vec<_>) = problems.into_iter().partition(|p| p.warning);
    for w in &warnings {
        eprintln!("  {w}");
    }
    if problems.is_empty() {
        println!(
            "configuration is valid ({} CAs, {} profiles, {} clients{})",
            config.cas.len(),
            config.profiles.len(),
            config.clients.len(),
            if warnings.is_empty() { String::new() } else { format!("; {} warning(s)", warnings.len()) }
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("{} problem(s):", problems.len());
        for p in &problems {
            eprintln!("  {p}");
        }
        ExitCode::from(1)
    }
}

fn audit_verify(config: &Config) -> ExitCode {
    let (reports, note) = match castellum::audit::chain::verify_configured(config) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("audit verify: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    let mut broken = 0;
    for r in &reports {
        let head = r.head.as_ref().map_or("empty".to_string(), |h| format!("head seq {} {}", h.seq, h.hash));
        match &r.fault {
            None => println!("{}: {} rows verified, {head}, {} not sealed yet", r.instance, r.verified, r.unsealed),
            Some(fault) => {
                broken += 1;
                println!("{}: BROKEN after {} rows: {fault}", r.instance, r.verified);
            }
        }
    }
    if broken > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn migrate(config: &Config) -> ExitCode {
    match castellum::db::migrate::run(&config.database.url) {
        Ok(n) => {
            println!("{n} migration(s) applied");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn dev_pki(out: &std::path::Path) -> ExitCode {
    match castellum::pki::devpki::generate(out, |step| eprintln!("generating {step}…")) {
        Ok(()) => {
            println!("development PKI written to {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dev-pki failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// Exit 0 when every promise held, 1 when one failed, 2 when the drill could not run.
fn drill(opts: castellum::drill::DrillOptions) -> ExitCode {
    match castellum::drill::run(opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("drill failed to run: {e}");
            ExitCode::from(2)
        }
    }
}

/// One thread for the whole storm: a client's share of the machine, not the engine's.
fn storm(plan: &castellum::drill::storm::StormPlan) -> ExitCode {
    match plan.run_here() {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("storm: {e}");
            ExitCode::from(2)
        }
    }
}

/// What `castellum bench` measures.
enum BenchKind {
    Issuance,
    Ocsp,
    Token,
}

fn bench(opts: castellum::bench::BenchOptions, kind: BenchKind) -> ExitCode {
    let report = match kind {
        BenchKind::Ocsp => castellum::bench::run_ocsp(opts).map(|r| r.markdown()),
        BenchKind::Token => castellum::bench::run_token(opts).map(|r| r.markdown()),
        BenchKind::Issuance => castellum::bench::run(opts).map(|r| r.markdown()),
    };
    match report {
        Ok(markdown) => {
            println!("{markdown}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::from(2)
        }
    }
}

/// Where `castellum admin` calls and with which token: the URL given, or the configuration's
/// admin listener (an unspecified address reached on loopback); the token given, or read from a file.
fn admin_target(
    config: Option<&std::path::Path>,
    url: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    cacert: Option<PathBuf>,
) -> Result<castellum::admin::cli::AdminTarget, String> {
    let url = match (url, config) {
        (Some(url), _) => url,
        (None, Some(path)) => {
            let config = Config::load(Some(path)).map_err(|e| format!("{}: {e}", path.display()))?;
            castellum::admin::cli::url_of(&config.admin).ok_or("the configuration has no admin listener")?
        }
        (None, None) => "http://127.0.0.1:8081".into(),
    };
    let token = match (token, token_file) {
        (Some(token), _) => token,
        (None, Some(file)) => std::fs::read_to_string(&file)
            .map_err(|e| format!("--token-file {}: {e}", file.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        (None, None) => return Err("no admin token: give --token, CASTELLUM_ADMIN_TOKEN or --token-file".into()),
    };
    if token.is_empty() {
        return Err("the admin token is empty".into());
    }
    let cacert = cacert.map(|p| std::fs::read(&p).map_err(|e| format!("--cacert {}: {e}", p.display()))).transpose()?;
    Ok(castellum::admin::cli::AdminTarget { url, token, cacert })
}

/// `castellum admin`: one lever of the admin API, over HTTP.
fn admin(target: &castellum::admin::cli::AdminTarget, action: &AdminAction) -> ExitCode {
    use castellum::admin::cli;
    let result = match action {
        AdminAction::Status { json } => cli::call(target, "GET", "/admin/v1/status", None).map(|v| {
            if *json {
                serde_json::to_string_pretty(&v).unwrap_or_default()
            } else {
                cli::render_status(&v)
            }
        }),
        AdminAction::CaState { ca, state } => {
            cli::call(target, "POST", &format!("/admin/v1/cas/{ca}/state"), Some(serde_json::json!({ "state": state })))
                .map(|v| format!("{ca} is {state} (registry version {})", v["registry_version"]))
        }
        AdminAction::Resubmit { ca } => cli::call(target, "POST", &format!("/admin/v1/cas/{ca}/resubmit"), None)
            .map(|v| format!("resubmitting {} parked requests of {ca}", v["resubmitting"])),
        AdminAction::Revoke { serial, reason } => cli::call(
            target,
            "POST",
            &format!("/admin/v1/certificates/{serial}/revoke"),
            Some(serde_json::json!({ "reason": reason })),
        )
        .map(|v| match v["newly_revoked"].as_bool() {
            Some(true) => format!("{serial} revoked ({})", v["reason"].as_str().unwrap_or(reason)),
            _ => format!("{serial} was already revoked ({}); the first revocation stands", s_of(&v["reason"])),
        }),
        AdminAction::RevokeCa { ca, reason } => cli::call(
            target,
            "POST",
            &format!("/admin/v1/cas/{ca}/revoke-all"),
            Some(serde_json::json!({ "reason": reason })),
        )
        .map(|v| format!("{} certificates of {ca} revoked ({reason})", v["revoked"])),
        AdminAction::ResetBreaker { ca } => {
            cli::call(target, "POST", &format!("/admin/v1/cas/{ca}/breaker/reset"), None)
                .map(|_| format!("breaker of {ca} closed"))
        }
        AdminAction::Profile { profile, action } => cli::call(
            target,
            "POST",
            &format!("/admin/v1/profiles/{profile}/state"),
            Some(serde_json::json!({ "enabled": action == "enable" })),
        )
        .map(|v| format!("profile {profile} {}d (registry version {})", action, v["registry_version"])),
    };
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

async fn serve(config: Config, log_json: bool) -> Result<(), Box<dyn std::error::Error>> {
    // With --log-json stdout carries JSON only: where it listens becomes a log event.
    let announce = |what: &str, url: String| {
        if log_json {
            tracing::info!(url = %url, "{what}");
        } else {
            println!("{what} {url}");
        }
    };
    let listen = config.http.listen.clone();
    let dev = config.mode == castellum::config::Mode::Dev;
    let engine = Engine::start(config).await.map_err(|e| match e {
        StartError::Config(_) => format!("refusing to start: {e}"),
        other => other.to_string(),
    })?;
    // A listener that cannot bind stops the engine before the error is returned: its actors are
    // stopped inside the runtime, not dropped with it (a panic in their cleanup, as was seen).
    let (server, addrs) = match castellum::http::server(engine.clone(), &listen) {
        Ok(bound) => bound,
        Err(e) => return Err(stop_for(&engine, format!("API listener {listen}: {e}")).await),
    };
    let scheme = |tls: bool| if tls { "https" } else { "http" };
    for addr in &addrs {
        announce("castellum listening on", format!("{}://{addr}", scheme(engine.config().http.tls.is_some())));
    }
    let admin_listen = engine.config().admin.listen.clone();
    let admin = if admin_listen.is_empty() {
        None
    } else {
        let (admin, admin_addrs) = match castellum::admin::server(engine.clone(), &admin_listen) {
            Ok(bound) => bound,
            Err(e) => return Err(stop_for(&engine, format!("admin listener {admin_listen}: {e}")).await),
        };
        for addr in &admin_addrs {
            announce("admin console on", format!("{}://{addr}/admin", scheme(engine.config().admin.tls.is_some())));
        }
        let handle = admin.handle();
        actix_web::rt::spawn(admin);
        Some(handle)
    };
    if dev && !log_json && engine.config().http.tls.is_none() {
        if let Some(addr) = addrs.first() {
            print_sample(addr);
        }
    }
    let handle = server.handle();
    let stopper = engine.clone();
    let mut signals = StopSignals::new()?;
    actix_web::rt::spawn(async move {
        signals.next().await;
        if stopper.config().sabotaged(castellum::config::Sabotage::StopWithoutDrain) {
            tracing::warn!("stopping at once, without draining (sabotage stop-without-drain)");
            handle.stop(false).await;
            if let Some(admin) = admin {
                admin.stop(false).await;
            }
            stopper.shutdown().await;
            return;
        }
        // First the load balancer stops sending (readiness 503), while everything is served.
        let grace = stopper.config().http.drain_grace;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "stopping: draining (/readyz answers 503, requests still served)"
        );
        stopper.begin_drain();
        if actix_web::rt::time::timeout(grace, signals.next()).await.is_ok() {
            tracing::info!("stopping: a second signal ends the drain early");
        }
        // Then no new connection; requests in flight get their answers.
        tracing::info!("stopping: listener closed, finishing requests in flight");
        handle.stop(true).await;
        if let Some(admin) = admin {
            admin.stop(true).await;
        }
        stopper.shutdown().await;
    });
    server.await?;
    engine.shutdown().await;
    Ok(())
}

/// Stop the engine (inside the runtime, so its actors' cleanup has one) and give `why` as the
/// error `serve` returns.
async fn stop_for(engine: &Engine, why: String) -> Box<dyn std::error::Error> {
    engine.shutdown().await;
    why.into()
}

/// SIGTERM (what service managers and orchestrators send) and SIGINT (Ctrl-C), as one stream.
struct StopSignals {
    term: actix_web::rt::signal::unix::Signal,
    int: actix_web::rt::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<StopSignals> {
        use actix_web::rt::signal::unix::{signal, SignalKind};
        Ok(StopSignals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    async fn next(&mut self) {
        let (term, int) = (self.term.recv(), self.int.recv());
        futures_util::pin_mut!(term, int);
        futures_util::future::select(term, int).await;
    }
}

fn print_sample(addr: &std::net::SocketAddr) {
    println!(
        r#"
Try it (dev mode; the sample client's API key is dev-key-demo):

  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout /tmp/demo.key \
    -subj /CN=demo.example.test -addext subjectAltName=DNS:demo.example.test -out /tmp/demo.csr
  curl -sS http://{addr}/v1/certificates -H 'Authorization: Bearer dev-key-demo' \
    -H 'Content-Type: application/json' \
    --data "{{\"profile\":\"tls-server-p256\",\"csr\":\"$(awk '{{printf "%s\\n", $0}}' /tmp/demo.csr)\"}}"
"#
    );
}

fn s_of(v: &serde_json::Value) -> String {
    v.as_str().map(String::from).unwrap_or_else(|| v.to_string())
}
