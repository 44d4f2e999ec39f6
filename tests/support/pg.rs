//! A real, throwaway PostgreSQL cluster shared by every test in the process,
//! and fresh per-test databases inside it.
//!
//! The cluster runs with `wal_level=logical`, TLS (a throwaway CA; the server
//! certificate names only `localhost`) when the server was built with it
//! ([`Cluster::has_tls`]; a test that needs it calls [`skip_without_tls`]),
//! and four password roles whose `pg_hba.conf` lines force one
//! authentication method each:
//!
//! | role            | method                                   |
//! |-----------------|------------------------------------------|
//! | `md5_user`      | md5 (the stored hash really is md5)      |
//! | `scram_user`    | scram-sha-256                            |
//! | `password_user` | cleartext password                       |
//! | `tls_user`      | scram-sha-256, only over TLS (else reject)|
//!
//! Without TLS in the build, `tls_user` is always rejected.
//! Every role has `LOGIN REPLICATION` and the password [`password_for`].
//! Everyone else (notably the superuser `postgres`) is trusted.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// The roles created for authentication tests, each with its own `pg_hba` method.
pub const AUTH_ROLES: [&str; 4] = ["md5_user", "scram_user", "password_user", "tls_user"];

/// The password of one of the [`AUTH_ROLES`]: `pw-<role>`.
pub fn password_for(role: &str) -> String {
    format!("pw-{role}")
}

/// The shared cluster, started on first use and stopped by a watchdog once
/// this test process is gone.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(Cluster::start) {
        Ok(c) => c,
        Err(e) => panic!("the test PostgreSQL cluster could not be started: {e}"),
    }
}

/// A cluster of its own for a test that restarts or stops PostgreSQL, so it
/// doesn't cut the connections of tests sharing [`cluster`]. It lives until
/// the process ends (the watchdog then stops it and removes its directory).
pub fn private_cluster() -> &'static Cluster {
    match Cluster::start() {
        Ok(c) => Box::leak(Box::new(c)),
        Err(e) => panic!("a private PostgreSQL cluster could not be started: {e}"),
    }
}

/// True when this process runs as uid 0.
pub fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        if let Ok(status) = fs::read_to_string("/proc/self/status") {
            for line in status.lines() {
                if let Some(rest) = line.strip_prefix("Uid:") {
                    return rest.split_whitespace().next() == Some("0");
                }
            }
        }
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// Locates the directory with `initdb`, `postgres`, `pg_ctl`: `$PG_BIN`, else
/// `pg_config --bindir`, else the highest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
        return Err(format!(
            "PG_BIN={} does not contain `initdb`: point PG_BIN at PostgreSQL's server bin directory",
            dir.display()
        ));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("initdb").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let bin = entry.path().join("bin");
            if !bin.join("initdb").is_file() {
                continue;
            }
            let version: Vec<u64> = entry
                .file_name()
                .to_string_lossy()
                .split('.')
                .map(|p| p.parse().unwrap_or(0))
                .collect();
            if best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    best.map(|(_, bin)| bin).ok_or_else(|| {
        "no PostgreSQL server binaries found: install Debian's `postgresql` package or set PG_BIN"
            .to_string()
    })
}

/// The running throwaway cluster.
pub struct Cluster {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    /// `Some("postgres")` when we are root and must drop privileges.
    server_user: Option<String>,
    /// Whether the server was built with TLS (`ssl_library` is set).
    tls: bool,
}

