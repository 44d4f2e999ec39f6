//! `.ci/run` itself: whatever fails, every later step still runs, the last
//! line is `ci: N passed, M failed`, and the exit status says whether
//! anything failed.
//!
//! The script runs from a copy of the repository's `.ci/run` in a scratch
//! directory, beside a stub `.ci/setup`, with stub `cargo`, `rustc`,
//! `postgres` and `pytest` first on the PATH. The stubs print what the real
//! tools print about their tests and log how they were called, so a run
//! takes well under a second and builds nothing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch copy of `.ci/run` with stubs for everything it calls.
struct Stubbed {
    dir: PathBuf,
}

/// What the stub `cargo test --test main` does on one PostgreSQL version.
#[derive(Clone, Copy, PartialEq)]
enum Main {
    Passes,
    /// Fails one test on the first version (15), passes on the second (16).
    FailsOn15,
}

/// One run of the copied script.
struct Run {
    success: bool,
    stdout: String,
    /// Every stub `cargo` call, one a line: `cargo <args>`.
    cargo_calls: String,
}

impl Run {
    fn last_line(&self) -> &str {
        self.stdout
            .lines()
            .rev()
            .find(|l| !l.is_empty())
            .unwrap_or("")
    }

    /// (passed, failed) from a `ci: N passed, M failed` line.
    fn counts(&self) -> Option<(u64, u64)> {
        let rest = self.last_line().strip_prefix("ci: ")?;
        let (passed, failed) = rest.split_once(" passed, ")?;
        let failed = failed.strip_suffix(" failed")?;
        Some((passed.parse().ok()?, failed.parse().ok()?))
    }

    fn context(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- cargo calls ---\n{}",
            self.stdout, self.cargo_calls
        )
    }
}

fn write_script(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().expect("a parent directory"))
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

impl Stubbed {
    /// `setup_ok`: whether the stub `.ci/setup` succeeds.
    fn new(setup_ok: bool, main: Main) -> Stubbed {
        let dir = crate::support::scratch_path("conveyour-cdc-ci");
        let run = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/run");
        let script =
            fs::read_to_string(&run).unwrap_or_else(|e| panic!("reading {}: {e}", run.display()));
        write_script(&dir.join(".ci/run"), &script);

        let pg15 = dir.join("pg15/bin");
        let pg16 = dir.join("pg16/bin");
        let venv = dir.join("venv");
        let setup = if setup_ok {
            format!(
                "# stub: what the real set-up exports\n\
                 echo '[ci/setup] stub' >&2\n\
                 export PG_BIN='{pg15}'\n\
                 export CHART_VENV='{venv}'\n\
                 export PG_BINS='{pg15}:{pg16}'\n",
                pg15 = pg15.display(),
                pg16 = pg16.display(),
                venv = venv.display(),
            )
        } else {
            "echo '[ci/setup] stub: no PostgreSQL server binaries found' >&2\nexit 1\n".to_owned()
        };
        write_script(&dir.join(".ci/setup"), &setup);

        for (bin, version) in [(&pg15, "15.18"), (&pg16, "16.2")] {
            write_script(
                &bin.join("postgres"),
                &format!("#!/bin/sh\necho 'postgres (PostgreSQL) {version}'\n"),
            );
        }
        write_script(
            &venv.join("bin/pytest"),
            "#!/bin/sh\necho '.....'\necho '5 passed in 0.01s'\n",
        );
        write_script(
            &dir.join("stubs/rustc"),
            "#!/bin/sh\necho 'rustc 0.0.0 (stub)'\n",
        );
        let fail_on = match main {
            Main::Passes => String::new(),
            Main::FailsOn15 => pg15.display().to_string(),
        };
        write_script(
            &dir.join("stubs/cargo"),
            &format!(
                r#"#!/bin/sh
# stub: logs the call, prints what cargo prints about tests
echo "cargo $*" >> '{log}'
ok() {{ echo "test result: ok. $1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s"; }}
case "$1" in
  --version) echo 'cargo 0.0.0 (stub)' ;;
  metadata) ;;
  test)
    case " $* " in
      *" --test main "*)
        if [ -n '{fail_on}' ] && [ "$PG_BIN" = '{fail_on}' ]; then
          echo 'test spine::a_stubbed_failure ... FAILED'
          echo 'test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s'
          exit 101
        fi
        ok 3 ;;
      *) ok 3 ;;
    esac ;;
  *) ;;
