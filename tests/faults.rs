//! Nothing is lost and nothing is confirmed early when ConveYour fails,
//! refuses, or the connector dies.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::connector::Connector;
use crate::support::receiver::{Fault, Receiver};
use crate::support::setup::{world, World, APPKEY, ROSTER_SQL, ROSTER_TABLES, TOKEN};

/// The position stood still while requests failed, and never reached the
/// writes they carried. (Before the first write is received, keepalives may
/// still move an idle slot forward, so `held` is only a lower bound.)
fn assert_held(seen: &HashSet<u64>, held: u64, end: u64) {
    assert_eq!(
        seen.len(),
        1,
        "confirmed_flush_lsn moved while ConveYour failed: {seen:?}"
    );
    let at = *seen.iter().next().unwrap();
    assert!(
        at >= held && at < end,
        "position {at:X} not in [{held:X}, {end:X})"
    );
}

/// Samples the slot's position for `period` and returns every value seen.
async fn positions_during(w: &crate::support::setup::World, period: Duration) -> HashSet<u64> {
    let mut seen = HashSet::new();
    let deadline = Instant::now() + period;
    while Instant::now() < deadline {
        seen.insert(w.confirmed().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_of_503s_holds_the_position_then_everything_arrives_in_order() {
    let w = world("outage", ROSTER_SQL).await;
    let conn = Connector::run(&w.roster_config(), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('warmup@x.test', 'w');")
        .await;
    w.rx.wait_until("warm-up identify", Duration::from_secs(60), |r| {
        r.identify_count() >= 1
    })
    .await;
    let warm = w.db.wal_lsn().await;
    w.wait_confirmed(warm, Duration::from_secs(60)).await;
    let held = w.confirmed().await;

    w.rx.set_fault(Fault::Status(503));
    // Five contacts, each updated ten times in separate transactions, with
    // sales between: per-contact order must survive the outage.
    for round in 0..10 {
        let mut sql = String::new();
        for c in 0..5 {
            if round == 0 {
                sql.push_str(&format!(
                    "INSERT INTO employees (email, first_name, career_sales) VALUES ('c{c}@x.test', 'r0', 0);"
                ));
            } else {
                sql.push_str(&format!(
                    "UPDATE employees SET first_name = 'r{round}', career_sales = {round} WHERE email = 'c{c}@x.test';"
                ));
            }
            sql.push_str(&format!(
                "INSERT INTO sales (employee_email, amount, customer) VALUES ('c{c}@x.test', {round}, 'cust');"
            ));
        }
        w.db.exec(&sql).await;
    }
    let end = w.db.wal_lsn().await;
    w.rx.wait_until("requests refused with 503", Duration::from_secs(10), |r| {
        r.rejected_count() >= 3
    })
    .await;
    let seen = positions_during(&w, Duration::from_secs(3)).await;
    assert_held(&seen, held, end);
    assert_eq!(
        w.rx.identify_count(),
        1,
        "nothing may be accepted during the outage"
    );

    w.rx.clear_fault();
    w.rx.wait_until(
        "every change after the outage",
        Duration::from_secs(60),
        |r| r.identify_count() > 50 && r.track_count() >= 50,
    )
    .await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;

    // Per contact, identifies and events arrive in commit order.
    let mut rounds: HashMap<String, Vec<String>> = HashMap::new();
    for e in w.rx.identifies().iter().skip(1) {
        rounds
            .entry(e["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(e["traits"]["first_name"].as_str().unwrap().to_owned());
    }
    let expected: Vec<String> = (0..10).map(|r| format!("r{r}")).collect();
    for c in 0..5 {
        assert_eq!(
            rounds[&format!("c{c}@x.test")],
            expected,
            "identify order for c{c}"
        );
    }
    let mut amounts: HashMap<String, Vec<i64>> = HashMap::new();
    for (id, e) in w.rx.tracks() {
        amounts
            .entry(id)
            .or_default()
            .push(e["properties"]["amount"].as_i64().unwrap());
    }
    for c in 0..5 {
        assert_eq!(
            amounts[&format!("c{c}@x.test")],
            (0..10).collect::<Vec<i64>>(),
            "event order for c{c}"
        );
    }
    for c in 0..5 {
        let state = w.rx.contact(&format!("c{c}@x.test")).unwrap();
        assert_eq!(state["first_name"], "r9");
    }
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_200_with_status_error_is_not_an_acknowledgement() {
    let w = world("bodyerr", ROSTER_SQL).await;
    let conn = Connector::run(
        &w.config(
            crate::support::setup::ROSTER_TABLES,
            "  body_error_retries: 1000\n",
        ),
        &[],
    );
    w.wait_streaming(Duration::from_secs(60)).await;
    let held = w.confirmed().await;
    w.rx.set_fault(Fault::BodyError);
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('b@x.test', 'B');")
        .await;
    let end = w.db.wal_lsn().await;
    w.rx.wait_until("several not-ok replies", Duration::from_secs(10), |r| {
        r.rejected_count() >= 3
    })
    .await;
    let seen = positions_during(&w, Duration::from_secs(2)).await;
    assert_held(&seen, held, end);
    w.rx.clear_fault();
    w.rx.wait_until(
        "the identify after the errors",
        Duration::from_secs(60),
        |r| r.identify_count() == 1,
    )
    .await;
    // Every attempt of the same request carries the same Idempotency-Key.
    let keys: HashSet<Option<String>> =
        w.rx.requests()
            .into_iter()
            .map(|r| r.idempotency_key)
            .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys.iter().all(|k| k.is_some()));
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_rejection_stops_the_connector_without_advancing() {
    let w = world("reject", ROSTER_SQL).await;
    let config = w.config(crate::support::setup::ROSTER_TABLES, "  on_reject: stop\n");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('ok@x.test', 'ok');")
        .await;
    w.rx.wait_until("the first identify", Duration::from_secs(60), |r| {
        r.identify_count() == 1
    })
    .await;
    let before_bad = w.db.wal_lsn().await;
    w.wait_confirmed(before_bad, Duration::from_secs(60)).await;
    let held = w.confirmed().await;

    w.rx.set_fault(Fault::RejectId("poison@x.test".into()));
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('poison@x.test', 'bad');")
        .await;
    let end = w.db.wal_lsn().await;
    let status = conn.wait(Duration::from_secs(60)).await;
    assert!(!status.success(), "a rejection must stop the connector");
    let log = conn.log();
    assert!(
        log.contains("public.employees")
            && log.contains("poison@x.test")
            && log.contains("HTTP 400"),
        "{log}"
    );
    // Keepalives may have moved an idle slot a little before the row came,
    // but never to its end; the restart below shows the row is still ahead.
    let at = w.confirmed().await;
    assert!(
        at >= held && at < end,
        "the position moved past a rejected row"
    );

    // After the cause is fixed, a restart delivers the row.
    w.rx.clear_fault();
    let conn = Connector::run(&config, &[]);
    w.rx.wait_until("the fixed row", Duration::from_secs(60), |r| {
        r.contact("poison@x.test").is_some()
    })
    .await;
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connector_killed_mid_stream_delivers_everything_after_restart() {
    let w = world("sigkill", ROSTER_SQL).await;
    let config = w.roster_config();
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    // Slow replies so requests are in flight when the kill lands.
    w.rx.set_fault(Fault::Slow(Duration::from_millis(30)));

    let writer = {
        let url = w.db.url();
        tokio::spawn(async move {
            let client = crate::support::pg::connect(&url).await.unwrap();
            for batch in 0..40 {
                client
                    .batch_execute(&format!(
                        "INSERT INTO employees (email, first_name) SELECT 'k' || g || '@x.test', 'b{batch}' FROM generate_series({}, {}) g;
                         INSERT INTO sales (employee_email, amount, customer) VALUES ('k{}@x.test', {batch}, 'c');",
                        batch * 50 + 1,
                        batch * 50 + 50,
                        batch * 50 + 1
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    w.rx.wait_until(
        "some progress before the kill",
        Duration::from_secs(60),
        |r| r.identify_count() >= 200,
    )
    .await;
    conn.sigkill();
    conn.wait(Duration::from_secs(10)).await;
    writer.await.unwrap();
    let end = w.db.wal_lsn().await;

    w.rx.clear_fault();
    let conn = Connector::run(&config, &[]);
    w.rx.wait_until("all 2000 contacts", Duration::from_secs(60), |r| {
        r.contact_count() >= 2000
    })
    .await;
    w.rx.wait_until("all 40 sales", Duration::from_secs(60), |r| {
        r.tracks()
            .iter()
            .map(|(_, e)| e["properties"]["amount"].as_i64().unwrap())
            .collect::<HashSet<_>>()
            .len()
            == 40
    })
    .await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    let duplicates = w.rx.identify_count() - 2000;
    eprintln!("identify entries delivered twice after SIGKILL: {duplicates}");
    // The connector's tables were there already: a restart does not make
    // the server send a NOTICE about each of them.
    let log = conn.log();
    assert!(!log.contains("already exists"), "{log}");
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_million_row_transaction_streams_through_in_bounded_memory() {
    const ROWS: usize = 1_000_000;
    // A cluster of its own: every walsender of a cluster reads all of its
    // WAL, and a million rows of it would slow the tests running alongside.
    let w = crate::support::setup::world_on(
        crate::support::pg::private_cluster(),
        "million",
        ROSTER_SQL,
    )
    .await;
    w.rx.set_keep_bodies(false);
    let conn = Connector::run(&w.roster_config(), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec(&format!(
        "INSERT INTO employees (email, first_name, last_name, career_sales)
         SELECT 'm' || g || '@x.test', 'First' || g, 'Last', g FROM generate_series(1, {ROWS}) g;"
    ))
    .await;
    let end = w.db.wal_lsn().await;
    let started = Instant::now();
    w.rx.wait_until("a million identifies", Duration::from_secs(600), |r| {
        r.identify_count() >= ROWS
    })
    .await;
    let elapsed = started.elapsed();
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    let rss = conn.peak_rss_kib().expect("peak RSS");
    eprintln!(
        "million-row transaction: {ROWS} identifies in {:.1} s after commit ({:.0} changes/s), peak RSS {:.1} MiB",
        elapsed.as_secs_f64(),
        ROWS as f64 / elapsed.as_secs_f64(),
        rss as f64 / 1024.0
    );
    assert_eq!(w.rx.identify_count(), ROWS, "every row exactly once");
    assert!(rss < 200 * 1024, "peak RSS {rss} KiB is over 200 MiB");
    conn.sigterm();
    assert!(conn.wait(Duration::from_secs(60)).await.success());
}

/// The outage gauge as `/metrics` shows it.
async fn outage_gauge(addr: &str) -> f64 {
    let (status, text) = crate::observe::get(addr, "/metrics").await;
    assert_eq!(status, 200);
    *crate::observe::parse(&text)
        .get("conveyour_cdc_outage")
        .expect("conveyour_cdc_outage is exported")
}

async fn dead_letter_count(w: &crate::support::setup::World) -> i64 {
    w.db.query_i64("SELECT count(*) FROM conveyour_cdc.dead_letters")
        .await
}

/// Every employee's traits and every sale's (contact, amount) in the
/// database, and the same as the receiver holds them.
async fn roster_state(
    w: &crate::support::setup::World,
) -> (BTreeMap<String, Value>, Vec<(String, i64)>) {
    let client = w.db.client().await;
    let contacts = client
        .query(
            "SELECT email, first_name, last_name, career_sales::int8 FROM employees",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let (first, last, sales): (Option<String>, Option<String>, Option<i64>) =
                (r.get(1), r.get(2), r.get(3));
            (
                r.get::<_, String>(0),
                json!({"first_name": first, "last_name": last, "career_sales": sales}),
            )
        })
        .collect();
    let mut sales: Vec<(String, i64)> = client
        .query("SELECT employee_email, amount::int8 FROM sales", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    sales.sort();
    (contacts, sales)
}

fn receiver_state(rx: &Receiver) -> (BTreeMap<String, Value>, Vec<(String, i64)>) {
    let contacts = rx
        .contacts()
        .into_iter()
        .map(|(id, traits)| {
            let sales = traits.get("career_sales").and_then(Value::as_f64);
            (
                id,
                json!({
                    "first_name": traits.get("first_name"),
                    "last_name": traits.get("last_name"),
                    "career_sales": sales.map(|s| s as i64),
                }),
            )
        })
        .collect();
    let mut sales: Vec<(String, i64)> = rx
        .tracks()
        .into_iter()
        .map(|(id, e)| {
            (
                id,
                e["properties"]["amount"].as_f64().unwrap_or(-1.0) as i64,
            )
        })
        .collect();
    sales.sort();
    (contacts, sales)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_minute_of_status_error_on_every_request_is_an_outage_not_dead_letters() {
    // ConveYour answers every request with 200 and {"status":"error"}
    // for a minute: an outage. The connector must hold the position and
    // send everything again once ConveYour recovers, not dead-letter each
    // change after body_error_retries and move on.
    let w = world("body_outage", ROSTER_SQL).await;
    let conn = Connector::run(
        &w.config(crate::support::setup::ROSTER_TABLES, "  batch_size: 20\n"),
        &[],
    );
    let addr = crate::observe::metrics_addr(&conn).await;
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec(
        "INSERT INTO employees (email, first_name, career_sales) VALUES ('warm@x.test', 'w', 0);",
    )
    .await;
    let warm = w.db.wal_lsn().await;
    w.wait_confirmed(warm, Duration::from_secs(60)).await;
    assert_eq!(outage_gauge(&addr).await, 0.0);

    w.rx.set_fault(Fault::BodyError);
    let outage = Instant::now();
    // The first affected commit: 30 rows in one transaction, so requests
    // of several entries are refused (and halved) too.
    w.db.exec(
        "INSERT INTO employees (email, first_name, career_sales)
           SELECT 'e' || g || '@x.test', 'r0', 0 FROM generate_series(1, 30) g;
         INSERT INTO sales (employee_email, amount, customer)
           SELECT 'e' || g || '@x.test', g, 'c' FROM generate_series(1, 30) g;",
    )
    .await;
    let first_end = w.db.wal_lsn().await;
    // A stream of changes through the outage.
    let writer = {
        let url = w.db.url();
        tokio::spawn(async move {
            let client = crate::support::pg::connect(&url).await.unwrap();
            for round in 1..=25 {
                client
                    .batch_execute(&format!(
                        "UPDATE employees SET first_name = 'r{round}', career_sales = {round}
                           WHERE email = 'e{}@x.test';
                         INSERT INTO employees (email, first_name) VALUES ('n{round}@x.test', 'n');
                         INSERT INTO sales (employee_email, amount, customer)
                           VALUES ('n{round}@x.test', {round}, 'c');",
                        round % 30 + 1
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let mut gauge_up = None;
    while outage.elapsed() < Duration::from_secs(60) {
        let at = w.confirmed().await;
        assert!(
            at < first_end,
            "the position {at:X} passed the first commit of the outage (ends {first_end:X}) while ConveYour acknowledged nothing\nreceiver: {}\n{}",
            w.rx.summary(),
            crate::support::tail_of(conn.log_path(), 30)
        );
        if gauge_up.is_none() && outage_gauge(&addr).await == 1.0 {
            gauge_up = Some(outage.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    writer.await.unwrap();
    let gauge_up = gauge_up.expect("conveyour_cdc_outage never went to 1 during the outage");
    assert_eq!(outage_gauge(&addr).await, 1.0, "still an outage at its end");
    assert_eq!(w.rx.identify_count(), 1, "nothing was acknowledged");
    assert_eq!(dead_letter_count(&w).await, 0, "an outage is no bad entry");
    assert!(
        conn.is_running(),
        "an outage must not stop the connector\n{}",
        conn.log()
    );
    let log = conn.log();
    let outage_lines = log.matches("acknowledges none").count();
    eprintln!(
        "status-error outage: gauge up after {:.1} s; {} requests refused; {outage_lines} outage log lines",
        gauge_up.as_secs_f64(),
        w.rx.rejected_count()
    );
    assert!(
        (1..=3).contains(&outage_lines),
        "the outage is logged when it starts and then once a minute, not per request: {outage_lines} lines"
    );

    w.rx.clear_fault();
    let end = w.db.wal_lsn().await;
    let want = roster_state(&w).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while receiver_state(&w.rx) != want {
        assert!(
            Instant::now() < deadline,
            "after the outage the receiver does not hold the database's state\nreceiver: {:?}\ndatabase: {want:?}\n{}",
            receiver_state(&w.rx),
            w.rx.summary()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    assert_eq!(outage_gauge(&addr).await, 0.0, "the outage ended");
    assert_eq!(dead_letter_count(&w).await, 0);
    assert!(conn.log().contains("acknowledges again"));
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_does_not_stop_a_connector_set_to_stop_on_rejection() {
    let w = world("body_outage_stop", ROSTER_SQL).await;
    let conn = Connector::run(
        &w.config(crate::support::setup::ROSTER_TABLES, "  on_reject: stop\n"),
        &[],
    );
    w.wait_streaming(Duration::from_secs(60)).await;
    w.rx.set_fault(Fault::BodyError);
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('s@x.test', 's');")
        .await;
    let end = w.db.wal_lsn().await;
    w.rx.wait_until("a dozen refusals", Duration::from_secs(60), |r| {
        r.rejected_count() >= 12
    })
    .await;
    assert!(
        conn.is_running(),
        "a refusal of everything is no rejection of an entry\n{}",
        conn.log()
    );
    assert!(w.confirmed().await < end);
    w.rx.clear_fault();
    w.rx.wait_until("the row after the outage", Duration::from_secs(60), |r| {
        r.contact("s@x.test").is_some()
    })
    .await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn not_implemented_stops_the_connector_with_a_hint() {
    // 501 is no outage: the address serves no such endpoint. It used to be
    // retried forever.
    let w = world("not_implemented", ROSTER_SQL).await;
    let conn = Connector::run(&w.roster_config(), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.rx.set_fault(Fault::Status(501));
    w.db.exec("INSERT INTO employees (email) VALUES ('a@x.test');")
        .await;
    let end = w.db.wal_lsn().await;
    let status = conn.wait(Duration::from_secs(60)).await;
    assert!(!status.success());
    let log = conn.log();
    assert!(
        log.contains("HTTP 501") && log.contains("conveyour.url"),
        "{log}"
    );
    assert!(w.confirmed().await < end);
    assert_eq!(dead_letter_count(&w).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lone_refused_entry_with_no_other_traffic_is_one_dead_letter() {
    // No other request to witness ConveYour working: the connector probes
    // with an empty identify of a contact ConveYour acknowledged before.
    let w = world("lone_poison", ROSTER_SQL).await;
    let conn = Connector::run(&w.roster_config(), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('good@x.test', 'g');")
        .await;
    let warm = w.db.wal_lsn().await;
    w.wait_confirmed(warm, Duration::from_secs(60)).await;

    w.rx.set_fault(Fault::RejectId("poison@x.test".into()));
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('poison@x.test', 'p');")
        .await;
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    assert_eq!(dead_letter_count(&w).await, 1);
    assert!(conn.is_running(), "{}", conn.log());
    assert!(w.rx.contact("poison@x.test").is_none());
    let probes =
        w.rx.requests()
            .into_iter()
            .filter(|r| r.accepted && r.body == json!([{"id": "good@x.test", "traits": {}}]))
            .count();
    assert!(probes >= 1, "{}", w.rx.summary());
    // The probe changed nothing.
    assert_eq!(w.rx.contact("good@x.test").unwrap()["first_name"], "g");
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_row_ever_refused_for_a_value_is_one_dead_letter() {
    // Nothing acknowledged yet, so no known contact to probe with: the
    // probe identifies the entry's own contact with empty traits.
    let w = world("first_poison", ROSTER_SQL).await;
    let conn = Connector::run(&w.roster_config(), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.rx.set_fault(Fault::RejectValue("BAD".into()));
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('first@x.test', 'BAD');")
        .await;
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    assert_eq!(dead_letter_count(&w).await, 1);
    assert!(conn.is_running(), "{}", conn.log());
    // The probe created the contact, without the refused value.
    let contact = w.rx.contact("first@x.test").expect("probed contact");
    assert!(contact.is_empty(), "{contact:?}");
    // Once the value is accepted, the dead letter goes through.
    w.rx.clear_fault();
    let (status, out, err) = crate::support::connector::run_cli(
        &[
            "dead-letters",
            "retry",
            "--config",
            crate::support::connector::CONFIG_PLACEHOLDER,
        ],
        &w.roster_config(),
        &[],
    );
    assert!(status.success(), "{out}{err}");
    assert_eq!(w.rx.contact("first@x.test").unwrap()["first_name"], "BAD");
    drop(conn);
}

/// Streams 100 new contacts, each identified and then given three sales,
/// through a connector already streaming (after a warm-up identify, so
/// the client holds a connection before the burst), and waits until
/// ConveYour has all of it and the position passed it.
async fn many_contacts(w: &World) {
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('warmup@x.test', 'w');")
        .await;
    w.rx.wait_until("warm-up identify", Duration::from_secs(60), |r| {
        r.identify_count() >= 1
    })
    .await;
    for part in 0..10 {
        let mut sql = String::new();
        for c in part * 10..part * 10 + 10 {
            sql.push_str(&format!(
                "INSERT INTO employees (email, first_name) VALUES ('m{c}@x.test', 'n{c}');"
            ));
            for s in 0..3 {
                sql.push_str(&format!(
                    "INSERT INTO sales (employee_email, amount, customer) VALUES ('m{c}@x.test', {s}, 'cust');"
                ));
            }
        }
        w.db.exec(&sql).await;
    }
    let end = w.db.wal_lsn().await;
    w.rx.wait_until("every contact and sale", Duration::from_secs(120), |r| {
        r.identify_count() >= 101 && r.track_count() >= 300
    })
    .await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
    assert_eq!(w.rx.identify_count(), 101, "{}", w.rx.summary());
    assert_eq!(w.rx.track_count(), 300, "{}", w.rx.summary());
    assert_eq!(w.rx.rejected_count(), 0, "{}", w.rx.summary());
}

#[tokio::test(flavor = "multi_thread")]
async fn over_https_offering_h2_every_request_is_http2_on_one_reused_connection() {
    let mut w = world("h2", ROSTER_SQL).await;
    w.rx = Receiver::start_tls(APPKEY, TOKEN).await;
    let ca_file = w.rx.ca_file().unwrap();
    // Small identify batches and one contact per track request: hundreds
    // of requests, several in flight at once.
    let config = w.config(
        ROSTER_TABLES,
        &format!("  batch_size: 10\n  ca_file: {}\n", ca_file.display()),
    );
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    many_contacts(&w).await;
    let requests = w.rx.requests();
    assert!(requests.len() >= 100, "{}", w.rx.summary());
    let versions: BTreeMap<&str, usize> = requests.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.version.as_str()).or_default() += 1;
        m
    });
    assert_eq!(
        versions.keys().copied().collect::<Vec<_>>(),
        vec!["HTTP/2.0"],
        "every request over HTTP/2: {versions:?}"
    );
    assert!(
        w.rx.connection_count() <= 2,
        "{} requests came over {} connections: HTTP/2 multiplexes them on one",
        requests.len(),
        w.rx.connection_count()
    );
    conn.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_conveyour_certificate_stops_the_connector_naming_ca_file() {
    let mut w = world("untrusted", ROSTER_SQL).await;
    w.rx = Receiver::start_tls(APPKEY, TOKEN).await;
    // No ca_file: the receiver's self-signed certificate is not trusted.
    let conn = Connector::run(&w.config(ROSTER_TABLES, ""), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    let before = w.confirmed().await;
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('a@x.test', 'A');")
        .await;
    let status = conn.wait(Duration::from_secs(60)).await;
    let log = conn.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("conveyour.ca_file"), "{log}");
    assert!(log.contains("certificate"), "{log}");
    assert_eq!(w.rx.identify_count(), 0);
    // Nothing was confirmed past the insert.
    let end = w.db.wal_lsn().await;
    let confirmed = w.confirmed().await;
    assert!(
        confirmed >= before && confirmed < end,
        "{confirmed:X} vs {end:X}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn over_plain_http_requests_reuse_keep_alive_connections() {
    let w = world("keepalive", ROSTER_SQL).await;
    let config = w.config(ROSTER_TABLES, "  batch_size: 10\n  max_in_flight: 4\n");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    many_contacts(&w).await;
    let requests = w.rx.requests();
    assert!(requests.len() >= 100, "{}", w.rx.summary());
    assert!(requests.iter().all(|r| r.version == "HTTP/1.1"));
    // At most four requests at once need at most four connections; a
    // connection per request would be a hundred.
    assert!(
        w.rx.connection_count() * 4 <= requests.len(),
        "{} requests came over {} connections: keep-alive should reuse them",
        requests.len(),
        w.rx.connection_count()
    );
    conn.stop().await;
}