impl Cluster {
    fn start() -> Result<Cluster, String> {
        let bindir = find_bindir()?;
        let server_user = if running_as_root() {
            let ok = Command::new("id")
                .args(["-u", "postgres"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err(
                    "running as root but there is no `postgres` user to run the server as \
                     (install Debian's `postgresql` package, or run the tests as a normal user)"
                        .into(),
                );
            }
            Some("postgres".to_string())
        } else {
            None
        };
        let dir = super::scratch_path("conveyour-cdc-pg");
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        let port = free_port()?;
        let mut cluster = Cluster {
            bindir,
            dir,
            port,
            server_user,
            tls: false,
        };
        cluster.chown(&cluster.dir)?;
        // The watchdog first, so the directory goes away whatever happens next.
        cluster.spawn_watchdog()?;
        cluster.write_certificates()?;
        cluster.initdb()?;
        cluster.tls = cluster.built_with_tls()?;
        cluster.configure()?;
        cluster.pg_ctl(&["-w", "-t", "60", "-l"], &["start"])?;
        cluster.wait_ready()?;
        cluster.create_roles()?;
        Ok(cluster)
    }

    /// TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Host to connect to: always `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// Whether the server accepts TLS: true unless its build has no TLS
    /// library (some packaged builds leave OpenSSL out).
    pub fn has_tls(&self) -> bool {
        self.tls
    }

    /// The throwaway CA's certificate (PEM, world-readable). The server
    /// certificate it signed names only DNS `localhost`, not `127.0.0.1`.
    /// Written even when the server has no TLS ([`Cluster::has_tls`]).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A server binary (`pg_recvlogical`, `psql`, ...) of the running version.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// The server log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The cluster's scratch directory (data dir is `<dir>/data`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `postgres://postgres@127.0.0.1:PORT/<db>` (trusted superuser).
    pub fn superuser_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, db)
    }

    /// `pg_ctl restart -m fast`: every connection is dropped, the server comes
    /// back on the same port. Blocks until it accepts connections again.
    /// On the shared [`cluster`] this hits every test running in parallel:
    /// use a [`private_cluster`] for that.
    pub fn restart(&self) {
        if let Err(e) = self.pg_ctl(&["-w", "-t", "60", "-m", "fast", "-l"], &["restart"]) {
            panic!("restarting PostgreSQL failed: {e}");
        }
        if let Err(e) = self.wait_ready() {
            panic!("PostgreSQL did not come back after restart: {e}");
        }
    }

    /// `pg_ctl stop -m fast`: the server is down until [`Cluster::start_server`].
    pub fn stop_server(&self) {
        if let Err(e) = self.pg_ctl(&["-w", "-t", "60", "-m", "fast", "-l"], &["stop"]) {
            panic!("stopping PostgreSQL failed: {e}");
        }
    }

    /// Starts the server again after [`Cluster::stop_server`] (same port).
    pub fn start_server(&self) {
        if let Err(e) = self.pg_ctl(&["-w", "-t", "60", "-l"], &["start"]) {
            panic!("starting PostgreSQL failed: {e}");
        }
        if let Err(e) = self.wait_ready() {
            panic!("PostgreSQL did not come up: {e}");
        }
    }

    /// A fresh database in this cluster; see the free function [`fresh_db`].
    pub async fn fresh_db(&'static self, hint: &str) -> TestDb {
        create_db(self, hint).await
    }

    /// A superuser connection to database `postgres`.
    pub async fn admin(&self) -> tokio_postgres::Client {
        connect(&self.superuser_url("postgres"))
            .await
            .unwrap_or_else(|e| panic!("admin connection to the test cluster failed: {e}"))
    }

    pub(super) fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A command for a server binary, run as the server user when we are root.
    pub(super) fn server_command(&self, program: &Path) -> Command {
        let mut cmd = match &self.server_user {
            Some(user) => {
                let mut c = if Path::new("/usr/sbin/runuser").exists()
                    || Path::new("/sbin/runuser").exists()
                    || which("runuser")
                {
                    let mut c = Command::new("runuser");
                    c.args(["-u", user, "--"]);
                    c
                } else {
                    let mut c = Command::new("setpriv");
                    c.args([
                        "--reuid",
                        user,
                        "--regid",
                        user,
                        "--init-groups",
                        "--reset-env",
                        "--",
                    ]);
                    c
                };
                c.arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }

    pub(super) fn chown(&self, path: &Path) -> Result<(), String> {
        if let Some(user) = &self.server_user {
            let out = Command::new("chown")
                .arg("-R")
                .arg(format!("{user}:"))
                .arg(path)
                .output()
                .map_err(|e| format!("running chown: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "chown {} failed: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        Ok(())
    }

    fn spawn_watchdog(&self) -> Result<(), String> {
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; \
             '{pg_ctl}' -D '{data}' stop -m immediate >/dev/null 2>&1; \
             rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = self.bin("pg_ctl").display(),
            data = self.data_dir().display(),
            dir = self.dir.display(),
        );
        let mut cmd = self.server_command(Path::new("/bin/sh"));
        cmd.args(["-c", &script])
            .current_dir("/")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: a Ctrl-C aimed at the tests must not kill it.
            .process_group(0);
        cmd.spawn()
            .map_err(|e| format!("starting the cleanup watchdog: {e}"))?;
        Ok(())
    }

    fn write_certificates(&self) -> Result<(), String> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let err = |e: rcgen::Error| format!("making test certificates: {e}");
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "conveyour-cdc test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;

        let server_key = KeyPair::generate().map_err(err)?;
        // DNS localhost only: verify-full against 127.0.0.1 must fail.
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string()]).map_err(err)?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_cert = server_params
            .signed_by(&server_key, &ca_cert, &ca_key)
            .map_err(err)?;

        let write = |name: &str, text: &str, mode: u32| -> Result<(), String> {
            let path = self.dir.join(name);
            fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {}: {e}", path.display()))?;
            self.chown(&path)
        };
        write("ca.pem", &ca_cert.pem(), 0o644)?;
        write("server.crt", &server_cert.pem(), 0o644)?;
        write("server.key", &server_key.serialize_pem(), 0o600)?;
        Ok(())
    }

    fn initdb(&self) -> Result<(), String> {
        let out = self
            .server_command(&self.bin("initdb"))
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ])
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Asks the initialised (not yet running) server for its `ssl_library`:
    /// empty when it was built without TLS, where `ssl = on` stops it.
    fn built_with_tls(&self) -> Result<bool, String> {
        let out = self
            .server_command(&self.bin("postgres"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["-C", "ssl_library"])
            .output()
            .map_err(|e| format!("running postgres -C ssl_library: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "postgres -C ssl_library failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(!String::from_utf8_lossy(&out.stdout).trim().is_empty())
    }

    fn configure(&self) -> Result<(), String> {
        let d = self.dir.display();
        let ssl = if self.tls {
            format!(
                "ssl = on\n\
                 ssl_cert_file = '{d}/server.crt'\n\
                 ssl_key_file = '{d}/server.key'\n\
                 ssl_ca_file = '{d}/ca.pem'\n"
            )
        } else {
            String::new()
        };
        let conf = format!(
            "\n# conveyour-cdc test harness\n\
             wal_level = logical\n\
             max_replication_slots = 100\n\
             max_wal_senders = 100\n\
             max_connections = 300\n\
             fsync = off\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{d}'\n\
             wal_sender_timeout = 60s\n\
             logging_collector = off\n\
             log_min_messages = warning\n\
             {ssl}",
            port = self.port,
        );
        let conf_path = self.data_dir().join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .map_err(|e| format!("opening {}: {e}", conf_path.display()))?;
        f.write_all(conf.as_bytes())
            .map_err(|e| format!("writing {}: {e}", conf_path.display()))?;

        // Order matters: first match wins. A `hostssl` line stops a server
        // built without TLS from starting.
        let tls_line = if self.tls {
            "hostssl all         tls_user      127.0.0.1/32 scram-sha-256\n"
        } else {
            ""
        };
        let hba = format!(
            "\
# conveyour-cdc test harness: one authentication method per role
{tls_line}host    all         tls_user      127.0.0.1/32 reject
host    all         md5_user      127.0.0.1/32 md5
host    all         scram_user    127.0.0.1/32 scram-sha-256
host    all         password_user 127.0.0.1/32 password
local   all         all                        trust
host    all         all           127.0.0.1/32 trust
local   replication all                        trust
host    replication all           127.0.0.1/32 trust
"
        );
        let hba_path = self.data_dir().join("pg_hba.conf");
        fs::write(&hba_path, hba).map_err(|e| format!("writing {}: {e}", hba_path.display()))?;
        self.chown(&self.data_dir())
    }

    /// A second server's cluster beside this one (same binaries, a new
    /// directory and port, its watchdog running), with no data directory
    /// yet: `support::standby` fills it with `pg_basebackup`.
    pub(super) fn sibling(&self) -> Result<Cluster, String> {
        let dir = super::scratch_path("conveyour-cdc-pg");
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        let sibling = Cluster {
            bindir: self.bindir.clone(),
            dir,
            port: free_port()?,
            server_user: self.server_user.clone(),
            tls: self.tls,
        };
        sibling.chown(&sibling.dir)?;
        sibling.spawn_watchdog()?;
        Ok(sibling)
    }

    /// Runs `pg_ctl -D <data> <opts> <log> <action>`; `opts` must end in `-l`.
    pub(super) fn pg_ctl(&self, opts: &[&str], action: &[&str]) -> Result<(), String> {
        let out = self
            .server_command(&self.bin("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .args(opts)
            .arg(self.log_path())
            .args(action)
            .output()
            .map_err(|e| format!("running pg_ctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl {action:?} failed ({}):\n{}\n{}\n--- server log tail ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                super::tail_of(&self.log_path(), 40)
            ));
        }
        Ok(())
    }

    /// Retries a superuser connection for up to 30 s.
    pub(super) fn wait_ready(&self) -> Result<(), String> {
        let url = self.superuser_url("postgres");
        let log = self.log_path();
        on_own_runtime(move || async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match connect(&url).await {
                    Ok(client) => match client.simple_query("SELECT 1").await {
                        Ok(_) => return Ok(()),
                        Err(e) if Instant::now() > deadline => {
                            return Err(format!("{e}\n{}", super::tail_of(&log, 40)))
                        }
                        Err(_) => {}
                    },
                    Err(e) if Instant::now() > deadline => {
                        return Err(format!(
                            "PostgreSQL not ready after 30 s: {e}\n--- server log tail ---\n{}",
                            super::tail_of(&log, 40)
                        ))
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    fn create_roles(&self) -> Result<(), String> {
        let url = self.superuser_url("postgres");
        on_own_runtime(move || async move {
            let client = connect(&url).await.map_err(|e| e.to_string())?;
            for role in AUTH_ROLES {
                let encryption = if role == "md5_user" {
                    "md5"
                } else {
                    "scram-sha-256"
                };
                let sql = format!(
                    "SET password_encryption = '{encryption}'; \
                     CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{pw}'; \
                     RESET password_encryption;",
                    pw = password_for(role)
                );
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| format!("creating role {role}: {e}"))?;
            }
            Ok(())
        })
    }
}

/// Runs an async job to completion on a private runtime in its own thread, so
/// it works whether or not the caller is inside a (current-thread) runtime.
fn on_own_runtime<F, Fut, T>(job: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a tokio runtime")
            .block_on(job())
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("finding a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// Connects without TLS and drives the connection on a background task.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Parses a WAL position in the server's `X/Y` text form.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
        return None;
    }
    Some((hi << 32) | lo)
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A fresh, empty database in the shared cluster, dropped (with its
/// replication slots and connections) when this value is dropped.
pub async fn fresh_db(hint: &str) -> TestDb {
    create_db(cluster(), hint).await
}

async fn create_db(cluster: &'static Cluster, hint: &str) -> TestDb {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let mut clean: String = hint
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(30)
        .collect();
    if clean.is_empty() || clean.starts_with(|c: char| c.is_ascii_digit()) {
        clean.insert_str(0, "db_");
    }
    let name = format!(
        "{clean}_{}_{}",
        COUNTER.fetch_add(1, Ordering::Relaxed),
        std::process::id()
    );
    let admin = cluster.admin().await;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {e}"));
    TestDb { name, cluster }
}

/// One test's database. See [`fresh_db`].
pub struct TestDb {
    name: String,
    cluster: &'static Cluster,
}

impl TestDb {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cluster this database lives in.
    pub fn cluster(&self) -> &'static Cluster {
        self.cluster
    }

    /// Superuser URL: `postgres://postgres@127.0.0.1:PORT/NAME`.
    pub fn url(&self) -> String {
        self.cluster.superuser_url(&self.name)
    }

    /// URL for one of the [`AUTH_ROLES`], with its password (percent-encoded).
    pub fn url_as(&self, role: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            percent_encode(role),
            percent_encode(&password_for(role)),
            self.cluster.port(),
            self.name
        )
    }

    /// A superuser connection to this database.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url())
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.name))
    }

    /// Runs one or more statements; panics with the SQL and the error.
    pub async fn exec(&self, sql: &str) {
        let client = self.client().await;
        if let Err(e) = client.batch_execute(sql).await {
            let detail = e
                .as_db_error()
                .map(|d| format!("{}: {}", d.code().code(), d.message()))
                .unwrap_or_else(|| e.to_string());
            panic!("SQL failed in {}: {detail}\n--- SQL ---\n{sql}", self.name);
        }
    }

    /// The first column of the first row as i64 (int2/int4/int8/numeric-free).
    pub async fn query_i64(&self, sql: &str) -> i64 {
        let client = self.client().await;
        let row = client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("query failed: {e}\n--- SQL ---\n{sql}"));
        if let Ok(v) = row.try_get::<_, i64>(0) {
            return v;
        }
        if let Ok(v) = row.try_get::<_, i32>(0) {
            return v as i64;
        }
        if let Ok(v) = row.try_get::<_, i16>(0) {
            return v as i64;
        }
        panic!("query_i64: first column is not an integer\n--- SQL ---\n{sql}")
    }

    /// The first column of the first row as text; `None` if no row or NULL.
    pub async fn query_opt_string(&self, sql: &str) -> Option<String> {
        let client = self.client().await;
        let row = client
            .query_opt(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("query failed: {e}\n--- SQL ---\n{sql}"))?;
        row.try_get::<_, Option<String>>(0).unwrap_or_else(|e| {
            panic!("query_opt_string: first column is not text ({e})\n--- SQL ---\n{sql}")
        })
    }

    /// `pg_current_wal_lsn()`.
    pub async fn wal_lsn(&self) -> u64 {
        let text = self
            .query_opt_string("SELECT pg_current_wal_lsn()::text")
            .await
            .expect("pg_current_wal_lsn() returned NULL");
        parse_lsn(&text).unwrap_or_else(|| panic!("unparseable LSN {text:?}"))
    }

    /// `confirmed_flush_lsn` of a slot; `None` if the slot is missing or unset.
    pub async fn confirmed_flush(&self, slot: &str) -> Option<u64> {
        let client = self.client().await;
        let row = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap_or_else(|e| panic!("reading slot {slot}: {e}"))?;
        let text: Option<String> = row.get(0);
        text.and_then(|t| parse_lsn(&t))
    }

    /// Whether a connector streams from the slot: it holds the slot and
    /// its walsender has started replication. (A walsender holds a slot it
    /// has just created before it streams: during the initial sync.)
    pub async fn slot_active(&self, slot: &str) -> bool {
        let client = self.client().await;
        client
            .query_opt(
                "SELECT s.active AND EXISTS (SELECT 1 FROM pg_stat_replication r
                                              WHERE r.pid = s.active_pid AND r.state IN ('catchup', 'streaming'))
                   FROM pg_replication_slots s WHERE s.slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap_or_else(|e| panic!("reading slot {slot}: {e}"))
            .is_some_and(|row| row.get::<_, bool>(0))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let url = self.cluster.superuser_url("postgres");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("TestDb drop {name}: no runtime: {e}");
                    return;
                }
            };
            if let Err(e) = rt.block_on(drop_database(&url, &name)) {
                eprintln!("TestDb drop {name}: {e}");
            }
            let _ = tx.send(());
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            eprintln!("TestDb drop {}: cleanup did not finish in 20 s", self.name);
        }
    }
}

