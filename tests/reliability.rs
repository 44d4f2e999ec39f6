//! The fault suite: real Postgres, the strict receiver and the real
//! binary under random HTTP faults, a long receiver outage, a Postgres
//! restart, repeated SIGKILLs, two replicas racing for one slot and an
//! invalidated slot. Every test ends with a consistency check against the
//! database: the receiver's contacts equal the employees table trait for
//! trait, every sale arrived (duplicates counted), each contact's changes
//! arrived in commit order, and the slot's confirmed position reached the
//! WAL end.
//!
//! Random choices come from `fastrand` with a fixed seed, printed by each
//! test; set `RELIABILITY_SEED` to replay another one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::connector::Connector;
use crate::support::pg::{self, private_cluster, TestDb};
use crate::support::receiver::{id_string, Fault, Receiver};
use crate::support::setup::{world, world_on, World};

/// Employees are upserted by a unique email (so a writer may retry a
/// statement whose outcome it did not learn), each update bumps
/// `career_sales` by one (a per-contact commit-order counter), and the sale
/// id travels as a track property so duplicates can be told apart.
const SCHEMA_SQL: &str = "
    CREATE TABLE employees (
        id serial PRIMARY KEY,
        email text NOT NULL UNIQUE,
        first_name text,
        last_name text,
        career_sales int8 NOT NULL DEFAULT 0
    );
    CREATE TABLE sales (
        id serial PRIMARY KEY,
        employee_email text NOT NULL,
        amount int8 NOT NULL,
        customer text
    );
    -- Not mapped, not published: WAL filler.
    CREATE TABLE filler (id serial PRIMARY KEY, pad text);
";

const TABLES: &str = "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {first_name: first_name, last_name: last_name, career_sales: career_sales}
  - table: public.sales
    track:
      id: employee_email
      event: made_sale
      properties: {sale_id: id, amount: amount, customer: customer}
";

