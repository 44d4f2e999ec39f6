//! The initial sync and resync: existing rows reach the strict
//! receiver exactly once on the first run, with their latest values when
//! they change during the copy; a killed copy resumes from its last
//! acknowledged chunk; track tables are copied only when they opt in; a
//! resync alongside a writer ends with the final values, also when a
//! streamed commit was not yet visible to the chunk that read its row.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::support::connector::{run_cli, Connector, CONFIG_PLACEHOLDER as CONFIG};
use crate::support::setup::{world, HeldCommit, World};

const SCHEMA_SQL: &str = "
    CREATE TABLE employees (
        id bigserial PRIMARY KEY,
        email text NOT NULL UNIQUE,
        first_name text,
        region text,
        level int NOT NULL DEFAULT 0
    );
    CREATE TABLE sales (
        id bigserial PRIMARY KEY,
        email text NOT NULL,
        amount int NOT NULL
    );
    CREATE TABLE awards (
        id bigserial PRIMARY KEY,
        email text NOT NULL,
        award text NOT NULL
    );
";

const TABLES: &str = "
tables:
  - table: employees
    identify:
      id: email
      traits: {first_name: first_name, region: region, level: level}
  - table: sales
    track:
      id: email
      event: made_sale
      properties: {amount: amount}
  - table: awards
    snapshot: initial
    track:
      id: email
      event: won_award
      properties: {award: award}
";

/// Inserts `n` employees `e{i}@acme.test` (i from 1) in one statement.
async fn seed_employees(w: &World, n: usize) {
    w.db.exec(&format!(
        "INSERT INTO employees (email, first_name, region, level)
         SELECT 'e' || i || '@acme.test', 'First' || i, CASE WHEN i % 2 = 0 THEN 'east' ELSE 'west' END, 0
           FROM generate_series(1, {n}) i"
    ))
    .await;
}

/// The sync state of every table for this world's slot.
async fn sync_state(w: &World) -> HashMap<String, (String, i64)> {
    let client = w.db.client().await;
    let rows = client
        .query(
            "SELECT source_table, status, rows_copied FROM conveyour_cdc.snapshot_progress WHERE slot = $1",
            &[&w.slot],
        )
        .await
        .unwrap_or_default();
    rows.iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (r.get::<_, String>(1), r.get::<_, i64>(2)),
            )
        })
        .collect()
}

