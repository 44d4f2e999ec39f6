//! A failover with real servers (PostgreSQL 17+): a primary, a physical
//! standby with slot sync, the connector on a two-host URL. The primary
//! dies (`-m immediate`) while changes stream, the standby is promoted, and
//! the connector resumes on it from the synchronized slot. And on every
//! version, a failover to a standby without the slot: the connector stops,
//! naming the timeline change, rather than start over on a new slot.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::NoTls;

use crate::support::connector::{run_cli, Connector};
use crate::support::pg::{self, private_cluster, Cluster};
use crate::support::receiver::{id_string, Receiver};
use crate::support::setup::{reconfigure, world_on, World};
use crate::support::standby::{self, PHYSICAL_SLOT};

const SCHEMA_SQL: &str = "
    CREATE TABLE employees (
        id serial PRIMARY KEY,
        email text NOT NULL UNIQUE,
        first_name text,
        career_sales int8 NOT NULL DEFAULT 0
    );
    CREATE TABLE sales (
        id serial PRIMARY KEY,
        employee_email text NOT NULL,
        amount int8 NOT NULL
    );
";

const TABLES: &str = "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {first_name: first_name, career_sales: career_sales}
  - table: public.sales
    track:
      id: employee_email
      event: made_sale
      properties: {sale_id: id, amount: amount}
";

/// Writes transaction after transaction (an upsert of one of 20 employees
/// and a sale) through `url` until `stop`, reconnecting on failure: across
/// the failover it finds the new primary by the same two-host URL. A
/// commit whose answer was lost is retried; if both committed, both rows
/// are real and must arrive. Returns the transactions written.
fn writer(
    url: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            let sql = format!(
                "BEGIN;
                 INSERT INTO employees (email, first_name, career_sales) VALUES ('f{e}@x.test', 'n{i}', {i})
                   ON CONFLICT (email) DO UPDATE SET first_name = excluded.first_name, career_sales = excluded.career_sales;
                 INSERT INTO sales (employee_email, amount) VALUES ('f{e}@x.test', {i});
                 COMMIT;",
                e = i % 20
            );
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = match tokio_postgres::connect(&url, NoTls).await {
                        Ok((c, conn)) => {
                            tokio::spawn(async move {
                                let _ = conn.await;
                            });
                            Some(c)
                        }
                        Err(_) => None,
                    };
                }
                if let Some(c) = &client {
                    match c.batch_execute(&sql).await {
                        Ok(()) => break,
                        Err(_) => client = None,
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "the writer found no primary for 120 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            done.store(i, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        i
    })
}