fn seed(default: u64) -> u64 {
    std::env::var("RELIABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// The database's truth and the receiver's view of it.
// ---------------------------------------------------------------------------

/// Every employee as the traits ConveYour should hold: email → traits.
async fn db_contacts(db: &TestDb) -> BTreeMap<String, Value> {
    let client = db.client().await;
    client
        .query(
            "SELECT email, first_name, last_name, career_sales FROM employees",
            &[],
        )
        .await
        .expect("reading employees")
        .into_iter()
        .map(|r| {
            let email: String = r.get(0);
            let first: Option<String> = r.get(1);
            let last: Option<String> = r.get(2);
            let sales: i64 = r.get(3);
            (
                email,
                json!({"first_name": first, "last_name": last, "career_sales": sales}),
            )
        })
        .collect()
}

/// Every sale: id → (contact, amount).
async fn db_sales(db: &TestDb) -> BTreeMap<i64, (String, i64)> {
    let client = db.client().await;
    client
        .query("SELECT id::int8, employee_email, amount FROM sales", &[])
        .await
        .expect("reading sales")
        .into_iter()
        .map(|r| (r.get::<_, i64>(0), (r.get(1), r.get(2))))
        .collect()
}

fn same_value(got: Option<&Value>, want: &Value) -> bool {
    match (got, want) {
        (Some(g), Value::Number(w)) => g.as_f64().is_some() && g.as_f64() == w.as_f64(),
        (Some(g), w) => g == w,
        (None, Value::Null) => false, // an insert sends every trait, null included
        (None, _) => false,
    }
}

/// Differences between the receiver's contacts and the database (at most 10).
fn contact_diffs(rx: &Receiver, want: &BTreeMap<String, Value>) -> Vec<String> {
    let got = rx.contacts();
    let mut diffs = Vec::new();
    for (email, traits) in want {
        match got.get(email) {
            None => diffs.push(format!("{email}: never identified")),
            Some(have) => {
                for (k, v) in traits.as_object().unwrap() {
                    if !same_value(have.get(k), v) {
                        diffs.push(format!(
                            "{email}.{k}: receiver has {:?}, database has {v}",
                            have.get(k)
                        ));
                    }
                }
            }
        }
    }
    for email in got.keys() {
        if !want.contains_key(email) {
            diffs.push(format!("{email}: identified but not in the database"));
        }
    }
    diffs.truncate(10);
    diffs
}

/// The sale id of a received track event.
fn sale_id(event: &Value) -> i64 {
    event["properties"]["sale_id"]
        .as_i64()
        .unwrap_or_else(|| panic!("track event without an integer sale_id: {event}"))
}

struct SalesCheck {
    /// Sales in the database that never arrived.
    missing: Vec<i64>,
    /// Events that do not match the row (wrong contact or amount, or unknown id).
    wrong: Vec<String>,
    /// Events received beyond the first for their sale.
    duplicates: usize,
}

fn check_sales(rx: &Receiver, want: &BTreeMap<i64, (String, i64)>) -> SalesCheck {
    let mut seen: HashMap<i64, usize> = HashMap::new();
    let mut wrong = Vec::new();
    for (contact, event) in rx.tracks() {
        let id = sale_id(&event);
        *seen.entry(id).or_default() += 1;
        match want.get(&id) {
            Some((email, amount))
                if *email == contact && event["properties"]["amount"].as_i64() == Some(*amount) => {
            }
            Some(row) => wrong.push(format!("sale {id}: got {contact} {event}, row is {row:?}")),
            None => wrong.push(format!(
                "sale {id}: not in the database ({contact} {event})"
            )),
        }
    }
    SalesCheck {
        missing: want
            .keys()
            .filter(|id| !seen.contains_key(id))
            .copied()
            .collect(),
        wrong,
        duplicates: seen.values().map(|n| n - 1).sum(),
    }
}

/// Waits until the receiver holds exactly the database's final state (every
/// trait of every employee, every sale), then until the slot's confirmed
/// position reaches the WAL end. Returns the number of duplicate sales.
async fn assert_consistent(w: &World, conn: &Connector, what: &str, timeout: Duration) -> usize {
    let end = w.db.wal_lsn().await;
    let contacts = db_contacts(&w.db).await;
    let sales = db_sales(&w.db).await;
    let deadline = Instant::now() + timeout;
    loop {
        let diffs = contact_diffs(&w.rx, &contacts);
        let check = check_sales(&w.rx, &sales);
        assert!(
            check.wrong.is_empty(),
            "{what}: events that do not match their rows: {:#?}",
            check.wrong
        );
        if diffs.is_empty() && check.missing.is_empty() {
            eprintln!(
                "{what}: {} contacts and {} sales consistent ({} duplicate sale events)",
                contacts.len(),
                sales.len(),
                check.duplicates
            );
            w.wait_confirmed(end, Duration::from_secs(30)).await;
            return check.duplicates;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: the receiver does not match the database after {timeout:?}\n\
                 contact differences: {diffs:#?}\nmissing sales ({}): {:?}\nreceiver: {}\n\
                 connector running: {}\n--- connector log tail ---\n{}",
                check.missing.len(),
                &check.missing[..check.missing.len().min(20)],
                w.rx.summary(),
                conn.is_running(),
                crate::support::tail_of(conn.log_path(), 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Per contact, `career_sales` never goes down across the identify entries
/// in `entries` (arrival order), and sale ids never go down across `tracks`:
/// one writer commits them in that order. Returns the violations (at most 10).
fn order_violations(entries: &[Value], tracks: &[(String, Value)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let id = id_string(&e["id"]);
        let Some(v) = e["traits"]["career_sales"].as_i64() else {
            out.push(format!("identify #{i} for {id} without career_sales: {e}"));
            continue;
        };
        if let Some(prev) = last.insert(id.clone(), v) {
            if v < prev {
                out.push(format!(
                    "identify #{i}: {id} career_sales {v} arrived after {prev}"
                ));
            }
        }
    }
    let mut last_sale: HashMap<String, i64> = HashMap::new();
    for (i, (id, event)) in tracks.iter().enumerate() {
        let s = sale_id(event);
        if let Some(prev) = last_sale.insert(id.clone(), s) {
            if s < prev {
                out.push(format!(
                    "track #{i}: {id} sale {s} arrived after sale {prev}"
                ));
            }
        }
    }
    out.truncate(10);
    out
}

/// The last identify entry per contact carries the database's final counter.
fn assert_last_identify_is_final(entries: &[Value], contacts: &BTreeMap<String, Value>) {
    let mut last: HashMap<String, &Value> = HashMap::new();
    for e in entries {
        last.insert(id_string(&e["id"]), e);
    }
    for (email, traits) in contacts {
        let got = last
            .get(email)
            .unwrap_or_else(|| panic!("no identify for {email}"));
        assert_eq!(
            got["traits"]["career_sales"].as_i64(),
            traits["career_sales"].as_i64(),
            "the last identify of {email} is not its final state: {got}"
        );
    }
}

// ---------------------------------------------------------------------------
// Writers.
// ---------------------------------------------------------------------------

/// Each contact's changes arrived in commit order, its last identify holds
/// the database's final values, and the connector is still running.
async fn assert_in_order_and_running(w: &World, conn: &Connector) {
    let entries = w.rx.identifies();
    let violations = order_violations(&entries, &w.rx.tracks());
    assert!(
        violations.is_empty(),
        "per-contact order broken: {violations:#?}"
    );
    assert_last_identify_is_final(&entries, &db_contacts(&w.db).await);
    assert!(conn.is_running(), "the connector stopped:\n{}", conn.log());
}

/// Runs `sql` on a connection that is re-opened as needed, retrying until it
/// succeeds (for writers that live through a Postgres restart). Returns the
/// number of failed attempts.
async fn exec_retrying(url: &str, client: &mut Option<tokio_postgres::Client>, sql: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut failures = 0;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            *client = pg::connect(url).await.ok();
        }
        if let Some(c) = client.as_ref() {
            match c.batch_execute(sql).await {
                Ok(()) => return failures,
                Err(e) => {
                    failures += 1;
                    assert!(
                        Instant::now() < deadline,
                        "the writer could not commit for 90 s: {e}\n{sql}"
                    );
                    *client = None;
                }
            }
        } else {
            failures += 1;
            assert!(
                Instant::now() < deadline,
                "the writer could not connect for 90 s"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A steady workload until `stop` is set: each transaction inserts one to
/// three sales for random employees and bumps one employee's counter. The
/// employees (`n`) are created first. Returns the number of transactions.
fn steady_writer(
    url: String,
    n: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(seed);
        let client = pg::connect(&url).await.expect("writer connection");
        client
            .batch_execute(&format!(
                "INSERT INTO employees (email, first_name, last_name)
                 SELECT 's' || g || '@x.test', 'F' || g, 'L' FROM generate_series(1, {n}) g"
            ))
            .await
            .expect("inserting employees");
        let mut txns = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let mut sql = String::from("BEGIN;");
            for _ in 0..rng.usize(1..=3) {
                sql.push_str(&format!(
                    "INSERT INTO sales (employee_email, amount, customer) VALUES ('s{}@x.test', {}, 'c{txns}');",
                    rng.usize(1..=n),
                    rng.i64(1..10_000)
                ));
            }
            sql.push_str(&format!(
                "UPDATE employees SET career_sales = career_sales + 1, first_name = 't{txns}' WHERE email = 's{}@x.test';COMMIT;",
                rng.usize(1..=n)
            ));
            client
                .batch_execute(&sql)
                .await
                .expect("writer transaction");
            txns += 1;
            tokio::time::sleep(Duration::from_millis(rng.u64(5..20))).await;
        }
        txns
    })
}

// ---------------------------------------------------------------------------
// 1. Random faults during a mixed workload.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_mixed_workload_under_random_faults_ends_consistent_and_in_order() {
    let seed = seed(0x5EED_0001);
    eprintln!("random faults: seed {seed} (RELIABILITY_SEED={seed} replays it)");
    let w = world("rel_faults", SCHEMA_SQL).await;
    let conn = Connector::run(&w.config(TABLES, "  batch_size: 25\n"), &[]);
    w.wait_streaming(Duration::from_secs(30)).await;

    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let url = w.db.url();
        let done = done.clone();
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let client = pg::connect(&url).await.expect("writer connection");
            let (mut employees, mut sales, mut updates, mut txns) =
                (0usize, 0usize, 0usize, 0usize);
            while employees < 200 || sales < 300 {
                let mut sql = String::from("BEGIN;");
                for _ in 0..rng.usize(1..=4) {
                    let pick = rng.usize(0..10);
                    if employees < 200 && (employees < 5 || pick < 4) {
                        employees += 1;
                        sql.push_str(&format!(
                            "INSERT INTO employees (email, first_name, last_name, career_sales) VALUES ('e{employees}@x.test', 'n{txns}', 'L{employees}', 0);"
                        ));
                    } else if pick < 7 {
                        updates += 1;
                        sql.push_str(&format!(
                            "UPDATE employees SET career_sales = career_sales + 1, first_name = 'u{txns}' WHERE email = 'e{}@x.test';",
                            rng.usize(1..=employees)
                        ));
                    } else {
                        sales += 1;
                        sql.push_str(&format!(
                            "INSERT INTO sales (employee_email, amount, customer) VALUES ('e{}@x.test', {}, 'c{txns}');",
                            rng.usize(1..=employees),
                            rng.i64(1..100_000)
                        ));
                    }
                }
                sql.push_str("COMMIT;");
                client
                    .batch_execute(&sql)
                    .await
                    .expect("writer transaction");
                txns += 1;
                tokio::time::sleep(Duration::from_millis(rng.u64(0..30))).await;
            }
            done.store(true, Ordering::SeqCst);
            (employees, sales, updates, txns)
        })
    };
    let faulter = {
        let rx = w.rx.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed ^ 0xFA17);
            let mut flips: HashMap<&'static str, usize> = HashMap::new();
            // Every kind once per round, in a random order, at random
            // moments; until the writer is done, then a little longer.
            let mut order: Vec<usize> = Vec::new();
            let mut after_done = 0;
            while after_done < 4 {
                if done.load(Ordering::SeqCst) {
                    after_done += 1;
                }
                if order.is_empty() {
                    order = (0..5).collect();
                    rng.shuffle(&mut order);
                }
                let (name, fault) = match order.pop().unwrap() {
                    0 => ("500", Some(Fault::Status(500))),
                    1 => (
                        "429",
                        Some(Fault::TooManyRequests {
                            retry_after_secs: 1,
                        }),
                    ),
                    2 => ("reset", Some(Fault::Reset)),
                    3 => ("slow", Some(Fault::Slow(Duration::from_millis(200)))),
                    _ => ("none", None),
                };
                *flips.entry(name).or_default() += 1;
                match fault {
                    Some(f) => rx.set_fault(f),
                    None => rx.clear_fault(),
                }
                tokio::time::sleep(Duration::from_millis(rng.u64(100..700))).await;
            }
            rx.clear_fault();
            flips
        })
    };
    let (employees, sales, updates, txns) = writer.await.unwrap();
    let flips = faulter.await.unwrap();
    eprintln!(
        "random faults: {txns} transactions ({employees} employees, {updates} updates, {sales} sales); fault flips {flips:?}"
    );
    w.rx.clear_fault();
    let faulted = w.rx.rejected_count();
    assert!(
        faulted > 0,
        "no request was faulted: the test did not test anything\n{}",
        w.rx.summary()
    );

    let dups = assert_consistent(&w, &conn, "random faults", Duration::from_secs(90)).await;
    eprintln!(
        "random faults: {faulted} requests faulted, {dups} duplicate sale events\nreceiver: {}",
        w.rx.summary()
    );
    assert_in_order_and_running(&w, &conn).await;
}

