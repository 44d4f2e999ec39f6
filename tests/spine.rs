//! The spine end to end: rows in a real Postgres become exactly the right
//! identify and track bodies at the strict receiver, and the slot's
//! position moves only after acknowledgement.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::connector::Connector;
use crate::support::setup::{world, ROSTER_SQL, TOKEN};

const TYPES_SQL: &str = r#"
    CREATE TYPE mood AS ENUM ('happy', 'sad');
    CREATE DOMAIN score AS int4;
    CREATE TABLE people (
        email text PRIMARY KEY,
        b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
        n_exact numeric, n_wide numeric, t text, vc varchar(20), c char(4),
        d date, ts timestamp, tstz timestamptz, u uuid,
        j_obj json, j_arr jsonb, j_num jsonb,
        ints int[], texts text[], m mood, s score, nothing text, big text,
        f_nan float8
    );
    -- Out of line and uncompressed, so an update that leaves it alone sends
    -- it as an unchanged TOAST value.
    ALTER TABLE people ALTER COLUMN big SET STORAGE EXTERNAL;
"#;

const TYPES_TABLES: &str = "
tables:
  - table: people
    identify:
      id: email
      traits: {b: b, i2: i2, i4: i4, i8: i8, f4: f4, f8: f8, n_exact: n_exact, n_wide: n_wide,
               t: t, vc: vc, c: c, d: d, ts: ts, tstz: tstz, u: u, j_obj: j_obj, j_arr: j_arr,
               j_num: j_num, ints: ints, texts: texts, m: m, s: s, nothing: nothing, big: big, f_nan: f_nan}
";