esac
exit 0
"#,
                log = dir.join("cargo-calls").display(),
            ),
        );
        Stubbed { dir }
    }

    fn run(&self) -> Run {
        let path = format!(
            "{}:{}",
            self.dir.join("stubs").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .arg(self.dir.join(".ci/run"))
            .env("PATH", path)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CONVEYOUR_CDC_BIN")
            .output()
            .expect("running bash .ci/run");
        Run {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            cargo_calls: fs::read_to_string(self.dir.join("cargo-calls")).unwrap_or_default(),
        }
    }
}

impl Drop for Stubbed {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn assert_linted(run: &Run) {
    for step in [
        "--- cargo fmt --check",
        "--- cargo clippy --all-targets --locked -- -D warnings",
    ] {
        assert!(run.stdout.contains(step), "no `{step}`\n{}", run.context());
    }
    for call in [
        "cargo fmt --check\n",
        "cargo clippy --all-targets --locked -- -D warnings\n",
    ] {
        assert!(
            run.cargo_calls.contains(call),
            "`{}` was not run\n{}",
            call.trim(),
            run.context()
        );
    }
}

#[test]
fn a_failing_test_still_runs_every_later_step_and_ends_with_the_summary() {
    let run = Stubbed::new(true, Main::FailsOn15).run();
    let (passed, failed) = run
        .counts()
        .unwrap_or_else(|| panic!("the last line is no summary\n{}", run.context()));
    assert!(
        failed >= 1,
        "a failed test counted as none\n{}",
        run.context()
    );
    // 3 unit tests, 2 + 3 integration tests on 15 and 16, 5 chart tests.
    assert_eq!((passed, failed), (13, 1), "wrong counts\n{}", run.context());
    assert!(
        !run.success,
        "exit status 0 after a failed test\n{}",
        run.context()
    );
    // Every step after the failing one ran: the next version, the examples,
    // the chart, fmt and clippy.
    assert_eq!(
        run.cargo_calls
            .matches("cargo test --locked --no-fail-fast --test main\n")
            .count(),
        2,
        "the integration tests did not run on both versions\n{}",
        run.context()
    );
    assert!(
        run.cargo_calls
            .contains("cargo build --locked --examples\n"),
        "{}",
        run.context()
    );
    assert!(
        run.stdout.contains("5 passed in"),
        "the chart tests did not run\n{}",
        run.context()
    );
    assert_linted(&run);
    assert!(
        run.stdout
            .contains("PostgreSQL 15.18: 2 passed, 1 failed, 0 skipped")
            && run
                .stdout
                .contains("PostgreSQL 16.2: 3 passed, 0 failed, 0 skipped")
            && run.stdout.contains(
                "--- failed steps\n  integration tests on PostgreSQL 15.18: cargo test --locked --no-fail-fast --test main (exit 101)"
            ),
        "the failure is not named\n{}",
        run.context()
    );
}

#[test]
fn a_failed_set_up_still_runs_fmt_and_clippy_and_ends_with_the_summary() {
    let run = Stubbed::new(false, Main::Passes).run();
    assert_eq!(
        run.last_line(),
        "ci: 0 passed, 1 failed",
        "{}",
        run.context()
    );
    assert!(
        !run.success,
        "exit status 0 after a failed set-up\n{}",
        run.context()
    );
    assert!(
        run.stdout
            .contains("--- failed steps\n  set-up (.ci/setup) (exit 1)"),
        "{}",
        run.context()
    );
    assert_linted(&run);
    assert!(
        !run.cargo_calls.contains("cargo test"),
        "tests ran without their set-up\n{}",
        run.context()
    );
}

#[test]
fn a_run_where_everything_passes_exits_zero() {
    let run = Stubbed::new(true, Main::Passes).run();
    assert_eq!(
        run.last_line(),
        "ci: 14 passed, 0 failed",
        "{}",
        run.context()
    );
    assert!(
        run.success,
        "non-zero exit with nothing failed\n{}",
        run.context()
    );
    assert!(
        !run.stdout.contains("--- failed steps"),
        "{}",
        run.context()
    );
}