/// With 64 requests allowed at once from the start (`concurrency: fixed`)
/// and a receiver that answers after 20 ms and fails one request in six
/// at random (500, 503, 429 with Retry-After, connection reset), every
/// contact's changes still arrive in commit order and the receiver ends
/// equal to the database.
#[tokio::test(flavor = "multi_thread")]
async fn at_the_concurrency_ceiling_random_5xx_429s_and_resets_keep_each_contact_in_order() {
    let seed = seed(0x5EED_0006);
    eprintln!("chaos at the ceiling: seed {seed} (RELIABILITY_SEED={seed} replays it)");
    let w = world("rel_chaos", SCHEMA_SQL).await;
    let conn = Connector::run(
        &w.config(
            TABLES,
            "  batch_size: 10\n  max_in_flight: 64\n  concurrency: fixed\n",
        ),
        &[],
    );
    w.wait_streaming(Duration::from_secs(30)).await;
    w.rx.set_latency(Duration::from_millis(20));
    w.rx.set_fault(Fault::Chaos {
        seed,
        p_500: 0.05,
        p_503: 0.05,
        p_429: 0.02,
        p_reset: 0.05,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let writer = steady_writer(w.db.url(), 400, seed, stop.clone());
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::SeqCst);
    let txns = writer.await.unwrap();
    let (faulted, together) = (w.rx.rejected_count(), w.rx.max_concurrent());
    w.rx.clear_fault();
    assert!(faulted > 0, "no request was faulted\n{}", w.rx.summary());
    let dups = assert_consistent(&w, &conn, "chaos at the ceiling", Duration::from_secs(120)).await;
    eprintln!(
        "chaos at the ceiling: {txns} transactions, {faulted} requests faulted, at most {together} at once, {dups} duplicate sale events\nreceiver: {}",
        w.rx.summary()
    );
    assert!(
        together > 4,
        "requests never overlapped beyond four at once ({together}): the test did not run at concurrency"
    );
    assert_in_order_and_running(&w, &conn).await;
}

// ---------------------------------------------------------------------------
// 2. A 30 s receiver outage.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_thirty_second_receiver_outage_holds_the_position_then_catches_up() {
    let w = world("rel_outage", SCHEMA_SQL).await;
    let conn = Connector::run(&w.config(TABLES, "  batch_size: 50\n"), &[]);
    w.wait_streaming(Duration::from_secs(30)).await;
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('warm@x.test', 'w');")
        .await;
    w.rx.wait_until("the warm-up identify", Duration::from_secs(20), |r| {
        r.identify_count() >= 1
    })
    .await;

    w.rx.set_fault(Fault::Outage);
    let outage_start = Instant::now();
    // The first change of the outage; nothing at or past its commit may be
    // confirmed until the receiver is back.
    let client = w.db.client().await;
    client
        .batch_execute(
            "INSERT INTO employees (email, first_name, career_sales) VALUES ('o0@x.test', 'first', 0);
             INSERT INTO sales (employee_email, amount) VALUES ('o0@x.test', 1);",
        )
        .await
        .unwrap();
    let after_first = pg::parse_lsn(
        &client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
    )
    .unwrap();
    // More changes through the first 20 s of the outage.
    let writer = {
        let url = w.db.url();
        tokio::spawn(async move {
            let client = pg::connect(&url).await.unwrap();
            for round in 1..=20 {
                client
                    .batch_execute(&format!(
                        "INSERT INTO employees (email, first_name, career_sales) VALUES ('o{round}@x.test', 'r{round}', 0);
                         UPDATE employees SET career_sales = career_sales + 1 WHERE email LIKE 'o%';
                         INSERT INTO sales (employee_email, amount) SELECT email, {round} FROM employees WHERE email LIKE 'o%';"
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = w.confirmed().await;
    assert!(
        held < after_first,
        "confirmed {held:X} reached past the first change of the outage ({after_first:X}) with the receiver down"
    );
    let mut moved = Vec::new();
    while outage_start.elapsed() < Duration::from_secs(30) {
        let c = w.confirmed().await;
        if c != held {
            moved.push(format!("{c:X} at {:?}", outage_start.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    writer.await.unwrap();
    assert!(
        moved.is_empty(),
        "confirmed_flush_lsn moved from {held:X} during the outage: {moved:?}"
    );
    assert_eq!(
        w.rx.identify_count(),
        1,
        "nothing can be accepted during an outage"
    );
    assert!(conn.is_running(), "the connector gave up:\n{}", conn.log());

    let back = Instant::now();
    w.rx.clear_fault();
    assert_consistent(&w, &conn, "after a 30 s outage", Duration::from_secs(60)).await;
    eprintln!(
        "30 s outage: caught up (data and position) {:.1} s after the receiver came back",
        back.elapsed().as_secs_f64()
    );
    let violations = order_violations(&w.rx.identifies()[1..], &w.rx.tracks());
    assert!(violations.is_empty(), "order broken: {violations:#?}");
}

// ---------------------------------------------------------------------------
// 3. Postgres restarted mid-stream.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_restart_mid_stream_is_reconnected_and_loses_nothing() {
    let cluster = tokio::task::spawn_blocking(private_cluster).await.unwrap();
    let w = world_on(cluster, "rel_pgrestart", SCHEMA_SQL).await;
    let conn = Connector::run(&w.config(TABLES, ""), &[]);
    w.wait_streaming(Duration::from_secs(30)).await;
    let pid = conn.pid();

    let progress = Arc::new(AtomicU64::new(0));
    let writer = {
        let url = w.db.url();
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut client = None;
            let mut failures = 0;
            for i in 1..=300u64 {
                // Idempotent on retry: the upsert converges, a repeated sale
                // is a second committed row that must arrive too.
                failures += exec_retrying(
                    &url,
                    &mut client,
                    &format!(
                        "BEGIN;
                         INSERT INTO employees (email, first_name, career_sales) VALUES ('p{e}@x.test', 'i{i}', {i})
                           ON CONFLICT (email) DO UPDATE SET first_name = excluded.first_name, career_sales = excluded.career_sales;
                         INSERT INTO sales (employee_email, amount) VALUES ('p{e}@x.test', {i});
                         COMMIT;",
                        e = i % 40
                    ),
                )
                .await;
                progress.store(i, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            failures
        })
    };
    w.rx.wait_until(
        "some changes before the restart",
        Duration::from_secs(30),
        |r| r.identify_count() >= 50,
    )
    .await;
    let restarted_at = progress.load(Ordering::SeqCst);
    tokio::task::spawn_blocking(move || cluster.restart())
        .await
        .unwrap();
    eprintln!("postgres restart: restarted after the writer's transaction {restarted_at}");
    let failures = writer.await.unwrap();
    eprintln!("postgres restart: the writer retried {failures} times");

    assert_consistent(
        &w,
        &conn,
        "after a Postgres restart",
        Duration::from_secs(60),
    )
    .await;
    assert!(
        conn.is_running() && conn.pid() == pid,
        "the connector did not survive the restart:\n{}",
        conn.log()
    );
    let log = conn.log();
    assert!(
        log.contains("reconnecting"),
        "the connector should log its reconnect:\n{log}"
    );
    // Identify entries per contact, in arrival order: the counter never goes
    // back (the writer commits it increasing per contact).
    let violations = order_violations(&w.rx.identifies(), &w.rx.tracks());
    assert!(violations.is_empty(), "order broken: {violations:#?}");
}

// ---------------------------------------------------------------------------
// 4. SIGKILL five times.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn five_sigkills_lose_nothing_and_repeat_at_most_what_was_in_flight() {
    const BATCH: usize = 20;
    const IN_FLIGHT: usize = 2;
    // What a kill can make repeat: delivery batches no action more than
    // `max_in_flight × batch_size` past the mark it records as
    // acknowledgements move it, and nothing before the mark repeats.
    const BOUND: usize = IN_FLIGHT * BATCH;
    let seed = seed(0x5EED_0004);
    eprintln!("sigkill x5: seed {seed} (RELIABILITY_SEED={seed} replays it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let w = world("rel_sigkill", SCHEMA_SQL).await;
    let config = w.config(
        TABLES,
        &format!("  batch_size: {BATCH}\n  max_in_flight: {IN_FLIGHT}\n"),
    );
    let mut conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(30)).await;
    // Replies take a little while, so requests are in flight when kills land.
    w.rx.set_fault(Fault::Slow(Duration::from_millis(20)));

    let stop = Arc::new(AtomicBool::new(false));
    let writer = steady_writer(w.db.url(), 50, seed, stop.clone());
    // Index into the receiver's tracks / identifies where each run starts.
    let mut track_starts = vec![0usize];
    let mut identify_starts = vec![0usize];
    let mut logs = Vec::new();
    for kill in 1..=5 {
        tokio::time::sleep(Duration::from_millis(rng.u64(700..2500))).await;
        conn.sigkill();
        conn.wait(Duration::from_secs(10)).await;
        // Let a request whose body was already sent finish being recorded.
        tokio::time::sleep(Duration::from_millis(100)).await;
        track_starts.push(w.rx.track_count());
        identify_starts.push(w.rx.identify_count());
        let (confirmed, wal) = (w.confirmed().await, w.db.wal_lsn().await);
        eprintln!(
            "sigkill x5: kill {kill} after {} tracks, {} identifies; slot confirmed {confirmed:X}, WAL at {wal:X} ({} bytes behind)",
            w.rx.track_count(),
            w.rx.identify_count(),
            wal.saturating_sub(confirmed)
        );
        logs.push(conn.log());
        conn = Connector::run(&config, &[]);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let txns = writer.await.unwrap();
    w.rx.clear_fault();
    assert_consistent(&w, &conn, "after 5 SIGKILLs", Duration::from_secs(60)).await;

    // Duplicates per kill: events of the run after the kill whose sale had
    // already been delivered.
    let tracks = w.rx.tracks();
    track_starts.push(tracks.len());
    let mut seen = HashSet::new();
    let mut per_kill = Vec::new();
    for run in 0..track_starts.len() - 1 {
        let mut dups = 0;
        for (_, event) in &tracks[track_starts[run]..track_starts[run + 1]] {
            if !seen.insert(sale_id(event)) {
                dups += 1;
            }
        }
        if run > 0 {
            per_kill.push(dups);
        } else {
            assert_eq!(dups, 0, "duplicates before any kill");
        }
    }
    eprintln!(
        "sigkill x5: {txns} writer transactions, {} sales; duplicate track events per kill: {per_kill:?} (bound {BOUND})",
        seen.len(),
    );
    for (i, d) in per_kill.iter().enumerate() {
        assert!(
            *d <= BOUND,
            "kill {} repeated {d} track events, more than max_in_flight x batch_size = {BOUND}: more than what was in flight",
            i + 1,
        );
    }

    // At least once for every update: each employee's counter took every
    // value from 0 to its final one, and each value arrived.
    let entries = w.rx.identifies();
    let mut values: HashMap<String, HashSet<i64>> = HashMap::new();
    for e in &entries {
        if let Some(v) = e["traits"]["career_sales"].as_i64() {
            values.entry(id_string(&e["id"])).or_default().insert(v);
        }
    }
    for (email, traits) in db_contacts(&w.db).await {
        let last = traits["career_sales"].as_i64().unwrap();
        let got = values.get(&email).cloned().unwrap_or_default();
        let missing: Vec<i64> = (0..=last).filter(|v| !got.contains(v)).collect();
        assert!(
            missing.is_empty(),
            "updates of {email} never delivered: career_sales {missing:?}"
        );
    }
    // Within each run, per-contact order holds.
    identify_starts.push(entries.len());
    for run in 0..identify_starts.len() - 1 {
        let v = order_violations(
            &entries[identify_starts[run]..identify_starts[run + 1]],
            &tracks[track_starts[run]..track_starts[run + 1]],
        );
        assert!(v.is_empty(), "order broken in run {run}: {v:#?}");
    }
    for (i, log) in logs.iter().enumerate() {
        assert!(
            !log.contains("panicked"),
            "run {i} panicked before its kill:\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------
// 5. Two connectors on one config.
// ---------------------------------------------------------------------------

/// The slot's `active_pid` (the walsender's pid), if a session holds it.
async fn active_pid(db: &TestDb, slot: &str) -> Option<i32> {
    db.client()
        .await
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0))
}

fn streams(c: &Connector) -> bool {
    c.log().contains(r#""message":"streaming""#)
}

#[tokio::test(flavor = "multi_thread")]
async fn of_two_connectors_one_streams_and_the_other_takes_over_within_15_s() {
    /// How long the pair runs side by side before the kill: long enough for
    /// the standby's retry backoff to grow to its cap.
    const STANDBY: Duration = Duration::from_secs(30);
    let w = world("rel_pair", SCHEMA_SQL).await;
    let config = w.config(TABLES, "");
    let json_logs = [("CONVEYOUR_CDC_LOG_FORMAT", "json")];
    // Both at once, as two replicas of one deployment start.
    let a = Connector::run(&config, &json_logs);
    let b = Connector::run(&config, &json_logs);

    let deadline = Instant::now() + Duration::from_secs(30);
    let (streaming, standby) = loop {
        match (streams(&a), streams(&b)) {
            (true, false) => break (&a, &b),
            (false, true) => break (&b, &a),
            (true, true) => panic!(
                "both connectors stream\n--- a ---\n{}\n--- b ---\n{}",
                a.log(),
                b.log()
            ),
            (false, false) => {
                assert!(
                    Instant::now() < deadline,
                    "neither connector streams\n--- a ---\n{}\n--- b ---\n{}",
                    a.log(),
                    b.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Writes start once the slot exists (earlier ones are not in its stream).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = steady_writer(w.db.url(), 30, seed(0x5EED_0005), stop.clone());
    // Exactly one walsender holds the slot the whole time, and the standby
    // keeps running and keeps being told the slot is busy.
    let started = Instant::now();
    let mut holder = None;
    while started.elapsed() < STANDBY {
        let pid = active_pid(&w.db, &w.slot).await;
        assert!(pid.is_some(), "nobody holds the slot");
        if holder.is_none() {
            holder = pid;
        }
        assert_eq!(pid, holder, "the slot changed hands with nobody killed");
        assert!(
            !streams(standby),
            "the standby streams too:\n{}",
            standby.log()
        );
        assert!(
            standby.is_running() && streaming.is_running(),
            "a connector exited\n--- streaming ---\n{}\n--- standby ---\n{}",
            streaming.log(),
            standby.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let holder = holder.unwrap();
    let standby_log = standby.log();
    assert!(
        standby_log.contains(&format!("is active for PID {holder}")),
        "the standby should log that the slot is held by PID {holder}:\n{standby_log}"
    );
    let busy_retries = standby_log.matches("is active for PID").count();
    w.rx.wait_until("changes flowing", Duration::from_secs(20), |r| {
        r.track_count() > 50
    })
    .await;

    streaming.sigkill();
    let killed = Instant::now();
    streaming.wait(Duration::from_secs(10)).await;
    let failover = loop {
        let pid = active_pid(&w.db, &w.slot).await;
        if pid.is_some() && pid != Some(holder) && streams(standby) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the standby did not take over within 60 s\n--- standby ---\n{}",
            standby.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "two connectors: failover took {:.2} s (standby saw the slot busy {busy_retries} times in {STANDBY:?})",
        failover.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    assert_consistent(&w, standby, "across the takeover", Duration::from_secs(60)).await;
    assert!(
        failover < Duration::from_secs(15),
        "the standby took {failover:?} to take over (limit 15 s)\n--- standby log ---\n{}",
        standby.log()
    );
}

// ---------------------------------------------------------------------------
// 6. An invalidated slot.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn an_invalidated_slot_stops_the_connector_with_how_to_recover() {
    let cluster = tokio::task::spawn_blocking(private_cluster).await.unwrap();
    let w = world_on(cluster, "rel_lost", SCHEMA_SQL).await;
    let config = w.config(TABLES, "");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(30)).await;
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('l@x.test', 'l');")
        .await;
    w.rx.wait_until("the first identify", Duration::from_secs(20), |r| {
        r.identify_count() == 1
    })
    .await;
    conn.sigterm();
    assert!(conn.wait(Duration::from_secs(30)).await.success());

    let admin = cluster.admin().await;
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "ALTER SYSTEM SET max_wal_size = '32MB'",
        "ALTER SYSTEM SET min_wal_size = '32MB'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let client = w.db.client().await;
    let mut status = String::new();
    for round in 0..40 {
        for sql in [
            "INSERT INTO filler (pad) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 3000) g",
            "SELECT pg_switch_wal()",
            "CHECKPOINT",
        ] {
            client.batch_execute(sql).await.unwrap();
        }
        status =
            w.db.query_opt_string(&format!(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{}'",
                w.slot
            ))
            .await
            .unwrap_or_default();
        if status == "lost" {
            eprintln!("invalidated slot: lost after {} rounds of WAL", round + 1);
            break;
        }
    }
    for sql in [
        "ALTER SYSTEM RESET max_slot_wal_keep_size",
        "ALTER SYSTEM RESET max_wal_size",
        "ALTER SYSTEM RESET min_wal_size",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    assert_eq!(status, "lost", "could not get the slot invalidated");

    let conn = Connector::run(&config, &[]);
    let started = Instant::now();
    let exit = conn.wait(Duration::from_secs(20)).await;
    let took = started.elapsed();
    let log = conn.log();
    eprintln!("invalidated slot: the connector exited ({exit}) after {took:.1?}");
    assert!(
        !exit.success(),
        "an invalidated slot must stop the connector:\n{log}"
    );
    assert!(
        took < Duration::from_secs(15),
        "took {took:?} to stop on an invalidated slot:\n{log}"
    );
    assert!(
        log.contains("invalidated") && log.contains(&w.slot),
        "the error should say the slot was invalidated:\n{log}"
    );
    assert!(
        log.contains(&format!("pg_drop_replication_slot('{}')", w.slot))
            && log.contains("start again"),
        "the error should say how to recover:\n{log}"
    );
    assert_eq!(w.rx.identify_count(), 1, "nothing more may have been sent");
}
