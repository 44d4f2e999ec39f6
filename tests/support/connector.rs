//! Runs the real `conveyour-cdc` binary with a config file and captures its
//! output.
//!
//! In `args`, the placeholder `{config}` is replaced with the path of the
//! config file written from `config_yaml`, e.g.
//! `Connector::spawn(&["run", "--config", "{config}"], &yaml, &[])`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The binary under test. Cargo names it for integration tests; other
/// targets that share this harness (the demo) fall back to
/// `CONVEYOUR_CDC_BIN` when set, else the debug build in `CARGO_TARGET_DIR`
/// when set, else in the repository's `target/` (relative paths are taken
/// from the repository root).
pub fn bin() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_conveyour-cdc") {
        return PathBuf::from(path);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(path) = set("CONVEYOUR_CDC_BIN") {
        return repo.join(path);
    }
    let target = set("CARGO_TARGET_DIR").map_or_else(|| repo.join("target"), |dir| repo.join(dir));
    target.join("debug").join("conveyour-cdc")
}

/// Placeholder in `args` that is replaced by the config file's path.
pub const CONFIG_PLACEHOLDER: &str = "{config}";

/// A scratch directory holding `config.yaml` and the captured output.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(config_yaml: &str) -> Scratch {
        let dir = super::scratch_path("conveyour-cdc-run");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let scratch = Scratch { dir };
        fs::write(scratch.config_path(), config_yaml).expect("writing the connector config");
        scratch
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    fn command(&self, bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
        let config = self.config_path();
        let mut cmd = Command::new(bin);
        for arg in args {
            if *arg == CONFIG_PLACEHOLDER {
                cmd.arg(&config);
            } else {
                cmd.arg(arg);
            }
        }
        cmd.envs(env.iter().copied())
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        cmd
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A running connector process; killed (SIGKILL) when dropped.
pub struct Connector {
    child: Mutex<Child>,
    pid: u32,
    log_path: PathBuf,
    scratch: Scratch,
    /// Exit status once observed (kept so repeated waits agree).
    status: Mutex<Option<ExitStatus>>,
}

impl Connector {
    /// Writes `config_yaml` to a temp file, then starts the binary with `args`
    /// (`{config}` → that file) and `env` added to the inherited environment.
    /// stdout and stderr both go to one log file, see [`Connector::log`].
    pub fn spawn(args: &[&str], config_yaml: &str, env: &[(&str, &str)]) -> Connector {
        Connector::spawn_bin(&bin(), args, config_yaml, env)
    }

    /// Like [`Connector::spawn`], with the binary at `bin` instead of [`bin()`]
    /// (the demo runs the one built next to it).
    pub fn spawn_bin(
        bin: &Path,
        args: &[&str],
        config_yaml: &str,
        env: &[(&str, &str)],
    ) -> Connector {
        let scratch = Scratch::new(config_yaml);
        let log_path = scratch.dir.join("output.log");
        let out = fs::File::create(&log_path).expect("creating the connector log");
        let err = out.try_clone().expect("cloning the log handle");
        let child = scratch
            .command(bin, args, env)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        Connector {
            pid: child.id(),
            child: Mutex::new(child),
            log_path,
            scratch,
            status: Mutex::new(None),
        }
    }

    /// `spawn(&["run", "--config", "{config}"], ...)`.
    pub fn run(config_yaml: &str, env: &[(&str, &str)]) -> Connector {
        Connector::spawn(&["run", "--config", CONFIG_PLACEHOLDER], config_yaml, env)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn config_path(&self) -> PathBuf {
        self.scratch.config_path()
    }

    /// Replaces the config file's contents (for reload-style tests).
    pub fn write_config(&self, config_yaml: &str) {
        fs::write(self.scratch.config_path(), config_yaml).expect("rewriting the config");
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process printed so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends SIGKILL (crash).
    pub fn sigkill(&self) {
        self.signal("KILL");
    }

    /// Sends any signal by name (`"INT"`, `"HUP"`, ...) via `kill`.
    pub fn signal(&self, name: &str) {
        if self.try_status().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// The exit status if the process has exited.
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut status = self.status.lock().unwrap();
        if status.is_none() {
            *status = self.child.lock().unwrap().try_wait().ok().flatten();
        }
        *status
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.try_status().is_none()
    }

    /// Sends SIGTERM and asserts a clean exit (0) within a minute, showing
    /// the log otherwise.
    pub async fn stop(&self) {
        self.sigterm();
        let status = self.wait(Duration::from_secs(60)).await;
        assert!(status.success(), "{status:?}\n{}", self.log());
    }

    /// Waits for exit; panics with the log if it takes longer than `timeout`.
    pub async fn wait(&self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "conveyour-cdc (pid {}) did not exit within {timeout:?}\n--- log ---\n{}",
                    self.pid,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the log contains `needle`; panics with the log on timeout
    /// or if the process exits first.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Some(status) = self.try_status() {
                panic!(
                    "conveyour-cdc exited ({status}) before logging {needle:?}\n--- log ---\n{}",
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "conveyour-cdc did not log {needle:?} within {timeout:?}\n--- log ---\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Peak resident memory (VmHWM) in KiB, read while the process is alive.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- conveyour-cdc (pid {}) log ---\n{}\n--- end of log ---",
                self.pid,
                self.log()
            );
        }
    }
}

/// Runs a one-shot subcommand (e.g. `check`) to completion, with `{config}`
/// in `args` replaced by the config file's path. Returns the exit status,
/// stdout and stderr. Panics if it runs for more than 120 s.
pub fn run_cli(
    args: &[&str],
    config_yaml: &str,
    env: &[(&str, &str)],
) -> (ExitStatus, String, String) {
    let scratch = Scratch::new(config_yaml);
    let bin = bin();
    let out_path = scratch.dir.join("stdout");
    let err_path = scratch.dir.join("stderr");
    let mut child = scratch
        .command(&bin, args, env)
        .stdout(Stdio::from(fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::from(fs::File::create(&err_path).unwrap()))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for conveyour-cdc") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "conveyour-cdc {args:?} did not finish within 120 s\n--- stdout ---\n{}\n--- stderr ---\n{}",
                fs::read_to_string(&out_path).unwrap_or_default(),
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |p: &Path| {
        fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    (status, read(&out_path), read(&err_path))
}