async fn wait_synced(w: &World, table: &str, timeout: Duration, conn: &Connector) {
    let deadline = Instant::now() + timeout;
    loop {
        if sync_state(w)
            .await
            .get(table)
            .is_some_and(|(s, _)| s == "done")
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{table} not synced within {timeout:?}: {:?}\nreceiver: {}\n{}",
            sync_state(w).await,
            w.rx.summary(),
            conn.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every employee row as the receiver should hold it: email → traits.
async fn employees_in_db(w: &World) -> HashMap<String, Map<String, Value>> {
    let client = w.db.client().await;
    let rows = client
        .query(
            "SELECT email, first_name, region, level FROM employees",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let traits = json!({
                "first_name": r.get::<_, Option<String>>(1),
                "region": r.get::<_, Option<String>>(2),
                "level": r.get::<_, i32>(3),
            });
            (r.get(0), traits.as_object().unwrap().clone())
        })
        .collect()
}

/// How many identify entries each contact received.
fn identifies_per_contact(w: &World) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for e in w.rx.identifies() {
        *n.entry(e["id"].as_str().unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    n
}

/// Waits until the slot's position covers everything written so far.
async fn wait_caught_up(w: &World) {
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_run_sends_100k_existing_rows_exactly_once() {
    let w = world("sync_100k", SCHEMA_SQL).await;
    seed_employees(&w, 100_000).await;
    w.db.exec(
        "INSERT INTO sales (email, amount) VALUES ('e1@acme.test', 10), ('e2@acme.test', 20);
         INSERT INTO awards (email, award) VALUES ('e3@acme.test', 'gold');",
    )
    .await;
    let started = Instant::now();
    let config = w.config(TABLES, "  batch_size: 1000\n  max_in_flight: 4");
    let conn = Connector::run(&config, &[]);
    wait_synced(&w, "public.employees", Duration::from_secs(300), &conn).await;
    let copy_secs = started.elapsed().as_secs_f64();
    w.wait_streaming(Duration::from_secs(60)).await;
    eprintln!(
        "initial sync: 100000 employees in {copy_secs:.2} s = {:.0} rows/s (debug build, strict receiver, process start included)",
        100_000.0 / copy_secs
    );

    // A change after the copy streams as usual, after the copied row.
    w.db.exec("UPDATE employees SET level = 7 WHERE email = 'e5@acme.test'")
        .await;
    wait_caught_up(&w).await;

    let per_contact = identifies_per_contact(&w);
    assert_eq!(per_contact.len(), 100_000, "{}", w.rx.summary());
    let twice: Vec<_> = per_contact
        .iter()
        .filter(|(id, n)| **n != 1 && id.as_str() != "e5@acme.test")
        .collect();
    assert!(
        twice.is_empty(),
        "sent more than once: {:?}",
        &twice[..twice.len().min(5)]
    );
    assert_eq!(per_contact["e5@acme.test"], 2);
    assert_eq!(
        Value::Object(w.rx.contact("e4@acme.test").unwrap()),
        json!({"first_name": "First4", "region": "east", "level": 0})
    );
    assert_eq!(w.rx.contact("e5@acme.test").unwrap()["level"], json!(7));
    // Track tables: sales (never) not copied, awards (opted in) copied.
    let tracks = w.rx.tracks();
    assert_eq!(tracks.len(), 1, "{tracks:?}");
    assert_eq!(tracks[0].0, "e3@acme.test");
    assert_eq!(
        tracks[0].1,
        json!({"event": "won_award", "properties": {"award": "gold"}})
    );
    let state = sync_state(&w).await;
    assert_eq!(state["public.employees"], ("done".to_owned(), 100_000));
    assert_eq!(state["public.awards"], ("done".to_owned(), 1));
    assert!(!state.contains_key("public.sales"), "{state:?}");
    let (status, out, err) = run_cli(&["status", "--config", CONFIG, "--json"], &config, &[]);
    assert!(status.success(), "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let employees = report["sync"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["table"] == "public.employees"))
        .unwrap_or_else(|| panic!("no sync state in {out}"));
    assert_eq!(employees["status"], "done");
    assert_eq!(employees["rows_copied"], 100_000);
    assert_eq!(employees["rows_total"], 100_000);

    conn.stop().await;
}

/// A writer that keeps updating random employees until stopped; returns
/// how many updates it made.
fn spawn_writer(w: &World, n: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let url = w.db.url();
    tokio::spawn(async move {
        let client = crate::support::pg::connect(&url).await.unwrap();
        let mut made = 0u64;
        let mut i: u64 = 7;
        while !stop.load(Ordering::Relaxed) {
            i = i
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = (i >> 33) as usize % n + 1;
            client
                .execute(
                    "UPDATE employees SET level = level + 1, region = 'moved' || (level + 1) WHERE id = $1",
                    &[&(id as i64)],
                )
                .await
                .unwrap();
            made += 1;
            if made % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        made
    })
}

/// The receiver's contacts equal the table, contact by contact.
async fn assert_receiver_matches_db(w: &World) {
    let db = employees_in_db(w).await;
    let wrong: Vec<String> = w.rx.with_contacts(|contacts| {
        db.iter()
            .filter(|(id, traits)| contacts.get(*id) != Some(*traits))
            .take(5)
            .map(|(id, traits)| format!("{id}: db {traits:?}, receiver {:?}", contacts.get(id)))
            .collect()
    });
    assert!(wrong.is_empty(), "stale contacts:\n{}", wrong.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_updated_during_the_first_copy_end_with_their_latest_values() {
    let w = world("sync_updates", SCHEMA_SQL).await;
    let n = 20_000;
    seed_employees(&w, n).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&w, n, stop.clone());
    let mut config = w.config(TABLES, "  batch_size: 200\n  max_in_flight: 2");
    config.push_str("sync:\n  chunk_rows: 500\n");
    let conn = Connector::run(&config, &[]);
    wait_synced(&w, "public.employees", Duration::from_secs(300), &conn).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let updates = writer.await.unwrap();
    assert!(updates > 0);
    wait_caught_up(&w).await;
    assert_receiver_matches_db(&w).await;
    assert!(identifies_per_contact(&w).len() == n);
    conn.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_killed_midway_resumes_from_its_last_chunk() {
    let w = world("sync_kill", SCHEMA_SQL).await;
    let n = 30_000;
    let chunk = 500;
    let in_flight = 2;
    seed_employees(&w, n).await;
    let mut config = w.config(
        TABLES,
        &format!("  batch_size: 250\n  max_in_flight: {in_flight}"),
    );
    config.push_str(&format!("sync:\n  chunk_rows: {chunk}\n"));
    let conn = Connector::run(&config, &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while w.rx.identify_count() < 8_000 {
        assert!(
            Instant::now() < deadline,
            "copy too slow: {}\n{}",
            w.rx.summary(),
            conn.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    conn.sigkill();
    conn.wait(Duration::from_secs(30)).await;
    let (status, copied) = sync_state(&w).await["public.employees"].clone();
    assert_ne!(
        status, "done",
        "the copy finished before the kill; make it longer"
    );
    assert!(copied > 0, "no chunk was recorded before the kill");
    let before = w.rx.identify_count();

    // Resumed: the exported snapshot is gone, so the rest is copied in
    // watermarked chunks alongside the stream; a change meanwhile must win.
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec("UPDATE employees SET first_name = 'Late' WHERE id = 29999")
        .await;
    wait_synced(&w, "public.employees", Duration::from_secs(300), &conn).await;
    wait_caught_up(&w).await;
    assert_receiver_matches_db(&w).await;
    let per_contact = identifies_per_contact(&w);
    assert_eq!(per_contact.len(), n);
    let sent = w.rx.identify_count();
    // The update of 29999 is a second identify of its own.
    let duplicates = sent - n - 1;
    let bound = chunk * in_flight;
    eprintln!(
        "killed at {before} identifies after {copied} recorded; {duplicates} rows sent twice (bound {bound})"
    );
    assert!(
        duplicates <= bound,
        "{duplicates} rows sent twice, more than one chunk ({chunk}) per request in flight ({in_flight})"
    );
    conn.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resync_while_a_writer_updates_ends_with_the_final_values() {
    let w = world("sync_resync", SCHEMA_SQL).await;
    let n = 5_000;
    seed_employees(&w, n).await;
    let mut config = w.config(TABLES, "  batch_size: 200");
    config.push_str("sync:\n  chunk_rows: 300\n");
    let conn = Connector::run(&config, &[]);
    wait_synced(&w, "public.employees", Duration::from_secs(120), &conn).await;
    w.wait_streaming(Duration::from_secs(60)).await;
    let after_first = w.rx.identify_count();
    assert_eq!(after_first, n);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&w, n, stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, out, err) = run_cli(
        &["resync", "--config", CONFIG, "--table", "employees"],
        &config,
        &[],
    );
    assert!(status.success(), "resync failed: {out}{err}");
    assert!(
        out.contains("resync of public.employees requested"),
        "{out}"
    );
    // The request is picked up from the stream: the state goes back to
    // pending or copying, then to done.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sync_state(&w).await["public.employees"].0 == "done"
        && w.rx.identify_count() < after_first + n
    {
        assert!(
            Instant::now() < deadline,
            "the resync request was not taken up\n{}",
            conn.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_synced(&w, "public.employees", Duration::from_secs(120), &conn).await;
    stop.store(true, Ordering::Relaxed);
    let updates = writer.await.unwrap();
    wait_caught_up(&w).await;
    assert_receiver_matches_db(&w).await;
    // Every row was sent again (bar those the stream had just sent newer).
    let resent = w.rx.identify_count() - after_first;
    assert!(
        resent as u64 + updates >= n as u64,
        "resync sent {resent} identifies with {updates} updates for {n} rows"
    );
    assert!(conn.log().contains("sync: table copied"), "{}", conn.log());

    // A track table that did not opt in cannot be resynced.
    let (status, _, err) = run_cli(
        &["resync", "--config", CONFIG, "--table", "sales"],
        &config,
        &[],
    );
    assert!(!status.success());
    assert!(err.contains("snapshot is never"), "{err}");
    // An argument problem, not a setup one: nothing changed, fix the
    // argument.
    assert!(
        err.contains("nothing was changed; fix the argument named above"),
        "{err}"
    );
    conn.stop().await;
}

/// A resync (after adding a list trait to the mapping) while a job keeps
/// touching only `updated_at` and another keeps editing tags: every
/// contact ends with its table's tags. Rows the stream changed during
/// their chunk without carrying their whole state (a no-op update, a list
/// diff) must not be dropped from the copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_resync_under_partial_changes_still_sends_every_row_in_full() {
    let w = world(
        "sync_partial",
        "CREATE TABLE reps (
             id bigserial PRIMARY KEY,
             email text NOT NULL UNIQUE,
             tags text[] NOT NULL DEFAULT '{}',
             updated_at timestamptz NOT NULL DEFAULT now()
         );
         ALTER TABLE reps REPLICA IDENTITY FULL;",
    )
    .await;
    let n: i64 = 3_000;
    w.db.exec(&format!(
        "INSERT INTO reps (email, tags) SELECT 'r' || i || '@acme.test', ARRAY['t' || (i % 5)] FROM generate_series(1, {n}) i"
    ))
    .await;
    // First without the list trait, as if it were added later.
    let before = "
tables:
  - table: reps
    identify:
      id: email
";
    let after = "
tables:
  - table: reps
    identify:
      id: email
      traits: {tags: {list: tags}}
";
    let tail = "sync:\n  chunk_rows: 200\n";
    let config = format!("{}{tail}", w.config(before, "  batch_size: 100"));
    let conn = Connector::run(&config, &[]);
    wait_synced(&w, "public.reps", Duration::from_secs(120), &conn).await;
    conn.stop().await;
    let config = format!("{}{tail}", w.config(after, "  batch_size: 100"));
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let jobs: Vec<_> = ["UPDATE reps SET updated_at = now() WHERE id = $1",
                        "UPDATE reps SET tags = array_append(tags, 'x' || (id % 3)) WHERE id = $1 AND cardinality(tags) < 4"]
        .into_iter()
        .enumerate()
        .map(|(j, sql)| {
            let url = w.db.url();
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = crate::support::pg::connect(&url).await.unwrap();
                let mut i: i64 = 17 + j as i64;
                while !stop.load(Ordering::Relaxed) {
                    i = (i * 7919 + 13) % n + 1;
                    client.execute(sql, &[&i]).await.unwrap();
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, out, err) = run_cli(
        &["resync", "--config", CONFIG, "--table", "reps"],
        &config,
        &[],
    );
    assert!(status.success(), "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while sync_state(&w).await["public.reps"].0 == "done" {
        assert!(
            Instant::now() < deadline,
            "resync not taken up\n{}",
            conn.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_synced(&w, "public.reps", Duration::from_secs(120), &conn).await;
    stop.store(true, Ordering::Relaxed);
    for j in jobs {
        j.await.unwrap();
    }
    wait_caught_up(&w).await;

    let client = w.db.client().await;
    let rows = client
        .query("SELECT email, tags FROM reps", &[])
        .await
        .unwrap();
    let wrong: Vec<String> = w.rx.with_contacts(|contacts| {
        rows.iter()
            .filter_map(|r| {
                let email: String = r.get(0);
                let mut want: Vec<String> = r.get(1);
                want.sort();
                want.dedup();
                let mut got: Vec<String> = contacts
                    .get(&email)
                    .and_then(|c| c.get("tags"))
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                got.sort();
                (got != want).then(|| format!("{email}: table {want:?}, receiver {got:?}"))
            })
            .take(5)
            .collect()
    });
    assert!(
        wrong.is_empty(),
        "contacts without their tags:\n{}",
        wrong.join("\n")
    );
    conn.stop().await;
}

/// A commit is in the WAL, and so in the stream, a moment before new
/// snapshots see it (on a busy server, for microseconds; here for as long
/// as the test likes: the commit waits for a synchronous standby that never
/// answers, after its record is written and before it turns visible). A
/// resync reading the row meanwhile reads the older value; the streamed
/// change, sent before the copy, must still be the value ConveYour ends
/// with.
#[tokio::test(flavor = "multi_thread")]
async fn a_resync_reading_a_row_whose_streamed_commit_is_not_yet_visible_keeps_the_streamed_value()
{
    let cluster = tokio::task::spawn_blocking(crate::support::pg::private_cluster)
        .await
        .unwrap();
    let w = crate::support::setup::world_on(cluster, "sync_invisible", SCHEMA_SQL).await;
    let n = 1_000;
    seed_employees(&w, n).await;
    let mut config = w.config(TABLES, "  batch_size: 200");
    config.push_str("sync:\n  chunk_rows: 300\n");
    let conn = Connector::run(&config, &[]);
    wait_synced(&w, "public.employees", Duration::from_secs(120), &conn).await;
    w.wait_streaming(Duration::from_secs(60)).await;
    let after_first = w.rx.identify_count();
    assert_eq!(after_first, n);

    let contact = "e500@acme.test";
    let writer = HeldCommit::start(
        cluster,
        &w.db.url(),
        "UPDATE employees SET level = level + 1, region = 'moved' || (level + 1) WHERE id = 500",
    )
    .await;
    // The commit is streamed and sent while it is not yet visible.
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.rx.contact(contact).and_then(|c| c.get("level").cloned()) != Some(json!(1)) {
        assert!(
            Instant::now() < deadline,
            "the update was not streamed: {:?}\n{}",
            w.rx.contact(contact),
            conn.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let invisible =
        w.db.client()
            .await
            .query_one("SELECT level FROM employees WHERE id = 500", &[])
            .await
            .unwrap()
            .get::<_, i32>(0);
    assert_eq!(invisible, 0, "the update turned visible too early");

    // A resync copies every row meanwhile (the request itself commits
    // locally, like every session but the writer's).
    let (status, out, err) = run_cli(
        &["resync", "--config", CONFIG, "--table", "employees"],
        &config,
        &[],
    );
    assert!(status.success(), "resync failed: {out}{err}");
    wait_synced(&w, "public.employees", Duration::from_secs(120), &conn).await;
    assert!(
        w.rx.identify_count() >= after_first + n - 1,
        "the resync did not send the table again: {}",
        w.rx.summary()
    );

    // The standby is given up on: the commit turns visible.
    assert_eq!(writer.release().await, 1);
    wait_caught_up(&w).await;
    assert_eq!(
        w.rx.contact(contact).and_then(|c| c.get("level").cloned()),
        Some(json!(1)),
        "the copy's older value won over the streamed change"
    );
    assert_receiver_matches_db(&w).await;
    conn.stop().await;
}