/// Employees (email → (first_name, career_sales)) and sales (id → (email,
/// amount)) as the database at `url` holds them.
async fn db_state(
    url: &str,
) -> (
    BTreeMap<String, (String, i64)>,
    BTreeMap<i64, (String, i64)>,
) {
    let client = pg::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    let employees = client
        .query("SELECT email, first_name, career_sales FROM employees", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let sales = client
        .query("SELECT id::int8, employee_email, amount FROM sales", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    (employees, sales)
}

fn as_i64(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// What differs between the receiver and the database (at most 10 lines),
/// and how many track events and identify entries arrived more than once.
fn compare(
    rx: &Receiver,
    employees: &BTreeMap<String, (String, i64)>,
    sales: &BTreeMap<i64, (String, i64)>,
) -> (Vec<String>, usize, usize) {
    let mut diffs = Vec::new();
    let contacts = rx.contacts();
    for (email, (name, count)) in employees {
        match contacts.get(email) {
            None => diffs.push(format!("{email}: never identified")),
            Some(t) => {
                if t.get("first_name").and_then(Value::as_str) != Some(name)
                    || as_i64(t.get("career_sales")) != Some(*count)
                {
                    diffs.push(format!(
                        "{email}: receiver has {t:?}, database has ({name}, {count})"
                    ));
                }
            }
        }
    }
    for email in contacts.keys() {
        if !employees.contains_key(email) {
            diffs.push(format!("{email}: identified, not in the database"));
        }
    }
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for (contact, event) in rx.tracks() {
        let id = as_i64(event["properties"].get("sale_id")).expect("a sale_id");
        *seen.entry(id).or_default() += 1;
        match sales.get(&id) {
            Some((email, amount))
                if *email == contact
                    && as_i64(event["properties"].get("amount")) == Some(*amount) => {}
            other => diffs.push(format!(
                "sale {id}: received {contact} {event}, database has {other:?}"
            )),
        }
    }
    for id in sales.keys() {
        if !seen.contains_key(id) {
            diffs.push(format!("sale {id}: never received"));
        }
    }
    let track_repeats = seen.values().map(|n| n - 1).sum();
    let mut entries: HashMap<(String, i64), usize> = HashMap::new();
    for e in rx.identifies() {
        let key = (
            id_string(&e["id"]),
            as_i64(e["traits"].get("career_sales")).unwrap_or(-1),
        );
        *entries.entry(key).or_default() += 1;
    }
    let identify_repeats = entries.values().map(|n| n - 1).sum();
    diffs.truncate(10);
    (diffs, track_repeats, identify_repeats)
}

fn line_starting<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?}:\n{out}"))
}

/// A primary (a private cluster) with a world on it, its physical standby,
/// and a two-host read-write URL to the world's database on both.
struct Pair {
    primary: &'static Cluster,
    standby: &'static Cluster,
    w: World,
    db: String,
    url: String,
}

async fn pair(hint: &str) -> Pair {
    let primary = tokio::task::spawn_blocking(private_cluster).await.unwrap();
    let w = world_on(primary, hint, SCHEMA_SQL).await;
    let standby: &'static Cluster =
        tokio::task::spawn_blocking(move || standby::start_standby(primary))
            .await
            .unwrap();
    let db = w.db.name().to_owned();
    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", primary.port(), standby.port());
    let url = format!("postgres://postgres@{hosts}/{db}?target_session_attrs=read-write");
    Pair {
        primary,
        standby,
        w,
        db,
        url,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failover_resumes_on_the_promoted_standby_from_the_synchronized_slot() {
    if pg::skip_below(17, "failover slots and slot sync need PostgreSQL 17") {
        return;
    }
    let Pair {
        primary,
        standby,
        w,
        db,
        url,
    } = pair("failover").await;
    let config = w.config_with_url(&url, TABLES, "");
    let standby_at = format!("127.0.0.1:{}", standby.port());
    let slot = w.slot.clone();

    // Before the primary waits for the standby: `check` names the setting
    // the primary lacks, and why the standby cannot carry the slot yet.
    let (_, out, err) = run_cli(&["check", "--config", "{config}"], &config, &[]);
    assert!(
        line_starting(&out, "WARN failover: primary: ").contains(&format!(
            "run ALTER SYSTEM SET synchronized_standby_slots = '{PHYSICAL_SLOT}';"
        )),
        "{out}\n{err}"
    );
    let line = line_starting(&out, &format!("WARN failover: standby {standby_at}: "));
    assert!(
        line.contains(&format!(
            "add {PHYSICAL_SLOT} to the primary's synchronized_standby_slots"
        )) && line.contains(&format!("it has no copy of {slot} yet")),
        "{out}"
    );
    reconfigure(
        primary,
        &[("synchronized_standby_slots", Some(PHYSICAL_SLOT))],
    )
    .await;

    // 1. The connector streams from the primary through the two-host URL.
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(30)).await;
    let pid = conn.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writes = writer(url.clone(), stop.clone(), done.clone());

    // 2. Changes stream; the standby's copy of the slot becomes sync-ready.
    let synced_at = standby::wait_sync_ready(standby, &slot, Duration::from_secs(120)).await;
    let log = std::fs::read_to_string(standby.log_path()).unwrap_or_default();
    assert!(
        log.contains(&format!(
            "newly created replication slot \"{slot}\" is sync-ready now"
        )),
        "the standby did not log its copy sync-ready:\n{log}"
    );
    let (status, out, err) = run_cli(&["check", "--config", "{config}"], &config, &[]);
    assert!(status.success(), "{out}\n{err}");
    assert!(
        line_starting(&out, "ok   failover slot: ").contains("is a failover slot"),
        "{out}"
    );
    assert!(
        line_starting(&out, "ok   failover: primary: ")
            .contains(&format!("synchronized_standby_slots = {PHYSICAL_SLOT}")),
        "{out}"
    );
    assert!(
        line_starting(&out, &format!("ok   failover: standby {standby_at}: "))
            .contains(&format!("its copy of {slot} is ready")),
        "{out}"
    );
    let (_, out, _) = run_cli(&["status", "--config", "{config}"], &config, &[]);
    assert!(
        out.contains(&format!("standby {standby_at}: copy ready")),
        "{out}"
    );
    // Streaming goes on past the sync-ready point, as it would for hours,
    // so the copy's lag behind the primary's slot is the usual one.
    let ready_tracks = w.rx.track_count();
    w.rx.wait_until("sales after sync-ready", Duration::from_secs(60), |r| {
        r.track_count() >= ready_tracks + 300
    })
    .await;

    // The primary dies mid-stream; the standby is promoted.
    let before = (w.rx.track_count(), done.load(Ordering::SeqCst));
    let confirmed = w.confirmed().await;
    tokio::task::spawn_blocking(move || standby::crash(primary))
        .await
        .unwrap();
    let copy = standby::slot_copy(standby, &slot).await;
    tokio::task::spawn_blocking(move || standby::promote(standby))
        .await
        .unwrap();
    eprintln!(
        "failover: primary stopped after {} tracks received, {} transactions written, its slot confirmed at {}; the standby's copy (synced, temporary, confirmed) {copy:?} (sync-ready at {synced_at})",
        before.0,
        before.1,
        conveyour_cdc::lsn::Lsn(confirmed)
    );

    // 3. More writes, on the new primary.
    let promoted_at = done.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::SeqCst) < promoted_at + 150 {
        assert!(
            Instant::now() < deadline,
            "the writer did not reach the new primary"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let written = writes.await.unwrap();

    // 4. The connector resumed on the new primary, from the synchronized
    // slot (not a new one), and the receiver holds what the database does.
    let new_url = standby.superuser_url(&db);
    let (employees, sales) = db_state(&new_url).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (track_repeats, identify_repeats) = loop {
        let (diffs, tracks, identifies) = compare(&w.rx, &employees, &sales);
        if diffs.is_empty() {
            break (tracks, identifies);
        }
        assert!(
            Instant::now() < deadline,
            "after the failover the receiver does not match the new primary: {diffs:#?}\nreceiver: {}\n--- connector log ---\n{}",
            w.rx.summary(),
            crate::support::tail_of(conn.log_path(), 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log = conn.log();
    assert!(conn.is_running() && conn.pid() == pid, "{log}");
    assert!(log.contains("reconnecting"), "{log}");
    assert_eq!(
        log.matches("created the replication slot").count(),
        1,
        "the connector made a new slot instead of resuming from the synchronized one:\n{log}"
    );
    let on_new = pg::connect(&new_url).await.unwrap();
    let row = on_new
        .query_one(
            "SELECT synced, failover, active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0) && row.get::<_, bool>(1) && row.get::<_, bool>(2),
        "the new primary's slot should be the synchronized failover slot, in use"
    );
    eprintln!(
        "failover (PostgreSQL {}): {} employees and {} sales consistent after {written} transactions; \
         duplicates: {track_repeats} track events, {identify_repeats} identify entries",
        pg::server_major(),
        employees.len(),
        sales.len()
    );
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multi_host_url_skips_a_dead_host_and_names_each_one_that_fails() {
    let w = crate::support::setup::world("multihost", SCHEMA_SQL).await;
    let password = pg::password_for("scram_user");
    let db = w.db.name().to_owned();
    let live = w.db.cluster().port();
    let (dead1, dead2) = (dead_port(), dead_port());

    // The first host is down: check and the connector use the second.
    let url = format!(
        "postgres://scram_user:{password}@127.0.0.1:{dead1},127.0.0.1:{live}/{db}?target_session_attrs=read-write&sslmode=disable"
    );
    let config = w.config_with_url(&url, TABLES, "");
    let (_, out, err) = run_cli(&["check", "--config", "{config}"], &config, &[]);
    assert!(
        line_starting(&out, "ok   server reachable: ").contains(&format!(
            "postgres://scram_user@127.0.0.1:{dead1},127.0.0.1:{live}/{db}"
        )),
        "{out}\n{err}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok   replication connection: ")),
        "{out}"
    );
    assert!(!out.contains(&password) && !err.contains(&password));
    // Before 17, check says plainly that a failover loses the slot.
    let line = line_starting(&out, "ok   failover slot: ");
    if pg::server_major() < 17 {
        assert!(
            line.contains("cannot synchronize a logical slot to a standby (17 and later can): a failover loses the slot and its position"),
            "{line}"
        );
    } else {
        assert!(
            line.ends_with(&format!("run creates {} as a failover slot", w.slot)),
            "{line}"
        );
    }

    // Both hosts down: the error names each, with its reason, and no
    // password.
    let url = format!(
        "postgres://scram_user:{password}@127.0.0.1:{dead1},127.0.0.1:{dead2}/{db}?target_session_attrs=read-write"
    );
    let config = w.config_with_url(&url, TABLES, "");
    let (status, out, err) = run_cli(&["check", "--config", "{config}"], &config, &[]);
    assert!(!status.success());
    let line = line_starting(&out, "FAIL server reachable: ");
    assert!(
        line.contains(&format!(
            "no host of postgres://scram_user@127.0.0.1:{dead1},127.0.0.1:{dead2}/{db} would do (target_session_attrs=read-write): \
             cannot connect to 127.0.0.1:{dead1}: connection refused"
        )) && line.contains(&format!("; cannot connect to 127.0.0.1:{dead2}: connection refused")),
        "{out}\n{err}"
    );
    assert!(!out.contains(&password) && !err.contains(&password));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failover_to_a_standby_without_the_slot_stops_naming_the_timeline_change() {
    let Pair {
        primary,
        standby,
        w,
        db,
        url,
    } = pair("failover_no_slot").await;
    // Not a failover slot (before 17 there are none): the standby has no
    // copy.
    let config = w.config_with_url(&url, TABLES, "").replace(
        "  status_interval_ms: 1000\n",
        "  status_interval_ms: 1000\n  failover_slot: false\n",
    );
    let conn = w.run_and_stream_one(&config, "a@x.test", 1).await;

    tokio::task::spawn_blocking(move || standby::crash(primary))
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || standby::promote(standby))
        .await
        .unwrap();

    let exit = conn.wait(Duration::from_secs(120)).await;
    let log = conn.log();
    assert!(
        !exit.success(),
        "a new primary without the slot must stop the connector:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "slot {} is missing on the server reached after a failover (timeline 1 to 2)",
            w.slot
        )) && log.contains("why the new primary had no copy"),
        "the error must name the failover and the hint what it cost:\n{log}"
    );
    let client = pg::connect(&standby.superuser_url(&db)).await.unwrap();
    let slots: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&w.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        slots, 0,
        "no new slot may have been made on the new primary"
    );
}