async fn drop_database(url: &str, name: &str) -> Result<(), String> {
    let client = connect(url).await.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .await;
        let _ = client
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE database = $1 AND active_pid IS NOT NULL",
                &[&name],
            )
            .await;
        let slots = client
            .query(
                "SELECT slot_name::text FROM pg_replication_slots WHERE database = $1",
                &[&name],
            )
            .await
            .map_err(|e| e.to_string())?;
        if slots.is_empty() {
            break;
        }
        for row in slots {
            let slot: String = row.get(0);
            let _ = client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await;
        }
        if Instant::now() > deadline {
            return Err("replication slots still present after 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .map_err(|e| format!("DROP DATABASE: {e}"))
}

/// The major version (15, 16, ...) of the server binaries the tests run
/// against ([`find_bindir`]).
pub fn server_major() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        let bindir = find_bindir().unwrap_or_else(|e| panic!("{e}"));
        let out = Command::new(bindir.join("postgres"))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("running postgres --version: {e}"));
        // "postgres (PostgreSQL) 18.6"
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .last()
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("cannot read a version from `postgres --version`: {text}"))
    })
}

/// Says on stderr, past the test harness' capture, that the calling test
/// is skipped and why: `skipped: <test>: <reason>` (`.ci/run` lists them).
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let line = format!(
        "skipped: {test}: {reason} (PostgreSQL {})\n",
        server_major()
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// True, after saying so ([`skip`]), when the server is older than `major`:
/// the calling test then returns early.
pub fn skip_below(major: u32, reason: &str) -> bool {
    if server_major() >= major {
        return false;
    }
    skip(reason);
    true
}

/// True, after saying so ([`skip`]), when the shared [`cluster`]'s server
/// was built without TLS: the calling test then returns early.
pub fn skip_without_tls() -> bool {
    if cluster().has_tls() {
        return false;
    }
    skip("needs a server built with TLS; this build has no TLS library");
    true
}

/// True, after saying so ([`skip`]), when the shared [`cluster`]'s server
/// cannot install the extension `name` (builds without the contrib modules):
/// the calling test then returns early.
pub fn skip_without_extension(name: &str) -> bool {
    let url = cluster().superuser_url("postgres");
    let query = name.to_string();
    let available = on_own_runtime(move || async move {
        let client = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("admin connection to the test cluster failed: {e}"));
        client
            .query_opt(
                "SELECT 1 FROM pg_available_extensions WHERE name = $1",
                &[&query],
            )
            .await
            .unwrap_or_else(|e| panic!("reading pg_available_extensions: {e}"))
            .is_some()
    });
    if available {
        return false;
    }
    skip(&format!(
        "needs the extension {name}, which this build does not ship (no contrib modules)"
    ));
    true
}