#[tokio::test(flavor = "multi_thread")]
async fn every_value_type_becomes_the_documented_json() {
    let w = world("types", TYPES_SQL).await;
    let conn = Connector::run(&w.config(TYPES_TABLES, ""), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;

    let big = "x".repeat(3_000);
    w.db.exec(&format!(
        r#"INSERT INTO people VALUES (
            'ann@example.com', true, -32768, 2147483647, 9223372036854775807, 1.5, -2.25e-5,
            1000.50, 12345678901234567890.123, 'héllo "q"', 'vc', 'ab',
            '2024-01-31', '2024-01-31 10:00:00.123', '2024-01-31 12:00:00+02', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '{{"a": 1}}', '[1, "two", null]', '42',
            '{{1,2,NULL}}', '{{"a,b","c\"d",NULL,"NULL"}}', 'happy', 7, NULL, '{big}', 'NaN'
        );
        UPDATE people SET t = 'changed' WHERE email = 'ann@example.com';"#
    ))
    .await;

    w.rx.wait_until("two identify entries", Duration::from_secs(60), |r| {
        r.identify_count() >= 2
    })
    .await;
    let ids = w.rx.identifies();
    let expected_insert = json!({
        "id": "ann@example.com",
        "traits": {
            "b": true, "i2": -32768, "i4": 2147483647, "i8": 9223372036854775807i64,
            "f4": 1.5, "f8": -2.25e-5, "n_exact": 1000.5, "n_wide": "12345678901234567890.123",
            "t": "héllo \"q\"", "vc": "vc", "c": "ab  ", "d": "2024-01-31",
            "ts": "2024-01-31T10:00:00.123", "tstz": "2024-01-31T10:00:00Z",
            "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "j_obj": "{\"a\": 1}", "j_arr": [1, "two", null], "j_num": 42,
            "ints": [1, 2, null], "texts": ["a,b", "c\"d", null, "NULL"],
            "m": "happy", "s": 7, "nothing": null, "big": big, "f_nan": "NaN"
        }
    });
    assert_eq!(ids[0], expected_insert);
    // The update leaves the unchanged TOASTed `big` out instead of sending
    // it as null or empty.
    let mut expected_update = expected_insert.clone();
    expected_update["traits"]["t"] = json!("changed");
    expected_update["traits"]
        .as_object_mut()
        .unwrap()
        .remove("big");
    assert_eq!(ids[1], expected_update);
    assert_eq!(ids.len(), 2, "{ids:?}");

    // Headers of every request as the contract asks.
    for r in w.rx.requests() {
        assert_eq!(r.endpoint, "/api/analytics/identify");
        assert_eq!(
            r.header("x-conveyour-appkey"),
            Some(crate::support::setup::APPKEY)
        );
        assert_eq!(r.header("x-conveyour-token"), Some(TOKEN));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r.idempotency_key.is_some());
    }
    conn.sigterm();
    assert!(
        conn.wait(Duration::from_secs(60)).await.success(),
        "{}",
        conn.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn insert_update_and_sale_reach_conveyour_and_the_position_follows() {
    let w = world("roster", ROSTER_SQL).await;
    let conn = Connector::run(&w.roster_config(), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;

    w.db.exec(
        "INSERT INTO employees (email, first_name, last_name, career_sales) VALUES ('jill@acme.test', 'Jill', 'Hill', 500000);
         BEGIN;
         INSERT INTO sales (employee_email, amount, customer) VALUES ('jill@acme.test', 1000, 'John Doe');
         UPDATE employees SET career_sales = 501000 WHERE email = 'jill@acme.test';
         COMMIT;
         UPDATE employees SET first_name = 'Jillian' WHERE email = 'jill@acme.test';",
    )
    .await;
    let end = w.db.wal_lsn().await;

    w.rx.wait_until("3 identifies and 1 track", Duration::from_secs(60), |r| {
        r.identify_count() >= 3 && r.track_count() >= 1
    })
    .await;
    assert_eq!(
        w.rx.identifies(),
        vec![
            json!({"id": "jill@acme.test", "traits": {"first_name": "Jill", "last_name": "Hill", "career_sales": 500000}}),
            json!({"id": "jill@acme.test", "traits": {"first_name": "Jill", "last_name": "Hill", "career_sales": 501000}}),
            json!({"id": "jill@acme.test", "traits": {"first_name": "Jillian", "last_name": "Hill", "career_sales": 501000}}),
        ]
    );
    assert_eq!(
        w.rx.tracks(),
        vec![(
            "jill@acme.test".to_owned(),
            json!({"event": "made_sale", "properties": {"amount": 1000, "customer": "John Doe"}})
        )]
    );
    let track_request =
        w.rx.requests()
            .into_iter()
            .find(|r| r.endpoint == "/api/analytics/track")
            .unwrap();
    assert_eq!(
        track_request.body,
        json!({"id": "jill@acme.test", "events": [{"event": "made_sale", "properties": {"amount": 1000, "customer": "John Doe"}}]})
    );
    assert!(
        w.rx.orphan_tracks().is_empty(),
        "{:?}",
        w.rx.orphan_tracks()
    );
    assert_eq!(
        w.rx.contact("jill@acme.test").unwrap().get("first_name"),
        Some(&Value::from("Jillian"))
    );
    w.wait_confirmed(end, Duration::from_secs(60)).await;

    conn.sigterm();
    let status = conn.wait(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "SIGTERM should exit 0: {status:?}\n{}",
        conn.log()
    );
    assert!(!conn.log().contains(TOKEN), "the token leaked into the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_slot_follows_the_server_while_unmapped_tables_take_writes() {
    let w = world(
        "idle",
        &format!("{ROSTER_SQL} CREATE TABLE audit_log (id serial, note text);"),
    )
    .await;
    let conn = Connector::run(&w.roster_config(), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    let before = w.confirmed().await;
    for i in 0..20 {
        w.db.exec(&format!(
            "INSERT INTO audit_log (note) SELECT 'n{i}-' || g FROM generate_series(1, 500) g;"
        ))
        .await;
    }
    let end = w.db.wal_lsn().await;
    assert!(end > before);
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    assert_eq!(
        w.rx.request_count(),
        0,
        "nothing mapped changed, nothing should be sent"
    );
    conn.sigterm();
    assert!(conn.wait(Duration::from_secs(60)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_confirms_what_was_acknowledged_and_exits_zero() {
    let w = world("sigterm", ROSTER_SQL).await;
    let conn = Connector::run(&w.roster_config(), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec("INSERT INTO employees (email, first_name) SELECT 'e' || g || '@x.test', 'n' FROM generate_series(1, 2000) g;")
        .await;
    let end = w.db.wal_lsn().await;
    w.rx.wait_until("2000 identifies", Duration::from_secs(60), |r| {
        r.identify_count() >= 2000
    })
    .await;
    conn.sigterm();
    let status = conn.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}\n{}", conn.log());
    // The final status update carried the acknowledged position.
    assert!(
        w.confirmed().await >= end,
        "position not confirmed at shutdown"
    );
    assert!(!w.db.slot_active(&w.slot).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn coalescing_folds_a_contacts_updates_within_a_batch_window() {
    let w = world("coalesce", ROSTER_SQL).await;
    let config = w.config(crate::support::setup::ROSTER_TABLES, "  coalesce: true\n");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    let mut sql = String::from(
        "INSERT INTO employees (email, first_name, career_sales) VALUES ('c@x.test', 'C', 0);",
    );
    for i in 1..=20 {
        sql.push_str(&format!(
            "UPDATE employees SET career_sales = {i} WHERE email = 'c@x.test';"
        ));
    }
    w.db.exec(&sql).await;
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    let entries = w.rx.identifies();
    assert!(
        entries.len() < 21,
        "21 identifies within one window should fold: {}",
        entries.len()
    );
    assert_eq!(
        entries.last().unwrap()["traits"]["career_sales"],
        json!(20),
        "the last value wins"
    );
    assert_eq!(w.rx.contact("c@x.test").unwrap()["career_sales"], json!(20));
    drop(conn);
}

/// A backlog (commits that stream well after they happened) goes out in
/// full batches rather than a request per transaction, its end is not held
/// for `batch_wait_ms`, and a live change after it is sent at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_goes_out_in_full_batches_and_its_end_is_not_held_back() {
    const TXNS: usize = 40;
    // Not a multiple of the batch size: the last batch is sent by the
    // stream going quiet.
    const ROWS: usize = 49;
    let w = world("backlog", ROSTER_SQL).await;
    // A minute's batch wait: only the stream going quiet can send a batch
    // that is not full within this test's waits.
    let config = w
        .config(
            crate::support::setup::ROSTER_TABLES,
            "  batch_size: 500\n  max_in_flight: 1\n",
        )
        .replace("batch_wait_ms: 50", "batch_wait_ms: 60000");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    conn.stop().await;

    // Committed while the connector is down: a backlog when it returns.
    let mut sql = String::new();
    for t in 0..TXNS {
        sql.push_str(&format!(
            "BEGIN; INSERT INTO employees (email, first_name) SELECT 'k{t}-' || g || '@x.test', 'K' FROM generate_series(1, {ROWS}) g; COMMIT;"
        ));
    }
    w.db.exec(&sql).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let conn = Connector::run(&config, &[]);
    w.rx.wait_until("the backlog", Duration::from_secs(30), |r| {
        r.identify_count() >= TXNS * ROWS
    })
    .await;
    let requests = w.rx.request_count();
    assert!(
        requests <= TXNS / 4,
        "{} rows in {TXNS} transactions, batch_size 500, max_in_flight 1: {requests} requests, expected full batches rather than one per transaction",
        TXNS * ROWS
    );

    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('live@x.test', 'L')")
        .await;
    w.rx.wait_until("the live change", Duration::from_secs(20), |r| {
        r.contact("live@x.test").is_some()
    })
    .await;
    assert_eq!(w.rx.identify_count(), TXNS * ROWS + 1, "{}", w.rx.summary());
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_that_change_no_mapped_column_send_nothing_when_the_old_row_is_known() {
    let w = world(
        "noop",
        &format!(
            "{ROSTER_SQL}
             ALTER TABLE employees ADD COLUMN last_login_ip text;
             ALTER TABLE employees REPLICA IDENTITY FULL;"
        ),
    )
    .await;
    let conn = Connector::run(&w.roster_config(), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec(
        "INSERT INTO employees (email, first_name) VALUES ('n@x.test', 'N');
         UPDATE employees SET last_login_ip = '10.0.0.1' WHERE email = 'n@x.test';
         UPDATE employees SET last_login_ip = '10.0.0.2' WHERE email = 'n@x.test';",
    )
    .await;
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    assert_eq!(
        w.rx.identify_count(),
        1,
        "only the insert: {:?}",
        w.rx.identifies()
    );

    w.db.exec("UPDATE employees SET first_name = 'Nora', last_login_ip = '10.0.0.3' WHERE email = 'n@x.test';")
        .await;
    w.rx.wait_until("the mapped change", Duration::from_secs(60), |r| {
        r.identify_count() == 2
    })
    .await;
    assert_eq!(w.rx.identifies()[1]["traits"]["first_name"], json!("Nora"));

    // Without the old row (REPLICA IDENTITY DEFAULT) the update is sent.
    w.db.exec(
        "ALTER TABLE employees REPLICA IDENTITY DEFAULT;
         UPDATE employees SET last_login_ip = '10.0.0.4' WHERE email = 'n@x.test';",
    )
    .await;
    w.rx.wait_until(
        "the update without an old row",
        Duration::from_secs(60),
        |r| r.identify_count() == 3,
    )
    .await;
    drop(conn);
}
