//! Requests for different contacts go out together, up to a limit that
//! follows ConveYour's answers: it comes down when ConveYour slows or
//! throttles, and goes back up when it recovers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::observe::{get, metrics_addr, parse};
use crate::support::connector::Connector;
use crate::support::receiver::Fault;
use crate::support::setup::{world, World, ROSTER_SQL, ROSTER_TABLES};

/// A gauge from the connector's `/metrics`.
async fn gauge(addr: &str, name: &str) -> f64 {
    let (_, text) = get(addr, "/metrics").await;
    parse(&text)
        .get(&format!("conveyour_cdc_{name}"))
        .copied()
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Polls a gauge until `done` holds of it; returns every value seen.
async fn watch_gauge(
    addr: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    conn: &Connector,
    done: impl Fn(f64) -> bool,
) -> Vec<f64> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let v = gauge(addr, name).await;
        seen.push(v);
        if done(v) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {name} never got there in {timeout:?}; seen {seen:?}\n{}",
            crate::support::tail_of(conn.log_path(), 20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Inserts sales in transactions of `per_tx`, each sale for the next of
/// `reps` reps in turn (how sales arrive: spread, not grouped), until told
/// to stop. Returns how many it inserted.
async fn spread_writer(
    w: &World,
    reps: usize,
    per_tx: usize,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let client = w.db.client().await;
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            let mut sql = String::from("INSERT INTO sales (employee_email, amount) VALUES ");
            for i in 0..per_tx {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!("('rep{}@x.test', {})", (n + i) % reps, n + i));
            }
            client.batch_execute(&sql).await.expect("writer inserts");
            n += per_tx;
            tokio::time::sleep(pause).await;
        }
        n
    })
}

/// Waits until the receiver holds `n` distinct sales and the slot confirmed
/// the WAL end.
async fn wait_all_sales(w: &World, n: usize) {
    w.rx.wait_until("every sale", Duration::from_secs(120), |r| {
        let amounts: std::collections::HashSet<String> = r
            .tracks()
            .iter()
            .map(|(_, e)| e["properties"]["amount"].to_string())
            .collect();
        amounts.len() >= n
    })
    .await;
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sales_for_different_reps_are_in_flight_together() {
    let w = world("conc_parallel", ROSTER_SQL).await;
    let conn = Connector::run(&w.config(ROSTER_TABLES, ""), &[]);
    let addr = metrics_addr(&conn).await;
    w.wait_streaming(Duration::from_secs(60)).await;
    // Each request takes a while, so the ones sent together overlap.
    w.rx.set_fault(Fault::Slow(Duration::from_millis(300)));
    w.db.exec(
        "INSERT INTO sales (employee_email, amount)
         SELECT 'rep' || (i % 300) || '@x.test', i FROM generate_series(1, 300) i;",
    )
    .await;
    let seen = watch_gauge(
        &addr,
        "in_flight_requests",
        "parallel requests",
        Duration::from_secs(60),
        &conn,
        |v| v >= 16.0,
    )
    .await;
    eprintln!("in-flight requests seen: {seen:?}");
    wait_all_sales(&w, 300).await;
    // ConveYour's side saw them together too.
    let together = w.rx.max_concurrent();
    assert!(together >= 16, "at most {together} requests at once");
    // One contact's requests never overlap: each rep's sale is its own.
    let tracks = w.rx.tracks();
    assert_eq!(tracks.len(), 300, "{}", w.rx.summary());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_limit_comes_down_when_conveyour_slows_and_goes_back_up() {
    let w = world("conc_climb", ROSTER_SQL).await;
    let conn = Connector::run(&w.config(ROSTER_TABLES, "  max_in_flight: 16\n"), &[]);
    let addr = metrics_addr(&conn).await;
    w.wait_streaming(Duration::from_secs(60)).await;
    w.rx.set_fault(Fault::Slow(Duration::from_millis(50)));
    let stop = Arc::new(AtomicBool::new(false));
    // About 800 sales/s over 400 reps: more contacts with work than the
    // limit, so the limit is always in use.
    let writer = spread_writer(&w, 400, 40, Duration::from_millis(50), stop.clone()).await;

    let up = watch_gauge(
        &addr,
        "concurrency_limit",
        "at 50 ms a request",
        Duration::from_secs(60),
        &conn,
        |v| v >= 16.0,
    )
    .await;
    // ConveYour slows down twelvefold: round trips climb, the limit comes
    // down (a tenth at a time, once per round trip).
    w.rx.set_fault(Fault::Slow(Duration::from_millis(600)));
    let down = watch_gauge(
        &addr,
        "concurrency_limit",
        "at 600 ms a request",
        Duration::from_secs(90),
        &conn,
        |v| v <= 11.0,
    )
    .await;
    let rtt = gauge(&addr, "request_rtt_seconds").await;
    assert!(rtt > 0.05, "the round trip followed the slowdown: {rtt}");
    // ConveYour recovers: the limit goes back up.
    w.rx.set_fault(Fault::Slow(Duration::from_millis(50)));
    let low = *down.last().unwrap();
    let back = watch_gauge(
        &addr,
        "concurrency_limit",
        "after recovering",
        Duration::from_secs(90),
        &conn,
        |v| v >= low + 4.0,
    )
    .await;
    eprintln!(
        "concurrency limit: up to {:?}, down to {low} (round trip {rtt:.3} s), back to {:?}",
        up.last(),
        back.last()
    );
    stop.store(true, Ordering::SeqCst);
    let n = writer.await.unwrap();
    w.rx.clear_fault();
    wait_all_sales(&w, n).await;
    assert!(conn.is_running(), "{}", conn.log());
}