/// True, after saying so ([`skip`]), when the shared [`cluster`]'s server
/// has no loadable module `name` in its library directory (contrib's
/// output plugin `test_decoding`, say, in builds without the contrib
/// modules): the calling test then returns early.
pub fn skip_without_module(name: &str) -> bool {
    let url = cluster().superuser_url("postgres");
    let libdir = on_own_runtime(move || async move {
        let client = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("admin connection to the test cluster failed: {e}"));
        client
            .query_one(
                "SELECT setting FROM pg_config WHERE name = 'PKGLIBDIR'",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("reading the server's PKGLIBDIR: {e}"))
            .get::<_, String>(0)
    });
    if Path::new(&libdir).join(format!("{name}.so")).is_file() {
        return false;
    }
    skip(&format!(
        "needs the module {name}, which this build does not ship (no contrib modules)"
    ));
    true
}

/// True, after saying so ([`skip`]), when the shared [`cluster`]'s server
/// was built without libxml (the `xml` type then refuses every value): the
/// calling test then returns early.
pub fn skip_without_xml() -> bool {
    static XML: OnceLock<bool> = OnceLock::new();
    let has_xml = *XML.get_or_init(|| {
        let url = cluster().superuser_url("postgres");
        on_own_runtime(move || async move {
            let client = connect(&url)
                .await
                .unwrap_or_else(|e| panic!("admin connection to the test cluster failed: {e}"));
            // 0A000 feature_not_supported: "unsupported XML feature".
            match client.simple_query("SELECT '<a/>'::xml").await {
                Ok(_) => true,
                Err(e)
                    if e.code()
                        == Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED) =>
                {
                    false
                }
                Err(e) => panic!("probing for xml support: {e}"),
            }
        })
    });
    if has_xml {
        return false;
    }
    skip("needs a server built with libxml (the xml type); this build has none");
    true
}
