//! Entries ConveYour rejects for good are found by halving the batch,
//! stored in the dead-letter table, and the stream goes on; the CLI lists,
//! re-sends and purges them.

use std::time::Duration;

use crate::support::connector::{run_cli, Connector, CONFIG_PLACEHOLDER as CONFIG};
use crate::support::receiver::Fault;
use crate::support::setup::{world, ROSTER_SQL, ROSTER_TABLES};

#[tokio::test(flavor = "multi_thread")]
async fn a_poisoned_row_is_dead_lettered_and_the_rest_goes_through() {
    let w = world("dead_letter", ROSTER_SQL).await;
    let config = w.config(ROSTER_TABLES, "  batch_size: 50\n  max_in_flight: 1\n");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.rx.set_fault(Fault::RejectId("poison@x.test".into()));
    // One transaction of 40 rows with the poisoned one in the middle.
    w.db.exec(
        "INSERT INTO employees (email, first_name)
         SELECT CASE WHEN g = 23 THEN 'poison@x.test' ELSE 'd' || g || '@x.test' END, 'N' || g
         FROM generate_series(1, 40) g;",
    )
    .await;
    let end = w.db.wal_lsn().await;
    w.rx.wait_until("the 39 good rows", Duration::from_secs(60), |r| {
        r.contact_count() == 39
    })
    .await;
    // The position moves past the poisoned row once it is stored.
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    assert!(
        conn.is_running(),
        "dead-lettering must not stop the connector\n{}",
        conn.log()
    );
    assert!(w.rx.contact("poison@x.test").is_none());

    let row = w
        .db
        .client()
        .await
        .query_one(
            "SELECT endpoint, source_table, contact, lsn::text, payload::text, status, message, attempts, slot
               FROM conveyour_cdc.dead_letters",
            &[],
        )
        .await
        .expect("exactly one dead letter");
    assert_eq!(row.get::<_, String>(0), "identify");
    assert_eq!(row.get::<_, String>(1), "public.employees");
    assert_eq!(row.get::<_, String>(2), "poison@x.test");
    assert!(row.get::<_, String>(3).contains('/'));
    let payload: serde_json::Value = serde_json::from_str(&row.get::<_, String>(4)).unwrap();
    assert_eq!(
        payload,
        serde_json::json!([{"id": "poison@x.test", "traits": {"first_name": "N23", "last_name": null, "career_sales": null}}])
    );
    assert_eq!(row.get::<_, i32>(5), 400);
    assert!(!row.get::<_, String>(6).is_empty());
    assert!(row.get::<_, i32>(7) >= 1);
    assert_eq!(row.get::<_, String>(8), w.slot);

    // The CLI shows it, re-sends it once the cause is gone, and purges.
    let (status, out, _) = run_cli(&["dead-letters", "list", "--config", CONFIG], &config, &[]);
    assert!(status.success());
    assert!(
        out.contains("poison@x.test")
            && out.contains("public.employees")
            && out.contains("HTTP 400"),
        "{out}"
    );
    let (status, _, _) = run_cli(&["dead-letters", "retry", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "still rejected: retry must say so");
    w.rx.clear_fault();
    let (status, out, err) = run_cli(&["dead-letters", "retry", "--config", CONFIG], &config, &[]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("delivered 1"), "{out}");
    assert!(w.rx.contact("poison@x.test").is_some());
    let (_, out, _) = run_cli(
        &["dead-letters", "list", "--config", CONFIG, "--json"],
        &config,
        &[],
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!([])
    );

    w.rx.set_fault(Fault::RejectId("poison2@x.test".into()));
    w.db.exec("INSERT INTO employees (email) VALUES ('poison2@x.test');")
        .await;
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    let (status, out, _) = run_cli(&["dead-letters", "purge", "--config", CONFIG], &config, &[]);
    assert!(status.success());
    assert!(out.contains("deleted 1"), "{out}");
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_credentials_stop_the_connector_instead_of_dead_lettering() {
    let w = world("bad_token", ROSTER_SQL).await;
    let config = w
        .roster_config()
        .replace(crate::support::setup::TOKEN, "wrong-token");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec("INSERT INTO employees (email) VALUES ('a@x.test');")
        .await;
    let status = conn.wait(Duration::from_secs(60)).await;
    assert!(!status.success());
    assert!(
        conn.log().contains("HTTP 401") && conn.log().contains("conveyour.token"),
        "{}",
        conn.log()
    );
    let n =
        w.db.query_i64("SELECT count(*) FROM conveyour_cdc.dead_letters")
            .await;
    assert_eq!(
        n, 0,
        "a credentials problem must not fill the dead-letter table"
    );
}

/// Writes `rows` rows in one transaction with `fill_sql`, kills the
/// connector once `kill_after` have arrived (replies are slowed so requests
/// are in flight), restarts it, and returns how many entries arrived twice.
/// Every row must arrive and the position reach the end.
async fn kill_mid_transaction(hint: &str, rows: usize, kill_after: usize, fill_sql: &str) -> usize {
    let w = world(hint, ROSTER_SQL).await;
    w.rx.set_keep_bodies(false);
    let config = w.config(
        ROSTER_TABLES,
        &format!("  batch_size: {KILL_BATCH}\n  max_in_flight: {KILL_LANES}\n"),
    );
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.rx.set_fault(Fault::Slow(Duration::from_millis(20)));
    w.db.exec(fill_sql).await;
    let end = w.db.wal_lsn().await;
    w.rx.wait_until("part of the transaction", Duration::from_secs(60), |r| {
        r.identify_count() >= kill_after
    })
    .await;
    conn.sigkill();
    conn.wait(Duration::from_secs(10)).await;
    let before_restart = w.rx.identify_count();
    w.rx.clear_fault();
    let conn = Connector::run(&config, &[]);
    w.rx.wait_until("every row", Duration::from_secs(120), |r| {
        r.contact_count() >= rows
    })
    .await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    drop(conn);
    let duplicates = w.rx.identify_count() - rows;
    eprintln!("{hint}: kill after {before_restart} of {rows} rows of one transaction: {duplicates} entries sent twice");
    duplicates
}

const KILL_BATCH: usize = 100;
const KILL_LANES: usize = 2;
/// In flight at a kill: each lane's current flush.
const KILL_BOUND: usize = 2 * KILL_LANES * KILL_BATCH;

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_mid_transaction_resends_at_most_what_was_in_flight() {
    let rows = 20_000;
    let fill = format!(
        "INSERT INTO employees (email, first_name) SELECT 'k' || g || '@x.test', 'x' FROM generate_series(1, {rows}) g;"
    );
    let duplicates = kill_mid_transaction("dup_bound", rows, 5_000, &fill).await;
    assert!(
        duplicates <= KILL_BOUND,
        "{duplicates} duplicates, bound {KILL_BOUND}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_during_a_copy_loses_no_row_of_a_multi_insert_record() {
    // COPY writes many rows per WAL record, so rows share an LSN: recorded
    // progress must tell them apart, or a restart would skip undelivered
    // ones (kill_mid_transaction waits for every row).
    let rows = 3_000;
    let fill = format!(
        "COPY employees (email, first_name) FROM PROGRAM 'seq 1 {rows} | sed -e \"s/.*/c&@x.test,n/\"' WITH (FORMAT csv);"
    );
    let duplicates = kill_mid_transaction("copy_kill", rows, 800, &fill).await;
    assert!(
        duplicates <= KILL_BOUND,
        "{duplicates} duplicates, bound {KILL_BOUND}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_recorded_on_another_cluster_is_ignored() {
    // A dump restored elsewhere carries conveyour_cdc.progress with
    // positions of another history; they must not make the reader skip.
    let w = world("foreign_progress", ROSTER_SQL).await;
    let config = w.roster_config();
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    conn.sigterm();
    assert!(conn.wait(Duration::from_secs(60)).await.success());
    w.db.exec(&format!(
        "INSERT INTO conveyour_cdc.progress (slot, lane, lanes, system_id, commit_lsn, change)
         SELECT '{}', g, 4, 'another-cluster', 'FFFFFFFF/0', 1000000 FROM generate_series(0, 3) g;",
        w.slot
    ))
    .await;
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec(
        "INSERT INTO employees (email) SELECT 'f' || g || '@x.test' FROM generate_series(1, 20) g;",
    )
    .await;
    w.rx.wait_until(
        "every row despite the foreign progress",
        Duration::from_secs(60),
        |r| r.contact_count() == 20,
    )
    .await;
    let left =
        w.db.query_i64(
            "SELECT count(*) FROM conveyour_cdc.progress WHERE system_id = 'another-cluster'",
        )
        .await;
    assert_eq!(left, 0, "foreign progress is tidied once the slot is held");
    drop(conn);
}
