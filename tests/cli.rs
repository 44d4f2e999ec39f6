//! The command line: `check` against a real database and the test
//! ConveYour, bad configs refused before anything connects, `--help`
//! everywhere.

use crate::support::connector::{run_cli, CONFIG_PLACEHOLDER as CONFIG};
use crate::support::receiver::{Fault, IDENTIFY_PATH};
use crate::support::setup::{world, APPKEY, ROSTER_SQL, ROSTER_TABLES, TOKEN};

#[tokio::test(flavor = "multi_thread")]
async fn check_passes_on_a_ready_database_with_one_line_per_check() {
    let w = world("check_ok", ROSTER_SQL).await;
    let (status, out, err) = run_cli(&["check", "--config", CONFIG], &w.roster_config(), &[]);
    assert!(status.success(), "stdout:\n{out}\nstderr:\n{err}");
    for name in [
        "config",
        "server reachable",
        "wal_level: logical",
        "replication privilege",
        "replication connection",
        "tables and columns",
        "read public.employees",
        "read public.sales",
        "publication",
        "connector schema",
        "replication slot",
        "conveyour reachable",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("ok ") && l.contains(name)),
            "no ok line for {name}:\n{out}"
        );
    }
    assert!(!out.contains("FAIL"));
    // The default replica identity is a warning, with the statement that
    // fixes it; warnings do not fail check.
    assert!(
        out.lines().any(
            |l| l.starts_with("WARN replica identity public.employees: ")
                && l.ends_with("run ALTER TABLE \"public\".\"employees\" REPLICA IDENTITY FULL;")
        ),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_each_problem_and_its_fix() {
    let w = world(
        "check_bad",
        &format!("{ROSTER_SQL} CREATE ROLE plain LOGIN;"),
    )
    .await;
    // A missing column, named by its config key.
    let config = w.config(
        &ROSTER_TABLES.replace("customer: customer", "customer: buyer"),
        "",
    );
    let (status, out, err) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert!(!status.success());
    assert!(
        out.contains("FAIL tables and columns: tables[1].track.properties.customer: column `buyer` does not exist in table public.sales"),
        "{out}"
    );
    assert_eq!(err.lines().count(), 1, "one-line reason on stderr: {err}");

    // A publication that lacks a mapped table, with the statement to run.
    w.db.exec(&format!(
        "CREATE PUBLICATION pub_{} FOR TABLE employees;",
        w.slot
    ))
    .await;
    let (status, out, _) = run_cli(&["check", "--config", CONFIG], &w.roster_config(), &[]);
    assert!(!status.success());
    assert!(
        out.contains(&format!(
            "ALTER PUBLICATION \"pub_{}\" ADD TABLE \"public\".\"sales\"",
            w.slot
        )),
        "{out}"
    );

    // A role that may not replicate or read.
    let url = w.db.url().replacen("postgres@", "plain@", 1);
    let (status, out, _) = run_cli(
        &["check", "--config", CONFIG],
        &w.config_with_url(&url, ROSTER_TABLES, ""),
        &[],
    );
    assert!(!status.success());
    assert!(
        out.contains("FAIL replication privilege")
            && out.contains("ALTER ROLE \"plain\" REPLICATION"),
        "{out}"
    );
    assert!(
        out.contains("FAIL connector schema") && out.contains("sql/setup.sql"),
        "{out}"
    );
    assert!(
        out.contains("FAIL read public.employees") && out.contains("GRANT SELECT"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_port_says_the_connection_was_refused() {
    let w = world("wrong_port", ROSTER_SQL).await;
    // A port nothing listens on: bound once, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/{}", w.db.name());
    let (status, out, err) = run_cli(
        &["check", "--config", CONFIG],
        &w.config_with_url(&url, ROSTER_TABLES, ""),
        &[],
    );
    assert!(!status.success(), "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "FAIL server reachable: cannot connect to 127.0.0.1:{port}: connection refused; is the server running, and is postgres.url's port right?"
        )),
        "{out}"
    );
    // `status` opens its session the same way, and says the same.
    let (status, _, err) = run_cli(
        &["status", "--config", CONFIG],
        &w.config_with_url(&url, ROSTER_TABLES, ""),
        &[],
    );
    assert!(!status.success());
    assert!(
        err.contains(&format!(
            "cannot connect to 127.0.0.1:{port}: connection refused"
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_misspelled_table_is_said_not_to_exist_not_to_be_added() {
    let w = world("table_typo", ROSTER_SQL).await;
    w.db.exec(&format!(
        "CREATE PUBLICATION pub_{} FOR TABLE employees, sales;",
        w.slot
    ))
    .await;
    let config = w.config(
        &ROSTER_TABLES.replace("table: public.employees", "table: public.employes"),
        "",
    );
    let (status, out, err) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "{out}\n{err}");
    assert!(
        out.contains("FAIL tables and columns: tables[0].table: table public.employes does not exist (or this role cannot see it); did you mean public.employees?"),
        "{out}"
    );
    // No line offers to add the misspelled table to the publication.
    assert!(!out.contains("ALTER PUBLICATION"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_refuses_a_publication_that_lacks_a_mapped_table() {
    let w = world("pub_lacks", ROSTER_SQL).await;
    w.db.exec(&format!(
        "CREATE PUBLICATION pub_{} FOR TABLE employees;",
        w.slot
    ))
    .await;
    let (status, _, err) = run_cli(&["run", "--config", CONFIG], &w.roster_config(), &[]);
    assert!(!status.success());
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("lacks public.sales"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_refuses_a_slot_of_another_plugin() {
    if crate::support::pg::skip_without_module("test_decoding") {
        return;
    }
    let w = world("slot_plugin", ROSTER_SQL).await;
    w.db.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{}', 'test_decoding');",
        w.slot
    ))
    .await;
    let (status, _, err) = run_cli(&["run", "--config", CONFIG], &w.roster_config(), &[]);
    assert!(!status.success());
    assert!(
        err.contains("test_decoding") && err.contains("not pgoutput"),
        "{err}"
    );
}

#[test]
fn bad_configs_are_refused_before_connecting_with_the_key_named() {
    // Port 1 would refuse a connection; a config error must come first.
    let base = format!(
        "postgres:\n  url: postgres://cdc:pw-hunter2@127.0.0.1:1/app\nconveyour:\n  url: http://127.0.0.1:1\n  appkey: k\n  token: {TOKEN}\n{ROSTER_TABLES}"
    );
    let cases: Vec<(String, &str)> = vec![
        (
            base.replace("  appkey: k\n", "  appkey: k\n  colour: blue\n"),
            "unknown field `colour`",
        ),
        (
            base.replace("      event: made_sale\n", ""),
            "tables[1].track: missing field `event`",
        ),
        (
            base.replace("table: public.sales", "table: public.employees"),
            "tables[1].table: public.employees is already mapped",
        ),
        (
            base.replace(
                "properties: {amount: amount, customer: customer}",
                &format!(
                    "properties: {{{}}}",
                    (0..16)
                        .map(|i| format!("p{i}: c{i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            "tables[1].track.properties: 16 properties",
        ),
        (
            base.replace(
                "  appkey: k\n",
                "  appkey: k\n  ca_file: /nonexistent/conveyour-ca.pem\n",
            ),
            "config conveyour.ca_file: cannot read /nonexistent/conveyour-ca.pem",
        ),
    ];
    for (yaml, needle) in cases {
        let (status, out, err) = run_cli(&["check", "--config", CONFIG], &yaml, &[]);
        assert!(!status.success(), "accepted:\n{yaml}");
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            !out.contains("server reachable"),
            "connected despite a bad config"
        );
        assert!(!err.contains("hunter2") && !err.contains(TOKEN));
    }
    let (status, out, _) = run_cli(&["check", "--config", CONFIG, "--config-only"], &base, &[]);
    assert!(status.success(), "{out}");
}

#[test]
fn a_missing_config_file_or_bad_yaml_gets_its_own_hint() {
    // No file at the path given.
    let (status, out, err) = run_cli(&["check", "--config", "no-such.yaml"], "", &[]);
    assert!(!status.success());
    assert!(
        err.starts_with("error: no config file at no-such.yaml (relative to "),
        "{err}"
    );
    assert!(
        err.contains("(hint: pass the config file's path with --config"),
        "{err}"
    );
    assert!(!err.contains("config key"), "{err}");
    assert!(!out.contains("server reachable"), "{out}");

    // A YAML syntax error: an unclosed flow mapping on line 3.
    let yaml = "postgres:\n  url: postgres://cdc@127.0.0.1:1/app\n  slot: {a: b\nconveyour:\n  url: http://127.0.0.1:1\n";
    let (status, _, err) = run_cli(&["check", "--config", CONFIG], yaml, &[]);
    assert!(!status.success());
    assert!(
        err.contains(": line ") && err.contains("not valid YAML"),
        "{err}"
    );
    assert!(
        err.contains("(hint: fix the YAML at the line and column named above"),
        "{err}"
    );
    assert!(!err.contains("config key"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["check", "--help"],
    ] {
        let (status, out, _) = run_cli(&args, "", &[]);
        assert!(status.success(), "{args:?}");
        assert!(out.contains("Usage: conveyour-cdc"), "{out}");
    }
}

#[test]
fn a_conveyour_url_ending_in_the_api_path_is_refused_by_every_command() {
    // Port 1 would refuse a connection; the config error must come first.
    for path in [
        "/api/analytics",
        "/api/analytics/",
        "/api/analytics/identify",
    ] {
        let yaml = format!(
            "postgres:\n  url: postgres://cdc@127.0.0.1:1/app\nconveyour:\n  url: http://127.0.0.1:1{path}\n  appkey: k\n  token: {TOKEN}\n{ROSTER_TABLES}"
        );
        for command in ["check", "run", "preview"] {
            let (status, out, err) = run_cli(&[command, "--config", CONFIG], &yaml, &[]);
            assert!(!status.success(), "{command} accepted {path}:\n{out}");
            assert_eq!(err.lines().count(), 1, "{command} {path}: {err}");
            assert!(
                err.contains("config conveyour.url: ")
                    && err.contains("the account's base URL: http://127.0.0.1:1 "),
                "{command} {path}: {err}"
            );
        }
        let (status, _, err) = run_cli(&["check", "--config", CONFIG, "--config-only"], &yaml, &[]);
        assert!(!status.success() && err.contains("conveyour.url"), "{err}");
    }
}

/// The `conveyour identify` line of `check --probe-id` with this config.
fn probe_line(config: &str, env: &[(&str, &str)]) -> (bool, String) {
    let (status, out, err) = run_cli(
        &["check", "--config", CONFIG, "--probe-id", "probe@x.test"],
        config,
        env,
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok   conveyour reachable: ")),
        "{out}\n{err}"
    );
    let line = out
        .lines()
        .find(|l| l.contains(" conveyour identify: "))
        .unwrap_or_else(|| panic!("no conveyour identify line:\n{out}\n{err}"))
        .to_owned();
    assert!(
        !out.contains(TOKEN) && !err.contains(TOKEN) && !out.contains(APPKEY),
        "a secret leaked:\n{out}\n{err}"
    );
    (status.success(), line)
}

#[tokio::test(flavor = "multi_thread")]
async fn check_probe_id_sends_one_empty_identify_and_says_what_conveyour_answered() {
    let w = world("check_probe", ROSTER_SQL).await;
    let config = w.roster_config();

    // Without --probe-id nothing is posted.
    let (status, out, err) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert!(status.success(), "{out}\n{err}");
    assert!(
        out.contains(&format!("ok   conveyour reachable: {} answers", w.rx.url())),
        "{out}"
    );
    assert!(
        w.rx.requests().iter().all(|r| r.method != "POST"),
        "{}",
        w.rx.summary()
    );

    // Wrong credentials: named, never printed.
    w.rx.reset_records();
    let (ok, line) = probe_line(&config, &[("CONVEYOUR_TOKEN", "wrong-token-31")]);
    assert!(!ok, "{line}");
    assert!(
        line.starts_with("FAIL conveyour identify: HTTP 401: the app key or token is wrong (conveyour.appkey / conveyour.token"),
        "{line}"
    );
    assert!(!line.contains("wrong-token-31"), "{line}");
    assert_eq!(w.rx.identify_count(), 0);

    // The right ones: ok, and exactly that identify arrived.
    w.rx.reset_records();
    let (ok, line) = probe_line(&config, &[]);
    assert!(ok, "{line}");
    assert!(
        line.starts_with(
            "ok   conveyour identify: ConveYour accepted an identify of contact probe@x.test"
        ),
        "{line}"
    );
    assert_eq!(
        w.rx.identifies(),
        vec![serde_json::json!({"id": "probe@x.test", "traits": {}})]
    );
    let posts: Vec<_> =
        w.rx.requests()
            .into_iter()
            .filter(|r| r.method == "POST")
            .collect();
    assert_eq!(posts.len(), 1, "{}", w.rx.summary());
    assert_eq!(posts[0].endpoint, IDENTIFY_PATH);

    // A URL with a path ConveYour does not serve.
    let (ok, line) = probe_line(
        &config.replace(&w.rx.url(), &format!("{}/cy", w.rx.url())),
        &[],
    );
    assert!(!ok);
    assert!(
        line.contains("HTTP 404") && line.contains("conveyour.url points to the wrong place"),
        "{line}"
    );

    // 200 with an error body: ConveYour's message. Then a 503: busy.
    w.rx.set_fault(Fault::BodyError);
    let (ok, line) = probe_line(&config, &[]);
    assert!(!ok);
    assert!(
        line.contains("HTTP 200: ConveYour did not accept") && line.ends_with("injected"),
        "{line}"
    );
    w.rx.set_fault(Fault::Status(503));
    let (ok, line) = probe_line(&config, &[]);
    assert!(!ok);
    assert!(
        line.contains("ConveYour is unreachable or busy: HTTP 503"),
        "{line}"
    );
    w.rx.clear_fault();
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_conveyour_unreachable_with_the_cause() {
    let w = world("check_cy_down", ROSTER_SQL).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = w
        .roster_config()
        .replace(&w.rx.url(), &format!("http://127.0.0.1:{closed}"));
    let (status, out, err) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert_eq!(status.code(), Some(1), "{out}\n{err}");
    // The database checks still ran and passed.
    assert!(out.contains("ok   replication connection"), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("conveyour reachable"))
        .unwrap_or_else(|| panic!("no conveyour line:\n{out}"));
    assert!(
        line.starts_with(&format!(
            "FAIL conveyour reachable: conveyour.url http://127.0.0.1:{closed}: could not connect"
        )) && line.to_lowercase().contains("connection refused"),
        "{line}"
    );
    assert!(
        err.contains("1 check(s) failed: conveyour reachable"),
        "{err}"
    );

    // The probe needs a reachable URL; it is left out, not a second failure.
    let (status, out, err) = run_cli(
        &["check", "--config", CONFIG, "--probe-id", "probe@x.test"],
        &config,
        &[],
    );
    assert_eq!(status.code(), Some(1), "{out}\n{err}");
    assert!(out.contains("FAIL conveyour reachable"), "{out}");
    assert!(!out.contains("conveyour identify"), "{out}");
}
