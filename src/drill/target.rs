//! The engine a drill runs against: by default a `castellum serve` child process that the drill
//! starts with its own configuration (so it can break the CA keys' files for real), on SQLite
//! or on a fresh PostgreSQL database; or an engine already running (`--url`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::{Connection, PgConnection, RunQueryDsl};

use super::DrillError;
use crate::db::{on_database, with_parameter};

/// The `application_name` of the drill's own PostgreSQL connections (its evidence reads), which
/// the connection counts leave out.
pub const EVIDENCE_APP: &str = "castellum-drill-evidence";

/// A database made for one drill and removed after it.
pub enum DrillDb {
    Sqlite(PathBuf),
    Postgres { admin_url: String, name: String, role: Option<String> },
}

impl DrillDb {
    pub fn url(&self) -> String {
        match self {
            DrillDb::Sqlite(path) => format!("sqlite://{}", path.display()),
            DrillDb::Postgres { admin_url, name, role } => {
                let base = match role {
                    Some(role) => admin_url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1),
                    None => admin_url.clone(),
                };
                on_database(&base, name)
            }
        }
    }

    /// The database as the superuser sees it (the drill's own reads, never the engine's role).
    pub fn admin_side_url(&self) -> String {
        match self {
            DrillDb::Sqlite(path) => format!("sqlite://{}", path.display()),
            DrillDb::Postgres { admin_url, name, .. } => on_database(admin_url, name),
        }
    }

    /// A fresh PostgreSQL database; with `connection_limit`, owned by a new role limited to it.
    pub fn postgres(admin_url: &str, connection_limit: Option<u32>) -> Result<DrillDb, DrillError> {
        let mut admin = PgConnection::establish(&on_database(admin_url, "postgres"))
            .map_err(|e| DrillError::Setup(format!("PostgreSQL at {admin_url}: {e}")))?;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("castellum_drill_{suffix}");
        let role = connection_limit.map(|_| format!("castellum_drill_role_{suffix}"));
        let sql = |c: &mut PgConnection, q: String| {
            diesel::sql_query(q).execute(c).map_err(|e| DrillError::Setup(e.to_string()))
        };
        if role.is_some() && !admin_url.starts_with("postgres://postgres@") {
            // The engine's URL is the admin URL with the role as its user (see `url`).
            return Err(DrillError::Setup(format!(
                "a drill with a role of its own needs --postgres postgres://postgres@HOST:PORT, not {admin_url}"
            )));
        }
        if let (Some(role), Some(limit)) = (&role, connection_limit) {
            sql(&mut admin, format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT {limit}"))?;
            sql(&mut admin, format!("CREATE DATABASE {name} OWNER {role}"))?;
        } else {
            sql(&mut admin, format!("CREATE DATABASE {name}"))?;
        }
        Ok(DrillDb::Postgres { admin_url: admin_url.to_string(), name, role })
    }

    /// A view for counting the engine's connections (PostgreSQL only).
    pub fn probe(&self) -> Option<PgProbe> {
        match self {
            DrillDb::Postgres { admin_url, name, role } => {
                Some(PgProbe { admin_url: admin_url.clone(), name: name.clone(), role: role.clone() })
            }
            DrillDb::Sqlite(_) => None,
        }
    }
}

/// Counts the client connections to one database (of the engine's role, when it has its own), as
/// PostgreSQL itself sees them: by backend, not by the name a connection gives itself after
/// connecting.
#[derive(Clone)]
pub struct PgProbe {
    admin_url: String,
    name: String,
    role: Option<String>,
}

impl PgProbe {
    pub fn connections(&self, admin: &mut Option<PgConnection>) -> Option<i64> {
        self.count(admin).ok()
    }

    /// The count, or why it could not be read.
    pub fn count(&self, admin: &mut Option<PgConnection>) -> Result<i64, String> {
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        if admin.is_none() {
            *admin = Some(
                PgConnection::establish(&with_parameter(
                    &on_database(&self.admin_url, "postgres"),
                    "connect_timeout=5",
                ))
                .map_err(|e| e.to_string())?,
            );
        }
        let Some(conn) = admin.as_mut() else { return Err("no connection".into()) };
        let role = match &self.role {
            Some(role) => format!(" AND usename = '{role}'"),
            None => String::new(),
        };
        let own = EVIDENCE_APP;
        diesel::sql_query(format!(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = '{}' AND backend_type = 'client backend' AND application_name <> '{own}'{role}",
            self.name
        ))
        .get_result::<Count>(conn)
        .map(|c| c.n)
        .map_err(|e| {
            *admin = None;
            e.to_string()
        })
    }
}

