//! What an operator sees: `/metrics` agrees with what ConveYour actually
//! received, health endpoints answer, logs are JSON on request and never
//! hold a secret.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::connector::Connector;
use crate::support::receiver::Fault;
use crate::support::setup::{world, ROSTER_SQL, TOKEN};

/// The metrics address the connector logged at startup.
pub(crate) async fn metrics_addr(conn: &Connector) -> String {
    conn.wait_for_log(
        "metrics and health checks listening",
        Duration::from_secs(60),
    )
    .await;
    let log = conn.log();
    let line = log
        .lines()
        .find(|l| l.contains("metrics and health checks listening"))
        .unwrap();
    let start = line.find("127.0.0.1:").expect("address in the log line");
    line[start..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .next()
        .unwrap()
        .to_owned()
}

pub(crate) async fn get(addr: &str, path: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("GET");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Samples as `name{labels}` → value.
pub(crate) fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn sample(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {m:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_match_what_conveyour_received() {
    let w = world("metrics", ROSTER_SQL).await;
    let conn = Connector::run(&w.roster_config(), &[]);
    let addr = metrics_addr(&conn).await;
    w.wait_streaming(Duration::from_secs(60)).await;
    // Some 503s first, so retries show.
    w.rx.set_fault(Fault::StatusTimes(503, 3));
    w.db.exec(
        "INSERT INTO employees (email, first_name) SELECT 'o' || g || '@x.test', 'F' FROM generate_series(1, 1200) g;
         UPDATE employees SET last_name = 'L' WHERE id <= 100;
         INSERT INTO sales (employee_email, amount, customer) SELECT 'o' || g || '@x.test', g, 'c' FROM generate_series(1, 30) g;",
    )
    .await;
    let end = w.db.wal_lsn().await;
    w.rx.wait_until("all changes", Duration::from_secs(60), |r| {
        r.identify_count() >= 1300 && r.track_count() >= 30
    })
    .await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (status, text) = get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    let m = parse(&text);
    let requests = w.rx.requests();
    let accepted = |endpoint: &str| {
        requests
            .iter()
            .filter(|r| r.accepted && r.endpoint.ends_with(endpoint))
            .count() as f64
    };
    assert_eq!(
        sample(&m, "conveyour_cdc_identify_entries_acknowledged_total"),
        w.rx.identify_count() as f64
    );
    assert_eq!(
        sample(&m, "conveyour_cdc_track_events_acknowledged_total"),
        w.rx.track_count() as f64
    );
    assert_eq!(
        sample(
            &m,
            r#"conveyour_cdc_requests_total{endpoint="identify",outcome="ok"}"#
        ),
        accepted("/identify")
    );
    assert_eq!(
        sample(
            &m,
            r#"conveyour_cdc_requests_total{endpoint="track",outcome="ok"}"#
        ),
        accepted("/track")
    );
    let refused = requests.iter().filter(|r| r.response_status == 503).count() as f64;
    assert_eq!(refused, 3.0);
    let retried = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("conveyour_cdc_requests_total{") && k.contains(r#"outcome="retried""#)
        })
        .map(|(_, v)| v)
        .sum::<f64>();
    assert_eq!(retried, refused);
    assert_eq!(
        sample(
            &m,
            r#"conveyour_cdc_changes_received_total{op="insert",table="public.employees"}"#
        ),
        1200.0
    );
    assert_eq!(
        sample(
            &m,
            r#"conveyour_cdc_changes_received_total{op="update",table="public.employees"}"#
        ),
        100.0
    );
    assert_eq!(
        sample(
            &m,
            r#"conveyour_cdc_changes_received_total{op="insert",table="public.sales"}"#
        ),
        30.0
    );
    assert_eq!(sample(&m, "conveyour_cdc_connected"), 1.0);
    assert!(sample(&m, "conveyour_cdc_confirmed_lsn") >= end as f64);
    assert_eq!(sample(&m, "conveyour_cdc_buffered_actions"), 0.0);
    assert_eq!(sample(&m, "conveyour_cdc_in_flight_requests"), 0.0);
    assert_eq!(sample(&m, "conveyour_cdc_lag_seconds"), 0.0);
    assert!(m.contains_key(r#"conveyour_cdc_build_info{version="0.1.0"}"#));
    assert!(m
        .keys()
        .any(|k| k
            .starts_with("conveyour_cdc_request_duration_seconds_bucket{endpoint=\"identify\"")));
    for name in [
        "lag_bytes",
        "received_lsn",
        "backoff_seconds",
        "slot_retained_wal_bytes",
        "snapshot_rows_total",
        "snapshot_tables_remaining",
        "snapshot_rows_estimate",
        "snapshot_eta_seconds",
        "dead_letters_total",
    ] {
        assert!(
            m.contains_key(&format!("conveyour_cdc_{name}")),
            "missing {name}"
        );
    }
    // No label carries a contact id or a row value.
    assert!(!text.contains("@x.test") && !text.contains(TOKEN));

    assert_eq!(get(&addr, "/healthz").await.0, 200);
    assert_eq!(get(&addr, "/readyz").await.0, 200);
    assert_eq!(get(&addr, "/nope").await.0, 404);
    drop(conn);
}

/// A bulk load is read in batches (a busy stream gathers in the socket
/// instead of waking the reader per change), and the change after it still
/// comes through at once: the reader does not wait for a batch that never
/// fills.
#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_load_is_read_in_batches_and_the_change_after_it_is_not_held_back() {
    const ROWS: usize = 50_000;
    let w = world("batches", ROSTER_SQL).await;
    let conn = Connector::run(&w.roster_config(), &[]);
    let addr = metrics_addr(&conn).await;
    w.wait_streaming(Duration::from_secs(60)).await;
    w.rx.set_keep_bodies(false);
    w.db.exec(&format!(
        "INSERT INTO employees (email, first_name) SELECT 'b' || g || '@x.test', 'F' FROM generate_series(1, {ROWS}) g"
    ))
    .await;
    w.rx.wait_until("the bulk load", Duration::from_secs(120), |r| {
        r.identify_count() >= ROWS
    })
    .await;
    let m = parse(&get(&addr, "/metrics").await.1);
    let batched = sample(&m, r#"conveyour_cdc_stream_reads_total{wait="batch"}"#);
    let single = sample(&m, r#"conveyour_cdc_stream_reads_total{wait="change"}"#);
    assert!(
        batched > 0.0,
        "{ROWS} inserts in one statement should make the stream busy enough to read in batches ({single} reads woke per change)"
    );

    // The stream is quiet again: one more change must not sit in the
    // socket waiting for company.
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('after@x.test', 'After')")
        .await;
    w.rx.wait_until("the change after the load", Duration::from_secs(20), |r| {
        r.contact("after@x.test").is_some()
    })
    .await;
    assert_eq!(w.rx.identify_count(), ROWS + 1, "{}", w.rx.summary());
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_parse_and_never_hold_secrets() {
    let w = world("jsonlogs", ROSTER_SQL).await;
    let pg_password = crate::support::pg::password_for("scram_user");
    w.db.exec(&format!(
        "GRANT SELECT ON employees, sales TO scram_user; GRANT CREATE ON DATABASE \"{}\" TO scram_user;
         CREATE PUBLICATION pub_{} FOR TABLE employees, sales;",
        w.db.name(),
        w.slot
    ))
    .await;
    let url = format!("{}?sslmode=disable", w.db.url_as("scram_user"));
    let conn = Connector::spawn(
        &["run", "--config", "{config}", "--log-format", "json"],
        &w.config_with_url(&url, crate::support::setup::ROSTER_TABLES, ""),
        &[("CONVEYOUR_CDC_LOG", "debug")],
    );
    w.wait_streaming(Duration::from_secs(60)).await;
    w.rx.set_fault(Fault::StatusTimes(500, 2));
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('j@x.test', 'J');")
        .await;
    w.rx.wait_until("the identify", Duration::from_secs(60), |r| {
        r.identify_count() == 1
    })
    .await;
    conn.sigterm();
    assert!(conn.wait(Duration::from_secs(60)).await.success());
    let log = conn.log();
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines >= 3, "{log}");
    assert!(
        log.contains("will retry"),
        "retries should be logged: {log}"
    );
    for secret in [TOKEN, crate::support::setup::APPKEY, pg_password.as_str()] {
        assert!(!log.contains(secret), "secret {secret} leaked into the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_the_slot_and_publication_as_text_and_json() {
    use crate::support::connector::{run_cli, CONFIG_PLACEHOLDER as CONFIG};
    let w = world("status", ROSTER_SQL).await;
    let config = w.roster_config();
    let (status, out, err) = run_cli(&["status", "--config", CONFIG], &config, &[]);
    assert!(status.success(), "{err}");
    assert!(
        out.contains(&format!("slot {}: does not exist", w.slot)),
        "{out}"
    );

    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec("INSERT INTO employees (email) VALUES ('s@x.test');")
        .await;
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;

    let (status, out, _) = run_cli(&["status", "--config", CONFIG], &config, &[]);
    assert!(status.success());
    assert!(out.contains(&format!("slot {}: active", w.slot)), "{out}");
    assert!(out.contains("public.employees, public.sales"), "{out}");

    let (status, out, _) = run_cli(&["status", "--config", CONFIG, "--json"], &config, &[]);
    assert!(status.success());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["slot"]["exists"], true);
    assert_eq!(v["slot"]["active"], true);
    assert_eq!(v["slot"]["plugin"], "pgoutput");
    assert_eq!(v["slot"]["wal_status"], "reserved");
    let confirmed =
        crate::support::pg::parse_lsn(v["slot"]["confirmed_flush_lsn"].as_str().unwrap()).unwrap();
    assert!(confirmed >= end);
    assert_eq!(v["publication"]["missing"], serde_json::json!([]));
    drop(conn);
}
