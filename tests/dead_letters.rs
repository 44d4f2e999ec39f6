//! Entries ConveYour rejects for good are found by halving the batch,
//! stored in the dead-letter table, and the stream goes on; the CLI lists,
//! re-sends and purges them.

use std::time::Duration;

use crate::support::connector::{run_cli, Connector, CONFIG_PLACEHOLDER as CONFIG};
use crate::support::receiver::Fault;
use crate::support::setup::{world, HeldCommit, World, ROSTER_SQL, ROSTER_TABLES};

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
        &format!("  batch_size: {KILL_BATCH}\n  max_in_flight: {KILL_IN_FLIGHT}\n"),
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
const KILL_IN_FLIGHT: usize = 2;
/// What a kill may make repeat, with room to spare: delivery batches no
/// action more than `max_in_flight × batch_size` past the recorded mark.
const KILL_BOUND: usize = 2 * KILL_IN_FLIGHT * KILL_BATCH;

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

/// Waits until the dead-letter table holds `n` entries for the slot.
async fn wait_dead_letters(w: &crate::support::setup::World, n: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stored =
            w.db.query_i64("SELECT count(*) FROM conveyour_cdc.dead_letters")
                .await;
        if stored == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{stored} dead letters, waiting for {n}\nreceiver: {}",
            w.rx.summary()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn trait_of(w: &crate::support::setup::World, contact: &str, name: &str) -> Option<String> {
    w.rx.contact(contact)?
        .get(name)?
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_sends_the_rows_current_values_never_the_stale_rejected_ones() {
    let w = world("dead_letter_stale", ROSTER_SQL).await;
    // Automatic retries off: only the CLI retries here.
    let tables = format!("dead_letters:\n  retry_every_ms: 0\n{ROSTER_TABLES}");
    let config = w.config(&tables, "  max_in_flight: 2\n");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec(
        "INSERT INTO employees (email, first_name, last_name) VALUES
            ('ada@x.test', 'Ada', 'South'), ('bob@x.test', 'Bob', 'West');",
    )
    .await;
    w.rx.wait_until("both contacts", Duration::from_secs(60), |r| {
        r.contact_count() == 2
    })
    .await;

    // An update of each is rejected and stored.
    for who in ["ada", "bob"] {
        w.rx.set_fault(Fault::RejectId(format!("{who}@x.test")));
        w.db.exec(&format!(
            "UPDATE employees SET first_name = 'POISON', last_name = 'East' WHERE email = '{who}@x.test';"
        ))
        .await;
        let end = w.db.wal_lsn().await;
        w.wait_confirmed(end, Duration::from_secs(60)).await;
    }
    w.rx.clear_fault();
    wait_dead_letters(&w, 2).await;
    let keys =
        w.db.query_opt_string(
            "SELECT string_agg(array_to_string(key_columns, ',') || '=' || array_to_string(key_values, ','), ' ' ORDER BY id)
               FROM conveyour_cdc.dead_letters",
        )
        .await;
    assert_eq!(
        keys.as_deref(),
        Some("id=1 id=2"),
        "each entry keeps its row's key"
    );

    // Then Ada's row changes again, delivered; Bob's row is deleted.
    w.db.exec(
        "UPDATE employees SET first_name = 'Ada', last_name = 'North' WHERE email = 'ada@x.test';
         DELETE FROM employees WHERE email = 'bob@x.test';",
    )
    .await;
    w.rx.wait_until("Ada's newer values", Duration::from_secs(60), |r| {
        r.contact("ada@x.test")
            .is_some_and(|c| c.get("last_name") == Some(&serde_json::json!("North")))
    })
    .await;

    let (_, out, _) = run_cli(&["dead-letters", "list", "--config", CONFIG], &config, &[]);
    assert_eq!(
        out.matches(" rejected ").count(),
        2,
        "reason code per entry: {out}"
    );

    let (status, out, err) = run_cli(&["dead-letters", "retry", "--config", CONFIG], &config, &[]);
    assert!(status.success(), "{out}{err}\n{}", conn.log());
    assert!(out.contains("delivered 2, rejected again 0"), "{out}");
    // ConveYour ends with what the database says: the stale rejected
    // values never overwrite the newer ones, and a deleted row sends
    // nothing.
    assert_eq!(
        trait_of(&w, "ada@x.test", "first_name").as_deref(),
        Some("Ada")
    );
    assert_eq!(
        trait_of(&w, "ada@x.test", "last_name").as_deref(),
        Some("North")
    );
    assert_eq!(
        trait_of(&w, "bob@x.test", "first_name").as_deref(),
        Some("Bob")
    );
    assert_eq!(
        trait_of(&w, "bob@x.test", "last_name").as_deref(),
        Some("West")
    );
    wait_dead_letters(&w, 0).await;
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_running_connector_retries_dead_letters_on_its_own_and_the_depth_gauge_follows() {
    let w = world("dead_letter_auto", ROSTER_SQL).await;
    let tables = format!("dead_letters:\n  retry_every_ms: 300\n{ROSTER_TABLES}");
    let config = w.config(&tables, "");
    let conn = Connector::run(&config, &[]);
    let addr = crate::observe::metrics_addr(&conn).await;
    w.wait_streaming(Duration::from_secs(60)).await;
    // Refused for a value, not for its id: the first row ever has no
    // acknowledged contact to compare with, so a probe of its own contact
    // (empty traits, accepted) shows the entry at fault.
    w.rx.set_fault(Fault::RejectValue("Late".into()));
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('late@x.test', 'Late');")
        .await;
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    wait_dead_letters(&w, 1).await;
    let gauge = |text: &str| {
        crate::observe::parse(text)
            .get("conveyour_cdc_dead_letters_stored")
            .copied()
    };
    let (_, text) = crate::observe::get(&addr, "/metrics").await;
    assert_eq!(gauge(&text), Some(1.0), "{text}");

    // The cause goes away; no one runs the CLI.
    w.rx.clear_fault();
    w.rx.wait_until("the retried entry", Duration::from_secs(60), |r| {
        r.contact("late@x.test").is_some()
    })
    .await;
    wait_dead_letters(&w, 0).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = crate::observe::get(&addr, "/metrics").await;
        if gauge(&text) == Some(0.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        trait_of(&w, "late@x.test", "first_name").as_deref(),
        Some("Late")
    );
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_without_a_contact_id_is_dead_lettered_and_the_stream_goes_on() {
    let w = world("dead_letter_unmappable", ROSTER_SQL).await;
    // One such row exists before the first start: the initial copy sets
    // it aside too.
    w.db.exec("INSERT INTO employees (email, first_name) VALUES (NULL, 'Copied');")
        .await;
    let tables = format!("dead_letters:\n  retry_every_ms: 0\n{ROSTER_TABLES}");
    let config = w.config(&tables, "");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec(
        "INSERT INTO employees (email, first_name) VALUES (NULL, 'Nul');
         INSERT INTO employees (email, first_name) VALUES ('', 'Empty');
         INSERT INTO employees (email, first_name) VALUES ('ok@x.test', 'Ok');",
    )
    .await;
    let end = w.db.wal_lsn().await;
    w.rx.wait_until("the row after them", Duration::from_secs(60), |r| {
        r.contact("ok@x.test").is_some()
    })
    .await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    assert!(conn.is_running(), "{}", conn.log());
    assert_eq!(w.rx.contact_count(), 1, "{}", w.rx.summary());

    let client = w.db.client().await;
    let rows = client
        .query(
            "SELECT reason, source_table, lsn::text, key_columns, key_values, message, status
               FROM conveyour_cdc.dead_letters ORDER BY (key_values[1])::int",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "one entry per unmappable row");
    for (row, id) in rows.iter().zip(["1", "2", "3"]) {
        assert_eq!(row.get::<_, String>(0), "unmappable");
        assert_eq!(row.get::<_, String>(1), "public.employees");
        assert_eq!(row.get::<_, Vec<String>>(3), vec!["id".to_owned()]);
        assert_eq!(row.get::<_, Vec<String>>(4), vec![id.to_owned()]);
        let message: String = row.get(5);
        assert!(
            message.contains("table public.employees, column email, at LSN"),
            "{message}"
        );
        assert_eq!(row.get::<_, i32>(6), 0);
    }
    // Streamed rows carry their change's LSN.
    assert_ne!(rows[1].get::<_, String>(2), "0/0");
    assert!(rows[1].get::<_, String>(5).contains("NULL"));
    assert!(rows[2].get::<_, String>(5).contains("empty"));

    let (status, out, _) = run_cli(&["dead-letters", "list", "--config", CONFIG], &config, &[]);
    assert!(status.success());
    assert_eq!(out.matches(" unmappable ").count(), 3, "{out}");
    assert!(out.contains("key=(id=2)"), "{out}");

    // One row is fixed: a retry reads it again and sends it; the others
    // still do not map and are kept with the new message.
    w.db.exec("UPDATE employees SET email = 'nul@x.test', first_name = 'Fixed' WHERE id = 2;")
        .await;
    w.rx.wait_until("the fixed row", Duration::from_secs(60), |r| {
        r.contact("nul@x.test").is_some()
    })
    .await;
    let (status, out, _) = run_cli(&["dead-letters", "retry", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "two rows still do not map: {out}");
    assert!(out.contains("delivered 1, rejected again 2"), "{out}");
    let left =
        w.db.query_opt_string(
            "SELECT string_agg(key_values[1], ',' ORDER BY id) FROM conveyour_cdc.dead_letters WHERE reason = 'unmappable'",
        )
        .await;
    assert_eq!(left.as_deref(), Some("1,3"));
    assert_eq!(
        trait_of(&w, "nul@x.test", "first_name").as_deref(),
        Some("Fixed")
    );
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_on_unmappable_stop_a_row_without_a_contact_id_stops_the_connector() {
    let w = world("unmappable_stop", ROSTER_SQL).await;
    let config = w.config(ROSTER_TABLES, "  on_unmappable: stop\n");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec("INSERT INTO employees (email, first_name) VALUES (NULL, 'Nul');")
        .await;
    let status = conn.wait(Duration::from_secs(60)).await;
    assert!(!status.success());
    let log = conn.log();
    assert!(
        log.contains("table public.employees, column email, at LSN")
            && log.contains("the contact id is NULL"),
        "{log}"
    );
    let n =
        w.db.query_i64("SELECT count(*) FROM conveyour_cdc.dead_letters")
            .await;
    assert_eq!(n, 0);
    // The position stayed before the row: a restart that sets such rows
    // aside gets it again from the slot. (Comparing the confirmed position
    // with the WAL position before the insert is not that: keepalives may
    // confirm other databases' WAL written in between.)
    let config = w.config(ROSTER_TABLES, "");
    let conn = Connector::run(&config, &[]);
    wait_dead_letters(&w, 1).await;
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_table_of_an_earlier_version_is_upgraded_in_place_and_its_entries_retried() {
    let w = world("dead_letter_upgrade", ROSTER_SQL).await;
    // The table as earlier versions created it, with one entry (no key).
    w.db.exec(&format!(
        "CREATE SCHEMA conveyour_cdc;
         CREATE TABLE conveyour_cdc.dead_letters (
             id bigserial PRIMARY KEY, slot text NOT NULL, endpoint text NOT NULL,
             source_table text NOT NULL, contact text NOT NULL, lsn pg_lsn NOT NULL,
             payload jsonb NOT NULL, status int NOT NULL, message text NOT NULL,
             attempts int NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO conveyour_cdc.dead_letters (slot, endpoint, source_table, contact, lsn, payload, status, message, attempts)
         VALUES ('{}', 'track', 'public.sales', 'old@x.test', '0/1',
                 '{{\"id\": \"old@x.test\", \"events\": [{{\"event\": \"made_sale\", \"properties\": {{\"amount\": 5}}}}]}}',
                 400, 'refused', 1);",
        w.slot
    ))
    .await;
    let tables = format!("dead_letters:\n  retry_every_ms: 0\n{ROSTER_TABLES}");
    let config = w.config(&tables, "");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    let (status, out, _) = run_cli(&["dead-letters", "list", "--config", CONFIG], &config, &[]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains(" rejected ") && out.contains("old@x.test"),
        "{out}"
    );
    let (status, out, err) = run_cli(&["dead-letters", "retry", "--config", CONFIG], &config, &[]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("delivered 1, rejected again 0"), "{out}");
    assert_eq!(w.rx.track_count(), 1, "{}", w.rx.summary());
    wait_dead_letters(&w, 0).await;
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_while_a_writer_updates_the_same_rows_ends_with_the_databases_values() {
    let w = world("dead_letter_race", ROSTER_SQL).await;
    let tables = format!("dead_letters:\n  retry_every_ms: 0\n{ROSTER_TABLES}");
    let config = w.config(&tables, "  max_in_flight: 2\n  batch_size: 4\n");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec(
        "INSERT INTO employees (email, first_name)
         SELECT 'r' || g || '@x.test', 'start' FROM generate_series(1, 20) g;",
    )
    .await;
    w.rx.wait_until("every contact", Duration::from_secs(60), |r| {
        r.contact_count() == 20
    })
    .await;
    // Every row's next update is rejected and stored (refused for its
    // value: refusing everything alike would be an outage, held, not
    // dead-lettered).
    w.rx.set_fault(Fault::RejectValue("POISON".into()));
    w.db.exec("UPDATE employees SET first_name = 'POISON';")
        .await;
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    w.rx.clear_fault();
    wait_dead_letters(&w, 20).await;
    // Then every row changes again, delivered: the stored entries are
    // stale.
    w.db.exec("UPDATE employees SET first_name = 'fixed';")
        .await;
    w.rx.wait_until("the newer values", Duration::from_secs(60), |r| {
        r.contacts()
            .values()
            .all(|c| c.get("first_name") == Some(&serde_json::json!("fixed")))
    })
    .await;

    // A writer keeps changing half of the rows while the retry runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let client = w.db.client().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client
                    .execute(
                        "UPDATE employees SET first_name = 'v' || $1::int8 WHERE id = 1 + $1::int8 % 10",
                        &[&(i as i64)],
                    )
                    .await
                    .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            i
        })
    };
    let cli_config = config.clone();
    let (status, out, err) = tokio::task::spawn_blocking(move || {
        run_cli(
            &["dead-letters", "retry", "--config", CONFIG],
            &cli_config,
            &[],
        )
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(status.success(), "{out}{err}\n{}", conn.log());
    assert!(out.contains("delivered 20, rejected again 0"), "{out}");
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;

    let client = w.db.client().await;
    let rows = client
        .query("SELECT email, first_name FROM employees ORDER BY id", &[])
        .await
        .unwrap();
    for row in rows {
        let email: String = row.get(0);
        let first: String = row.get(1);
        assert_eq!(
            trait_of(&w, &email, "first_name").as_deref(),
            Some(first.as_str()),
            "{email} after {writes} writes"
        );
    }
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn many_unmappable_rows_are_stored_by_key_through_an_index() {
    let w = world("dead_letter_many", ROSTER_SQL).await;
    // An initial copy of a table where many rows lack a contact id: each
    // is stored by its key, looked up first (one entry per row), so that
    // look-up must not read the whole table per row.
    const ROWS: i64 = 5000;
    w.db.exec(&format!(
        "INSERT INTO employees (email, first_name) SELECT NULL, 'N' || g FROM generate_series(1, {ROWS}) g;"
    ))
    .await;
    let tables = format!("dead_letters:\n  retry_every_ms: 0\n{ROSTER_TABLES}");
    let config = w.config(&tables, "");
    let conn = Connector::run(&config, &[]);
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(600);
    let client = w.db.client().await;
    loop {
        // The connector creates the table as it starts.
        let stored: i64 = client
            .query_one("SELECT count(*) FROM conveyour_cdc.dead_letters", &[])
            .await
            .map_or(0, |r| r.get(0));
        if stored == ROWS {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{stored} dead letters\n{}",
            conn.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{ROWS} unmappable rows stored in {:?}", started.elapsed());
    client
        .batch_execute("ANALYZE conveyour_cdc.dead_letters")
        .await
        .unwrap();
    // The statement storing a row looks its earlier entry up by key.
    let plan: String = client
        .query(
            &format!(
                "EXPLAIN UPDATE conveyour_cdc.dead_letters SET message = 'x'
                  WHERE slot = '{}' AND source_table = 'public.employees'
                    AND key_columns = ARRAY['id'] AND key_values = ARRAY['17']",
                w.slot
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0) + "\n")
        .collect();
    assert!(plan.contains("Index"), "{plan}");
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_reads_rows_again_a_chunk_at_a_time() {
    let w = world("dead_letter_chunked", ROSTER_SQL).await;
    let tables =
        format!("dead_letters:\n  retry_every_ms: 0\nsync:\n  chunk_rows: 2\n{ROSTER_TABLES}");
    let config = w.config(&tables, "");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec(
        "INSERT INTO employees (email, first_name) SELECT NULL, 'N' || g FROM generate_series(1, 5) g;",
    )
    .await;
    wait_dead_letters(&w, 5).await;
    let (status, out, err) = run_cli(&["dead-letters", "retry", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "the rows still do not map: {out}{err}");
    assert!(out.contains("rejected again 5"), "{out}{err}");
    // The rows were read (and held until their high watermark) two at a
    // time, as a copy reads them, not all in one chunk.
    let log = conn.log();
    let batches: Vec<usize> = log
        .lines()
        .filter(|l| l.contains("rows read again and sent"))
        .filter_map(|l| {
            let n = l.split("retried=").nth(1)?;
            n.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .collect();
    assert_eq!(batches.iter().sum::<usize>(), 5, "{log}");
    assert!(batches.iter().all(|&n| n <= 2), "{batches:?}\n{log}");
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_unmappable_sale_bumps_its_counters_once_with_its_event() {
    let w = world(
        "dead_letter_counter",
        "CREATE TABLE employees (id serial PRIMARY KEY, email text, first_name text);
         CREATE TABLE sales (id serial PRIMARY KEY, employee_email text, amount numeric);",
    )
    .await;
    let tables = "dead_letters:\n  retry_every_ms: 0\ntables:
  - table: public.employees
    identify: {id: email, traits: {first_name: first_name}}
  - table: public.sales
    track:
      id: employee_email
      event: made_sale
      properties: {amount: amount}
      increment: {sales_count: 1, career_sales: amount}
";
    let config = w.config(tables, "");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    // The sale is inserted without its rep: nothing of it was sent, not
    // its event and not its counters.
    w.db.exec("INSERT INTO sales (employee_email, amount) VALUES (NULL, 40);")
        .await;
    wait_dead_letters(&w, 1).await;
    // Given its rep (an update, which a track table does not stream).
    w.db.exec("UPDATE sales SET employee_email = 'j@x.test';")
        .await;
    // A first retry while the row still fails keeps the entry as the
    // insert it stands for.
    w.db.exec("UPDATE sales SET employee_email = NULL;").await;
    let (status, out, err) = run_cli(&["dead-letters", "retry", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "{out}{err}");
    w.db.exec("UPDATE sales SET employee_email = 'j@x.test';")
        .await;
    let (status, out, err) = run_cli(&["dead-letters", "retry", "--config", CONFIG], &config, &[]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("delivered 1"), "{out}");
    assert_eq!(w.rx.track_count(), 1, "{}", w.rx.summary());
    let rep = w.rx.contact("j@x.test").expect("the rep's counters");
    assert_eq!(
        rep.get("sales_count"),
        Some(&serde_json::json!(1)),
        "{rep:?}"
    );
    assert_eq!(
        rep.get("career_sales"),
        Some(&serde_json::json!(40)),
        "{rep:?}"
    );
    drop(conn);
}

/// As a resync's chunk must (see sync's invisible-commit test), a retry's
/// read of a row must not win over a streamed commit it does not see yet,
/// also for an identify table the sync never copies (`snapshot: never`).
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_reading_a_row_whose_streamed_commit_is_not_yet_visible_keeps_the_streamed_value() {
    let cluster = tokio::task::spawn_blocking(crate::support::pg::private_cluster)
        .await
        .unwrap();
    let w = crate::support::setup::world_on(cluster, "dead_letter_invisible", ROSTER_SQL).await;
    let tables = "dead_letters:\n  retry_every_ms: 0\ntables:
  - table: public.employees
    snapshot: never
    identify: {id: email, traits: {first_name: first_name}}
";
    let config = w.config(tables, "");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.rx.set_fault(Fault::RejectValue("Old".into()));
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('r@x.test', 'Old');")
        .await;
    wait_dead_letters(&w, 1).await;
    w.rx.clear_fault();

    let writer = HeldCommit::start(
        cluster,
        &w.db.url(),
        "UPDATE employees SET first_name = 'New'",
    )
    .await;
    // The commit is streamed and sent while it is not yet visible.
    w.rx.wait_until("the streamed update", Duration::from_secs(60), |r| {
        r.contact("r@x.test")
            .is_some_and(|c| c.get("first_name") == Some(&serde_json::json!("New")))
    })
    .await;
    let invisible =
        w.db.query_opt_string("SELECT first_name FROM employees")
            .await;
    assert_eq!(
        invisible.as_deref(),
        Some("Old"),
        "turned visible too early"
    );

    let (status, out, err) = run_cli(&["dead-letters", "retry", "--config", CONFIG], &config, &[]);
    assert!(status.success(), "{out}{err}");

    assert_eq!(writer.release().await, 1);
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    assert_eq!(
        trait_of(&w, "r@x.test", "first_name").as_deref(),
        Some("New"),
        "the retry's older read won over the streamed change\n{}",
        w.rx.summary()
    );
    drop(conn);
}

/// A world whose connector has made its tables and stopped, and its config
/// with `dead_letters.retry_every_ms` as given.
async fn with_tables_made(hint: &str, retry_every_ms: u64) -> (World, String) {
    let w = world(hint, ROSTER_SQL).await;
    let tables = format!("dead_letters:\n  retry_every_ms: {retry_every_ms}\n{ROSTER_TABLES}");
    let config = w.config(&tables, "");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    conn.stop().await;
    (w, config)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entry_that_cannot_be_retried_keeps_one_note_however_often_it_is_tried() {
    let (w, config) = with_tables_made("dead_letter_note", 0).await;
    // An unmappable row of a table no longer mapped: it cannot be read
    // again, and every retry says so.
    w.db.exec(&format!(
        "INSERT INTO conveyour_cdc.dead_letters
             (slot, endpoint, source_table, contact, lsn, payload, status, message, attempts, reason)
         VALUES ('{}', 'identify', 'public.gone', '', '0/1', 'null', 0, 'the contact id is NULL', 0, 'unmappable');",
        w.slot
    ))
    .await;
    let message = || {
        w.db.query_opt_string("SELECT message FROM conveyour_cdc.dead_letters")
    };
    let (status, _, _) = run_cli(&["dead-letters", "retry", "--config", CONFIG], &config, &[]);
    assert!(!status.success());
    let once = message().await.unwrap();
    assert!(once.starts_with("the contact id is NULL ("), "{once}");
    for _ in 0..3 {
        let (status, _, _) = run_cli(&["dead-letters", "retry", "--config", CONFIG], &config, &[]);
        assert!(!status.success());
    }
    assert_eq!(message().await.unwrap(), once);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_event_is_sent_once_when_a_connector_starts_while_the_cli_sends_it() {
    let (w, config) = with_tables_made("dead_letter_claim", 100).await;
    // A refused event, due for its automatic retry.
    w.db.exec(&format!(
        "INSERT INTO conveyour_cdc.dead_letters
             (slot, endpoint, source_table, contact, lsn, payload, status, message, attempts, reason, updated_at)
         VALUES ('{}', 'track', 'public.sales', 's@x.test', '0/1',
                 '{{\"id\": \"s@x.test\", \"events\": [{{\"event\": \"made_sale\", \"properties\": {{\"amount\": 5}}}}]}}',
                 400, 'refused', 1, 'rejected', now() - interval '1 hour');",
        w.slot
    ))
    .await;
    // ConveYour answers slowly: the CLI, with no connector streaming,
    // is still sending it when a connector starts and retries it too.
    w.rx.set_fault(Fault::Slow(Duration::from_secs(8)));
    let cli = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            run_cli(&["dead-letters", "retry", "--config", CONFIG], &config, &[])
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    let (status, out, err) = cli.await.unwrap();
    assert!(status.success(), "{out}{err}");
    w.rx.clear_fault();
    wait_dead_letters(&w, 0).await;
    // Long enough for a second send to have landed.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(w.rx.track_count(), 1, "{}", w.rx.summary());
    drop(conn);
}