impl Drop for DrillDb {
    fn drop(&mut self) {
        if let DrillDb::Postgres { admin_url, name, role } = self {
            if let Ok(mut admin) = PgConnection::establish(&on_database(admin_url, "postgres")) {
                let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin);
                if let Some(role) = role {
                    let _ = diesel::sql_query(format!("DROP ROLE IF EXISTS {role}")).execute(&mut admin);
                }
            }
        }
    }
}

/// A running engine and how to reach it.
pub struct Target {
    pub base: String,
    pub admin: String,
    pub admin_token: String,
    pub api_key: String,
    /// Where this drill's copy of the CA keys lives (only for engines the drill started).
    pub key_dir: Option<PathBuf>,
    pub log: Option<PathBuf>,
    pub db: Option<DrillDb>,
    child: Option<Child>,
    /// The binary and configuration it was started with (engines the drill started).
    engine: Option<PathBuf>,
    config: Option<toml::Table>,
    /// Environment the engine process gets besides the drill's own (a token's `SOFTHSM2_CONF`).
    env: Vec<(&'static str, PathBuf)>,
    pub http: reqwest::Client,
}

pub(crate) fn free_port() -> Result<u16, DrillError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), DrillError> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

impl Target {
    /// Start `engine serve` (the `castellum` binary) with the dev configuration from `keys_dev`,
    /// changed by `edit`, with `env` in its environment.
    pub async fn start(
        engine: &Path,
        keys_dev: &Path,
        workdir: &Path,
        db: DrillDb,
        env: Vec<(&'static str, PathBuf)>,
        edit: impl FnOnce(&mut toml::Table),
    ) -> Result<Target, DrillError> {
        let key_dir = workdir.join("keys");
        copy_dir(keys_dev, &key_dir)?;
        let text = std::fs::read_to_string(key_dir.join("castellum.toml"))?;
        let mut config: toml::Table = text.parse().map_err(|e| DrillError::Setup(format!("dev config: {e}")))?;
        set(&mut config, &["database", "url"], db.url().into());
        set(&mut config, &["instance_id"], "drill".into());
        edit(&mut config);
        Target::launch(engine, workdir, key_dir, config, Some(db), env).await
    }

    /// A second instance of this engine, on the same database with the same configuration, its
    /// own ports, instance id and copy of the keys.
    pub async fn start_peer(&self, workdir: &Path, instance_id: &str) -> Result<Target, DrillError> {
        let (Some(engine), Some(config), Some(own_keys)) = (&self.engine, &self.config, &self.key_dir) else {
            return Err(DrillError::Unsupported("a second instance needs an engine the drill started".into()));
        };
        let key_dir = workdir.join("keys");
        copy_dir(own_keys, &key_dir)?;
        let mut config = config.clone();
        set(&mut config, &["instance_id"], instance_id.into());
        Target::launch(engine, workdir, key_dir, config, None, self.env.clone()).await
    }

    /// Run `engine serve` with `config` (given free loopback ports) from `key_dir`; `db` is the
    /// database it owns and removes, if any.
    async fn launch(
        engine: &Path,
        workdir: &Path,
        key_dir: PathBuf,
        mut config: toml::Table,
        db: Option<DrillDb>,
        env: Vec<(&'static str, PathBuf)>,
    ) -> Result<Target, DrillError> {
        let (port, admin_port) = (free_port()?, free_port()?);
        set(&mut config, &["http", "listen"], format!("127.0.0.1:{port}").into());
        set(&mut config, &["admin", "listen"], format!("127.0.0.1:{admin_port}").into());
        // No load balancer in front of a drill's engine unless the drill says so: a stop needs
        // no draining.
        let http = config.get("http").and_then(toml::Value::as_table);
        if !http.is_some_and(|h| h.contains_key("drain_grace")) {
            set(&mut config, &["http", "drain_grace"], "0s".into());
        }
        let config_path = key_dir.join("castellum.toml");
        std::fs::write(&config_path, toml::to_string_pretty(&config).map_err(|e| DrillError::Setup(e.to_string()))?)?;
        let log = workdir.join("engine.log");
        std::fs::File::create(&log)?;
        let mut target = Target {
            base: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            admin_token: "dev-admin-token".into(),
            api_key: "dev-key-demo".into(),
            key_dir: Some(key_dir),
            log: Some(log),
            db,
            child: None,
            engine: Some(engine.to_path_buf()),
            config: Some(config),
            env,
            http: client()?,
        };
        target.spawn()?;
        target.wait_ready(Duration::from_secs(60)).await?;
        target.wait_quiet(Duration::from_secs(20)).await;
        Ok(target)
    }

    /// Start this target's engine process, its output appended to its log.
    fn spawn(&mut self) -> Result<(), DrillError> {
        let (Some(engine), Some(key_dir), Some(log)) = (&self.engine, &self.key_dir, &self.log) else {
            return Err(DrillError::Unsupported("only an engine the drill started can be started again".into()));
        };
        let log_file = std::fs::OpenOptions::new().append(true).create(true).open(log)?;
        let child = Command::new(engine)
            .args(["serve", "--config"])
            .arg(key_dir.join("castellum.toml"))
            .env_remove("CASTELLUM_CONFIG")
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file))
            .spawn()
            .map_err(|e| DrillError::Setup(format!("starting {}: {e}", engine.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// Start the engine again after it stopped, on the same ports, configuration and database,
    /// and wait until it is ready: what an operator's service manager does after a restart.
    pub async fn restart(&mut self) -> Result<(), DrillError> {
        if self.child.is_some() {
            return Err(DrillError::Setup(format!("the engine at {} is still running", self.base)));
        }
        self.spawn()?;
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// SIGTERM, then wait up to `limit` for the process to exit: its exit status (`None` if it
    /// had to be killed) and how long it took.
    pub async fn terminate(&mut self, limit: Duration) -> (Option<std::process::ExitStatus>, Duration) {
        let started = Instant::now();
        let Some(mut child) = self.child.take() else { return (None, Duration::ZERO) };
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        while started.elapsed() < limit {
            if let Ok(Some(status)) = child.try_wait() {
                return (Some(status), started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        (None, started.elapsed())
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): every thread of the process stops where it is, or
    /// goes on. A stopped process is killed as it stands.
    pub fn freeze(&self, frozen: bool) {
        if let Some(child) = &self.child {
            let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGKILL: the process dies at once, with whatever it had in flight.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The `[http] listen` address (`127.0.0.1:PORT`).
    pub fn listen(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// Until the engine has finished its start-up work (the identity key stock generated, OCSP
    /// responders issued): two quarter-seconds in a row using under a fifth of a core. A
    /// baseline measured while it still generates RSA keys measures that work: one CI run read an
    /// interactive baseline of 101/s against 987/s once the fault had begun.
    async fn wait_quiet(&self, limit: Duration) {
        let Some(pid) = self.pid() else { return };
        let started = Instant::now();
        let mut quiet_windows = 0;
        while quiet_windows < 2 && started.elapsed() < limit {
            let before = process_cpu(pid);
            tokio::time::sleep(Duration::from_millis(250)).await;
            let used = process_cpu(pid).zip(before).map(|(after, before)| after.saturating_sub(before));
            quiet_windows = match used {
                Some(cpu) if cpu < Duration::from_millis(50) => quiet_windows + 1,
                Some(_) => 0,
                None => return, // no /proc: nothing to wait for
            };
        }
    }

    /// An engine already running (its dev-mode keys and tokens unless told otherwise).
    pub async fn existing(url: &str, admin: &str, admin_token: &str, api_key: &str) -> Result<Target, DrillError> {
        let target = Target {
            base: url.trim_end_matches('/').to_string(),
            admin: admin.trim_end_matches('/').to_string(),
            admin_token: admin_token.into(),
            api_key: api_key.into(),
            key_dir: None,
            log: None,
            db: None,
            child: None,
            engine: None,
            config: None,
            env: Vec::new(),
            http: client()?,
        };
        target.wait_ready(Duration::from_secs(10)).await?;
        Ok(target)
    }

    async fn wait_ready(&self, limit: Duration) -> Result<(), DrillError> {
        let started = Instant::now();
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if started.elapsed() > limit {
                return Err(DrillError::Setup(format!("the engine at {} did not become ready", self.base)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Pull one of the operator's levers; anything but a 2xx answer is an error.
    pub async fn admin_post(&self, path: &str, body: serde_json::Value) -> Result<u16, DrillError> {
        let resp =
            self.http.post(format!("{}{path}", self.admin)).bearer_auth(&self.admin_token).json(&body).send().await?;
        let status = resp.status().as_u16();
        if !resp.status().is_success() {
            return Err(DrillError::Lever { path: path.to_string(), status });
        }
        Ok(status)
    }

    /// Pull a lever and say how it went: its status (0: no answer) and how long it took.
    pub async fn lever(&self, path: &str, body: serde_json::Value) -> (u16, Duration) {
        let asked = Instant::now();
        let answer =
            self.http.post(format!("{}{path}", self.admin)).bearer_auth(&self.admin_token).json(&body).send().await;
        (answer.map(|r| r.status().as_u16()).unwrap_or(0), asked.elapsed())
    }

    /// How long until this engine serves `ca` in `state` (what its intake refuses by, as
    /// `GET /v1/cas` shows it), polling every 10 ms; `None` if not within `limit`.
    pub async fn served_as(&self, ca: &str, state: &str, limit: Duration) -> Option<Duration> {
        let asked = Instant::now();
        while asked.elapsed() < limit {
            let cas = self.http.get(format!("{}/v1/cas", self.base)).bearer_auth(&self.api_key).send().await;
            if let Ok(cas) = cas {
                if let Ok(v) = cas.json::<serde_json::Value>().await {
                    let served = v["cas"].as_array().into_iter().flatten().find(|c| c["id"] == ca);
                    if served.is_some_and(|c| c["state"] == state) {
                        return Some(asked.elapsed());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// How long after `since` this engine's console says `ca`'s key cannot sign, and why; `None`
    /// if it does not before `limit` has passed since then (it is asked at least once).
    pub async fn key_unavailable(&self, ca: &str, since: Instant, limit: Duration) -> Option<(Duration, String)> {
        loop {
            let status = self.http.get(format!("{}/admin/v1/status", self.admin)).bearer_auth(&self.admin_token);
            if let Ok(answer) = status.send().await {
                let v: serde_json::Value = answer.json().await.unwrap_or_default();
                let cell = v["cells"].as_array().into_iter().flatten().find(|c| c["ca"] == ca);
                if let Some(reason) = cell.and_then(|c| c["key_unavailable"].as_str()) {
                    return Some((since.elapsed(), reason.to_string()));
                }
            }
            if since.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> Result<String, DrillError> {
        Ok(self.http.get(format!("{}/metrics", self.base)).send().await?.text().await?)
    }

    /// Remove a CA's key file (the drill's own copy): the engine loses the key for real.
    pub fn destroy_key(&self, ca: &str) -> Result<(), DrillError> {
        let dir =
            self.key_dir.as_ref().ok_or(DrillError::Setup("key faults need an engine the drill started".into()))?;
        std::fs::remove_file(dir.join(format!("{ca}.key")))?;
        Ok(())
    }

    /// The engine's process id, when the drill started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn engine_log(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// Stop the engine the drill started (SIGINT, then SIGKILL after 15 s).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

/// User + system CPU a process has used so far (from /proc; the benchmarks read it too).
pub(crate) fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = (fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / ticks;
    Some(Duration::from_secs_f64(cpu))
}

fn client() -> Result<reqwest::Client, DrillError> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .pool_max_idle_per_host(512)
        // Well inside the server's 5 s keep-alive: reusing a connection the server is closing at
        // that moment loses the request (a client artifact, not an engine answer).
        .pool_idle_timeout(Duration::from_secs(1))
        .build()
        .map_err(|e| DrillError::Setup(e.to_string()))
}

/// Set `path` in a TOML table, creating tables on the way.
pub fn set(table: &mut toml::Table, path: &[&str], value: toml::Value) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut current = table;
    for key in parents {
        current = current
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("a table on the path");
    }
    current.insert(last.to_string(), value);
}

/// The `[[cas]]` entry for `ca`.
pub fn ca_entry<'a>(config: &'a mut toml::Table, ca: &str) -> &'a mut toml::Table {
    config["cas"]
        .as_array_mut()
        .expect("cas array")
        .iter_mut()
        .filter_map(|v| v.as_table_mut())
        .find(|t| t.get("id").and_then(|v| v.as_str()) == Some(ca))
        .expect("CA in the dev configuration")
}
