//! HAProxy in front of a drill's instances: Debian's `haproxy` run in the foreground on the
//! shipped `deploy/haproxy.cfg`, its addresses given through the environment the file reads
//! (`LB_LISTEN`, `LB_STATS`, `INSTANCE_n`), and its own view of the instances read from its
//! status page (CSV), never from castellum.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::target::free_port;
use super::DrillError;

/// The shipped `deploy/haproxy.cfg`'s health checks (`tests/deploy.rs` holds the file to them):
/// a server is taken out after `fall` failed checks `inter` apart, each allowed `timeout check`.
/// The drills judge against these, whatever file they are given.
pub const CHECK_INTER: Duration = Duration::from_millis(500);
pub const CHECK_FALL: u32 = 2;
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(400);

/// The instances' backend in `deploy/haproxy.cfg`.
const BACKEND: &str = "instances";

/// A running HAProxy.
pub struct Haproxy {
    /// Where clients connect: `http://127.0.0.1:PORT`.
    pub base: String,
    stats: String,
    child: Child,
    http: reqwest::Client,
}

/// How HAProxy sees one server: `UP`, `DOWN`, `MAINT`, or a transition (`UP 1/2`, `DOWN 1/2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub name: String,
    pub status: String,
    /// Sessions HAProxy has sent to it so far.
    pub sessions: u64,
}

impl ServerState {
    pub fn is_up(&self) -> bool {
        self.status == "UP"
    }
    pub fn is_down(&self) -> bool {
        self.status == "DOWN"
    }
}

/// The `haproxy` binary: on PATH, or where Debian installs it (`/usr/sbin`, not on every PATH).
fn binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"))
}

/// `haproxy -c -f config`: HAProxy's own verdict on a configuration file.
pub fn check(config: &Path) -> Result<(), DrillError> {
    let out = Command::new(binary())
        .args(["-c", "-q", "-f"])
        .arg(config)
        .output()
        .map_err(|e| DrillError::Setup(format!("running haproxy (apt-get install haproxy): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DrillError::Setup(format!(
            "haproxy -c -f {}: {}{}",
            config.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

impl Haproxy {
    /// Start HAProxy on `config` in front of `instances` (their `[http] listen` addresses, in
    /// the order of the file's servers), logging to `log`; wait until it answers.
    pub async fn start(config: &Path, instances: &[&str], log: &Path) -> Result<Haproxy, DrillError> {
        check(config)?;
        let (port, stats_port) = (free_port()?, free_port()?);
        let log_file = std::fs::File::create(log)?;
        let mut command = Command::new(binary());
        command
            .args(["-db", "-f"])
            .arg(config)
            .env("LB_LISTEN", format!("127.0.0.1:{port}"))
            .env("LB_STATS", format!("127.0.0.1:{stats_port}"))
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file));
        for (i, address) in instances.iter().enumerate() {
            command.env(format!("INSTANCE_{}", i + 1), address);
        }
        let child = command.spawn().map_err(|e| DrillError::Setup(format!("starting haproxy: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| DrillError::Setup(e.to_string()))?;
        let lb = Haproxy {
            base: format!("http://127.0.0.1:{port}"),
            stats: format!("http://127.0.0.1:{stats_port}/stats;csv"),
            child,
            http,
        };
        let started = Instant::now();
        while lb.servers().await.is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                return Err(DrillError::Setup(format!("haproxy did not start (its log: {})", log.display())));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(lb)
    }

    /// Every server of the instances' backend, as HAProxy's status page shows it now.
    pub async fn servers(&self) -> Result<Vec<ServerState>, DrillError> {
        let csv = self.http.get(&self.stats).send().await?.text().await?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().trim_start_matches("# ").split(',').collect();
        let column = |name: &str| {
            header.iter().position(|h| *h == name).ok_or(DrillError::Setup(format!("no {name} in haproxy's CSV")))
        };
        let (px, sv, status, stot) = (column("pxname")?, column("svname")?, column("status")?, column("stot")?);
        Ok(lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.get(px) == Some(&BACKEND) && !matches!(f.get(sv), Some(&"BACKEND") | Some(&"FRONTEND")))
            .map(|f| ServerState {
                name: f.get(sv).unwrap_or(&"").to_string(),
                status: f.get(status).unwrap_or(&"").to_string(),
                sessions: f.get(stot).and_then(|s| s.parse().ok()).unwrap_or(0),
            })
            .collect())
    }

    /// Server `index` (0-based, the file's order) as HAProxy sees it.
    pub async fn server(&self, index: usize) -> Option<ServerState> {
        self.servers().await.ok()?.into_iter().nth(index)
    }

    /// Poll every 20 ms until server `index` satisfies `state`: how long it took, or `None`
    /// after `limit`.
    pub async fn wait_for(
        &self,
        index: usize,
        state: impl Fn(&ServerState) -> bool,
        limit: Duration,
    ) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.server(index).await.is_some_and(|s| state(&s)) {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
