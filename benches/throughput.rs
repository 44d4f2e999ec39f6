//! End-to-end throughput and latency benchmark.
//!
//! ```text
//! cargo bench --bench throughput -- [--changes N] [--quick] [--repeat R]
//!     [--sales-per-rep K] [--delay-ms D] [--latency-rate R] [--latency-secs S]
//!     [--batch-size B] [--batch-wait-ms W] [--set conveyour_key=value]... [--perf FILE] [--no-build]
//!     [--timeout-secs T] [--skip-latency] [--sslmode disable|prefer|require]
//!     [--callgrind DIR] [--spread-sales N] [--reps R] [--spread-delay-ms D]
//!     [--rate-limit L] [--skip-spread] [--skip-main]
//! ```
//!
//! In one process, on one machine, it:
//! 1. starts a throwaway Postgres (the integration-test harness,
//!    `tests/support/pg.rs`) and a minimal in-process ConveYour stand-in that
//!    answers `{"status":"ok"}` at once (or after a per-run delay), counting
//!    identify entries and track events, requests by HTTP version, and TCP
//!    connections; in rate-limit mode it refuses requests beyond a number
//!    accepted in the last second with 429 and `Retry-After: 1`;
//! 2. creates one fresh pgoutput slot per measured run, then loads the main
//!    workload (N employee inserts, N updates of mapped columns, N/2 sales
//!    inserts, in transactions of 1000 rows; N = 2/5 of `--changes`), so the
//!    WAL is there before anything is timed;
//! 3. measures, alternating and `--repeat` times each (median reported):
//!    (a) `pg_recvlogical` draining its slot through pgoutput to /dev/null
//!    until `--endpos` = the WAL end (the ceiling);
//!    (b) the release `conveyour-cdc run` until the receiver counted every
//!    change and the slot's `confirmed_flush_lsn` reached the WAL end;
//!    (c) the same with `--delay-ms` (20) of latency per request;
//! 4. then, with every slot of (a)-(c) dropped, creates fresh slots for the
//!    spread workload and loads it: `--spread-sales` sales (50,000) in a
//!    table and publication of their own, sale i for rep i mod `--reps`
//!    (1000), so each sale is for another contact than the one before; and
//!    measures, alternating and `--repeat` times each:
//!    (d0) `pg_recvlogical` draining it (the baseline of this workload);
//!    (d) the connector into the receiver answering at once;
//!    (e) the same with `--spread-delay-ms` (100) per request;
//!    (f) as (e), the receiver accepting at most `--rate-limit` (200)
//!    requests in any second and refusing the rest with 429;
//! 5. measures commit-to-acknowledgement latency with a writer committing
//!    `--latency-rate` changes/s (transactions of 100 employee inserts every
//!    100/rate seconds) for `--latency-secs`, using each row's
//!    `written_us` (clock_timestamp() at insert, mapped as a trait);
//! 6. verifies counts and confirmed LSNs (non-zero exit otherwise), prints
//!    Markdown tables and writes them to `target/bench/throughput.md`, with a
//!    bar chart in `target/bench/throughput.svg`.
//!
//! `--skip-spread` leaves out step 4; `--skip-main` runs only step 4.
//!
//! The connector is built with `cargo build --release` first (skip with
//! `--no-build`, or point `CONVEYOUR_CDC_BIN` at a binary).

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::IgnoredAny;
use serde::Deserialize;

use support::pg::{self, TestDb};

const TX_ROWS: i64 = 1000;
const PUBLICATION: &str = "bench_pub";
/// The spread workload's publication: its table only.
const SPREAD_PUBLICATION: &str = "bench_spread_pub";

// ---------------------------------------------------------------- options

struct Opts {
    changes: u64,
    repeat: usize,
    sales_per_rep: i64,
    delay_ms: u64,
    latency_rate: u64,
    latency_secs: u64,
    batch_size: Option<u64>,
    batch_wait_ms: Option<u64>,
    /// More `conveyour:` keys, `key: value`, from `--set key=value`.
    extra: Vec<String>,
    perf: Option<PathBuf>,
    /// Run the connector under callgrind, writing its profiles here, and
    /// report instructions per change: a count the machine's load does not
    /// move, for comparing builds. Times then measure valgrind, and the
    /// latency run is skipped.
    callgrind: Option<PathBuf>,
    build: bool,
    timeout: Duration,
    latency: bool,
    /// libpq `sslmode` of both clients' connections to Postgres.
    sslmode: String,
    /// Runs (a)-(c) and the latency run.
    main: bool,
    /// Runs (d0)-(f).
    spread: bool,
    /// Sales of the spread workload.
    spread_sales: i64,
    reps: i64,
    spread_delay_ms: u64,
    /// Accepted requests per second the receiver of (f) allows.
    rate_limit: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench throughput -- [--changes N (1000000)] [--quick (50000 changes)] \
         [--repeat R (2)] [--sales-per-rep K (100)] [--delay-ms D (20)] [--latency-rate R (5000)] \
         [--latency-secs S (10)] [--batch-size B] [--batch-wait-ms W] [--set conveyour_key=value]... [--perf FILE] [--no-build] \
         [--timeout-secs T (900)] [--skip-latency] [--sslmode M (prefer)] [--callgrind DIR] \
         [--spread-sales N (50000; 10000 with --quick)] [--reps R (1000)] [--spread-delay-ms D (100)] \
         [--rate-limit L (200)] [--skip-spread] [--skip-main]"
    );
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        changes: 1_000_000,
        repeat: 2,
        sales_per_rep: 100,
        delay_ms: 20,
        latency_rate: 5000,
        latency_secs: 10,
        batch_size: None,
        batch_wait_ms: None,
        extra: Vec::new(),
        perf: None,
        callgrind: None,
        build: true,
        timeout: Duration::from_secs(900),
        latency: true,
        sslmode: "prefer".into(),
        main: true,
        spread: true,
        spread_sales: 0,
        reps: 1000,
        spread_delay_ms: 100,
        rate_limit: 200,
    };
    let mut quick = false;
    let mut spread_sales = None;
    let mut args = std::env::args().skip(1);
    let num = |v: Option<String>| -> u64 {
        v.and_then(|s| s.replace('_', "").parse().ok())
            .unwrap_or_else(|| usage())
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {} // passed by `cargo bench`
            "--quick" => {
                o.changes = 50_000;
                quick = true;
            }
            "--changes" => o.changes = num(args.next()),
            "--repeat" => o.repeat = num(args.next()).max(1) as usize,
            "--sales-per-rep" => o.sales_per_rep = num(args.next()).max(1) as i64,
            "--delay-ms" => o.delay_ms = num(args.next()),
            "--latency-rate" => o.latency_rate = num(args.next()).max(100),
            "--latency-secs" => o.latency_secs = num(args.next()).max(1),
            "--batch-size" => o.batch_size = Some(num(args.next())),
            "--batch-wait-ms" => o.batch_wait_ms = Some(num(args.next())),
            "--set" => {
                let kv = args.next().unwrap_or_else(|| usage());
                let (k, v) = kv.split_once('=').unwrap_or_else(|| usage());
                o.extra.push(format!("{}: {}", k.trim(), v.trim()));
            }
            "--perf" => o.perf = Some(PathBuf::from(args.next().unwrap_or_else(|| usage()))),
            "--callgrind" => {
                o.callgrind = Some(PathBuf::from(args.next().unwrap_or_else(|| usage())));
                // Latency under valgrind would measure valgrind.
                o.latency = false;
            }
            "--no-build" => o.build = false,
            "--timeout-secs" => o.timeout = Duration::from_secs(num(args.next())),
            "--skip-latency" => o.latency = false,
            "--sslmode" => o.sslmode = args.next().unwrap_or_else(|| usage()),
            "--spread-sales" => spread_sales = Some(num(args.next()).max(1) as i64),
            "--reps" => o.reps = num(args.next()).max(1) as i64,
            "--spread-delay-ms" => o.spread_delay_ms = num(args.next()),
            "--rate-limit" => o.rate_limit = num(args.next()).max(1),
            "--skip-spread" => o.spread = false,
            "--skip-main" => o.main = false,
            "-h" | "--help" => usage(),
            other => {
                eprintln!("unknown argument {other}");
                usage()
            }
        }
    }
    // Fewer sales, never fewer reps: the point of the workload is how many
    // contacts the events spread over.
    o.spread_sales = spread_sales.unwrap_or(if quick { 10_000 } else { 50_000 });
    if !o.main && !o.spread {
        eprintln!("--skip-main and --skip-spread leave nothing to run");
        usage()
    }
    o
}

// ---------------------------------------------------------------- receiver

/// The minimal ConveYour: counts, answers ok, optionally waits first, and
/// in rate-limit mode refuses what goes beyond the limit.
#[derive(Default)]
struct Stats {
    identify: AtomicU64,
    track: AtomicU64,
    /// Requests answered other than 429: the ones whose events count.
    accepted: AtomicU64,
    /// Requests refused with 429 (their events are not counted).
    limited: AtomicU64,
    bad: AtomicU64,
    /// Requests by HTTP version, refused ones included.
    http1: AtomicU64,
    http2: AtomicU64,
    /// TCP connections accepted.
    connections: AtomicU64,
    delay_ms: AtomicU64,
    /// Accepted requests allowed in any one second; 0 = no limit.
    rate_limit: AtomicU64,
    /// When each request accepted within the last second arrived.
    window: Mutex<VecDeque<Instant>>,
    /// First request's arrival and last answer of the run.
    span: Mutex<(Option<Instant>, Option<Instant>)>,
    record_latency: AtomicBool,
    /// Acknowledgement time minus `written_us`, in microseconds.
    latencies: Mutex<Vec<i64>>,
}

impl Stats {
    fn changes(&self) -> u64 {
        self.identify.load(Ordering::Relaxed) + self.track.load(Ordering::Relaxed)
    }

    fn reset(&self, delay_ms: u64, rate_limit: Option<u64>, record_latency: bool) {
        for c in [
            &self.identify,
            &self.track,
            &self.accepted,
            &self.limited,
            &self.bad,
            &self.http1,
            &self.http2,
            &self.connections,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.delay_ms.store(delay_ms, Ordering::Relaxed);
        self.rate_limit
            .store(rate_limit.unwrap_or(0), Ordering::Relaxed);
        self.window.lock().unwrap().clear();
        *self.span.lock().unwrap() = (None, None);
        self.record_latency.store(record_latency, Ordering::Relaxed);
        self.latencies.lock().unwrap().clear();
    }

    /// Whether a request arriving `now` is within the rate limit; if so it
    /// counts against the limit from now on.
    fn admit(&self, now: Instant) -> bool {
        let limit = self.rate_limit.load(Ordering::Relaxed);
        if limit == 0 {
            return true;
        }
        let mut window = self.window.lock().unwrap();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            window.pop_front();
        }
        if window.len() as u64 >= limit {
            return false;
        }
        window.push_back(now);
        true
    }

    fn arrived(&self, at: Instant) {
        self.span.lock().unwrap().0.get_or_insert(at);
    }

    fn answered(&self) {
        self.span.lock().unwrap().1 = Some(Instant::now());
    }

    /// Seconds from the first request's arrival to the last answer.
    fn busy_secs(&self) -> Option<f64> {
        match *self.span.lock().unwrap() {
            (Some(first), Some(last)) if last > first => Some((last - first).as_secs_f64()),
            _ => None,
        }
    }
}

fn json_reply(status: hyper::StatusCode, body: &'static [u8]) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

#[derive(Deserialize)]
struct IdentifyEntry {
    #[serde(default)]
    traits: Option<Traits>,
}

#[derive(Deserialize)]
struct Traits {
    #[serde(default)]
    written_us: Option<i64>,
}

#[derive(Deserialize)]
struct TrackBody {
    events: Vec<IgnoredAny>,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

async fn handle(
    stats: Arc<Stats>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    stats.arrived(Instant::now());
    if req.version() == hyper::Version::HTTP_2 {
        stats.http2.fetch_add(1, Ordering::Relaxed);
    } else {
        stats.http1.fetch_add(1, Ordering::Relaxed);
    }
    let path = req.uri().path().to_owned();
    // The body is read even when the request is refused, so an HTTP/1.1
    // connection stays usable.
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if !stats.admit(Instant::now()) {
        stats.limited.fetch_add(1, Ordering::Relaxed);
        let mut r = json_reply(
            hyper::StatusCode::TOO_MANY_REQUESTS,
            br#"{"status":"error","message":"rate limited"}"#,
        );
        r.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from_static("1"),
        );
        stats.answered();
        return Ok(r);
    }
    let delay = stats.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut ok = true;
    if path.ends_with("/api/analytics/identify") {
        match serde_json::from_slice::<Vec<IdentifyEntry>>(&body) {
            Ok(entries) => {
                if stats.record_latency.load(Ordering::Relaxed) {
                    let ack = now_us();
                    let mut l = stats.latencies.lock().unwrap();
                    l.extend(
                        entries
                            .iter()
                            .filter_map(|e| e.traits.as_ref()?.written_us)
                            .map(|w| ack - w),
                    );
                }
                stats
                    .identify
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
            }
            Err(_) => ok = false,
        }
    } else if path.ends_with("/api/analytics/track") {
        match serde_json::from_slice::<TrackBody>(&body) {
            Ok(t) => {
                stats
                    .track
                    .fetch_add(t.events.len() as u64, Ordering::Relaxed);
            }
            Err(_) => ok = false,
        }
    } else {
        ok = false;
    }
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    let reply = if ok {
        json_reply(hyper::StatusCode::OK, br#"{"status":"ok"}"#)
    } else {
        stats.bad.fetch_add(1, Ordering::Relaxed);
        json_reply(hyper::StatusCode::BAD_REQUEST, br#"{"status":"error"}"#)
    };
    stats.answered();
    Ok(reply)
}

/// What a client speaking HTTP/2 without a prior upgrade (h2c with prior
/// knowledge) sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the connection opens with the HTTP/2 preface, looking without
/// consuming.
async fn opens_with_h2_preface(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(n) if n > 0 => n,
            _ => return false,
        };
        if buf[..n] != H2_PREFACE[..n] {
            return false;
        }
        if n == H2_PREFACE.len() {
            return true;
        }
        // A part of the preface: wait for the rest.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serves HTTP/1.1 (keep-alive) and HTTP/2 with prior knowledge on one
/// port, telling them apart by the connection's first bytes.
async fn start_receiver(stats: Arc<Stats>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the receiver");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            stats.connections.fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            let stats = stats.clone();
            tokio::spawn(async move {
                let h2 = opens_with_h2_preface(&stream).await;
                let service = service_fn(move |req| handle(stats.clone(), req));
                let io = TokioIo::new(stream);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(io, service)
                        .await
                };
            });
        }
    });
    addr
}

// ---------------------------------------------------------------- workload

const SCHEMA: &str = "
    CREATE TABLE employees (
        id bigint PRIMARY KEY,
        email text NOT NULL,
        first_name text,
        last_name text,
        career_sales numeric,
        written_us bigint DEFAULT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
    );
    CREATE TABLE sales (
        id bigserial PRIMARY KEY,
        employee_email text NOT NULL,
        amount numeric,
        customer text
    );
    CREATE PUBLICATION bench_pub FOR TABLE employees, sales;
    CREATE TABLE spread_sales (
        id bigserial PRIMARY KEY,
        employee_email text NOT NULL,
        amount numeric,
        customer text
    );
    CREATE PUBLICATION bench_spread_pub FOR TABLE spread_sales;
";

/// The workload's rows are loaded after the slot exists, so they stream;
/// `snapshot: never` keeps the connector from also copying the table (the
/// benchmark measures the stream, not the initial sync).
const TABLES_YAML: &str = "
tables:
  - table: public.employees
    snapshot: never
    identify:
      id: email
      traits: {first_name: first_name, last_name: last_name, career_sales: career_sales, written_us: written_us}
  - table: public.sales
    track:
      id: employee_email
      event: made_sale
      properties: {amount: amount, customer: customer}
";

/// The spread workload's mapping: its sales table only, as `sales` is mapped.
const SPREAD_TABLES_YAML: &str = "
tables:
  - table: public.spread_sales
    track:
      id: employee_email
      event: made_sale
      properties: {amount: amount, customer: customer}
";

/// Which workload a run reads: its publication and mapping.
#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Main,
    Spread,
}

impl Workload {
    fn publication(self) -> &'static str {
        match self {
            Workload::Main => PUBLICATION,
            Workload::Spread => SPREAD_PUBLICATION,
        }
    }

    fn tables_yaml(self) -> &'static str {
        match self {
            Workload::Main => TABLES_YAML,
            Workload::Spread => SPREAD_TABLES_YAML,
        }
    }
}

/// `sales` spread sales into `spread_sales`, sale i for rep i mod `reps`,
/// so each is for another contact than the one before (with more than one
/// rep); transactions of [`TX_ROWS`]. Returns the number of rows written.
async fn load_spread(client: &tokio_postgres::Client, sales: i64, reps: i64) -> u64 {
    let sale = client
        .prepare(
            "INSERT INTO spread_sales (employee_email, amount, customer) \
             SELECT 'rep' || (g % $3::bigint) || '@example.com', (g % 1000) + 0.25, 'Customer ' || g \
             FROM generate_series($1::bigint, $2::bigint) g",
        )
        .await
        .unwrap();
    let mut total = 0u64;
    let mut start = 0i64;
    while start < sales {
        let end = (start + TX_ROWS).min(sales) - 1;
        total += client
            .execute(&sale, &[&start, &end, &reps])
            .await
            .unwrap_or_else(|e| panic!("spread workload statement failed: {e}"));
        start = end + 1;
    }
    total
}

/// N employee inserts, N updates, N/2 sales; returns the number of changes.
async fn load_workload(client: &tokio_postgres::Client, n: i64, sales_per_rep: i64) -> u64 {
    let insert = client
        .prepare(
            "INSERT INTO employees (id, email, first_name, last_name, career_sales) \
             SELECT g, 'emp' || g || '@example.com', 'First' || g, 'Last' || g, 0 \
             FROM generate_series($1::bigint, $2::bigint) g",
        )
        .await
        .unwrap();
    let update = client
        .prepare(
            "UPDATE employees SET career_sales = career_sales + 1250.50, last_name = 'Updated' || id \
             WHERE id BETWEEN $1::bigint AND $2::bigint",
        )
        .await
        .unwrap();
    let sale = client
        .prepare(
            "INSERT INTO sales (employee_email, amount, customer) \
             SELECT 'emp' || ((g / $3::bigint) % $4::bigint + 1) || '@example.com', (g % 1000) + 0.25, 'Customer ' || g \
             FROM generate_series($1::bigint, $2::bigint) g",
        )
        .await
        .unwrap();
    let mut total = 0u64;
    for (stmt, rows) in [(&insert, n), (&update, n), (&sale, n / 2)] {
        let mut start = 0i64;
        while start < rows {
            let end = (start + TX_ROWS).min(rows) - 1;
            let done = if std::ptr::eq(stmt, &sale) {
                client
                    .execute(stmt, &[&start, &end, &sales_per_rep, &n])
                    .await
            } else {
                client.execute(stmt, &[&(start + 1), &(end + 1)]).await
            }
            .unwrap_or_else(|e| panic!("workload statement failed: {e}"));
            total += done;
            start = end + 1;
        }
    }
    total
}

// ---------------------------------------------------------------- processes

struct ProcSample {
    cpu_s: f64,
    /// The user-space part of `cpu_s`: the connector's own work. The rest,
    /// kernel time, swings between runs with how the loopback's receive
    /// work lands, so comparing builds is steadier on this.
    user_s: f64,
    hwm_kib: u64,
    /// Context switches of all the process's threads: how often it slept
    /// and woke (or was preempted).
    switches: u64,
}

/// Where `--callgrind` writes a run's profile.
fn callgrind_file(dir: &Path, slot: &str) -> PathBuf {
    dir.join(format!("{slot}.callgrind"))
}

/// The instructions a callgrind profile counted: its `summary:` (or, in
/// older files, `totals:`) line.
fn callgrind_total(file: &Path) -> Option<u64> {
    fs::read_to_string(file).ok()?.lines().find_map(|l| {
        l.strip_prefix("summary:")
            .or_else(|| l.strip_prefix("totals:"))?
            .trim()
            .parse()
            .ok()
    })
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn sample(pid: u32) -> Option<ProcSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`: state is field 3; utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let switches = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| fs::read_to_string(t.path().join("status")).ok())
                .flat_map(|status| {
                    status
                        .lines()
                        .filter(|l| l.contains("ctxt_switches:"))
                        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                        .collect::<Vec<_>>()
                })
                .sum()
        })
        .unwrap_or(0);
    Some(ProcSample {
        cpu_s: (utime + stime) / clock_ticks(),
        user_s: utime / clock_ticks(),
        hwm_kib: hwm,
        switches,
    })
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits for exit up to `timeout`, then SIGKILLs.
fn reap(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connector_bin(opts: &Opts) -> PathBuf {
    if let Some(p) = std::env::var_os("CONVEYOUR_CDC_BIN") {
        return PathBuf::from(p);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("target"));
    let bin = target.join("release").join("conveyour-cdc");
    if opts.build {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        eprintln!("building: {cargo} build --release --bin conveyour-cdc");
        let ok = Command::new(&cargo)
            .args(["build", "--release", "--bin", "conveyour-cdc"])
            .current_dir(manifest)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("`cargo build --release` failed");
            std::process::exit(1);
        }
    }
    if !bin.is_file() {
        eprintln!(
            "{} not found: run `cargo build --release` (or set CONVEYOUR_CDC_BIN)",
            bin.display()
        );
        std::process::exit(1);
    }
    bin
}

// ---------------------------------------------------------------- runs

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// (a)
    Recvlogical,
    /// (b)
    Connector,
    /// (c)
    ConnectorSlow,
    /// (d0)
    SpreadRecvlogical,
    /// (d)
    Spread,
    /// (e)
    SpreadSlow,
    /// (f)
    SpreadLimited,
}

impl Kind {
    fn workload(self) -> Workload {
        match self {
            Kind::Recvlogical | Kind::Connector | Kind::ConnectorSlow => Workload::Main,
            _ => Workload::Spread,
        }
    }

    fn is_recvlogical(self) -> bool {
        matches!(self, Kind::Recvlogical | Kind::SpreadRecvlogical)
    }

    /// The run's letter, which also names its slots.
    fn letter(self) -> &'static str {
        match self {
            Kind::Recvlogical => "a",
            Kind::Connector => "b",
            Kind::ConnectorSlow => "c",
            Kind::SpreadRecvlogical => "d0",
            Kind::Spread => "d",
            Kind::SpreadSlow => "e",
            Kind::SpreadLimited => "f",
        }
    }
}

struct RunResult {
    kind: Kind,
    secs: f64,
    counted: u64,
    /// Instructions the connector ran (`--callgrind`).
    instructions: Option<u64>,
    /// CPU of the client: pg_recvlogical or the connector.
    cpu_s: Option<f64>,
    user_s: Option<f64>,
    hwm_kib: Option<u64>,
    /// Context switches of the client, all threads.
    switches: Option<u64>,
    /// CPU of the walsender serving the slot (last sample before the end).
    walsender_cpu_s: Option<f64>,
    /// Requests the receiver accepted (answered other than 429).
    requests: u64,
    /// Requests it refused with 429.
    limited: u64,
    http2_requests: u64,
    connections: u64,
    /// From the first request's arrival to the last answer.
    busy_secs: Option<f64>,
    ok: bool,
    note: String,
}

/// The walsender process serving a slot, found once it is active.
#[derive(Default)]
struct Walsender {
    pid: Option<u32>,
    cpu_s: Option<f64>,
    polls: u32,
}

impl Walsender {
    async fn poll(&mut self, ctx: &Ctx, slot: &str) {
        self.polls += 1;
        if self.pid.is_none() && self.polls % 5 == 1 {
            self.pid = ctx
                .admin
                .query_opt(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .ok()
                .flatten()
                .and_then(|r| r.get::<_, Option<i32>>(0))
                .map(|p| p as u32);
        }
        if let Some(s) = self.pid.and_then(sample) {
            self.cpu_s = Some(s.cpu_s);
        }
    }
}

struct Ctx {
    db: TestDb,
    admin: tokio_postgres::Client,
    stats: Arc<Stats>,
    receiver: SocketAddr,
    bin: PathBuf,
    scratch: PathBuf,
}

impl Ctx {
    async fn confirmed(&self, slot: &str) -> u64 {
        self.admin
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get::<_, Option<String>>(0))
            .and_then(|t| pg::parse_lsn(&t))
            .unwrap_or(0)
    }

    async fn create_slot(&self, slot: &str) {
        self.admin
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .unwrap_or_else(|e| panic!("creating slot {slot}: {e}"));
    }

    /// One fresh slot per run of `kinds`, `repeat` rounds, in run order.
    async fn create_slots(&self, kinds: &[Kind], repeat: usize) -> Vec<(Kind, String)> {
        let mut plan = Vec::new();
        for r in 0..repeat {
            for kind in kinds {
                let slot = format!("bench_{}_{r}", kind.letter());
                self.create_slot(&slot).await;
                plan.push((*kind, slot));
            }
        }
        plan
    }

    /// Settles a fresh load before timing (no autovacuum or checkpoint of
    /// it competing with the first measured runs) and returns the WAL end.
    async fn settle(&self, tables: &str) -> u64 {
        for sql in [format!("VACUUM (ANALYZE) {tables}"), "CHECKPOINT".into()] {
            self.admin
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        pg::parse_lsn(
            &self
                .admin
                .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                .await
                .unwrap()
                .get::<_, String>(0),
        )
        .unwrap()
    }

    /// Runs `plan` in order, each to `end` and `expected` changes, dropping
    /// each slot after its run. `--perf` records the first (b) run.
    async fn run_plan(
        &self,
        plan: &[(Kind, String)],
        end: u64,
        expected: u64,
        opts: &Opts,
        perf_done: &mut bool,
    ) -> Vec<RunResult> {
        let mut results = Vec::new();
        for (kind, slot) in plan {
            let (delay_ms, rate_limit) = match kind {
                Kind::ConnectorSlow => (opts.delay_ms, None),
                Kind::SpreadSlow => (opts.spread_delay_ms, None),
                Kind::SpreadLimited => (opts.spread_delay_ms, Some(opts.rate_limit)),
                _ => (0, None),
            };
            let r = if kind.is_recvlogical() {
                self.run_recvlogical(*kind, slot, &opts.sslmode, end, expected, opts.timeout)
                    .await
            } else {
                let perf = match kind {
                    Kind::Connector if !*perf_done => {
                        *perf_done = true;
                        opts.perf.as_deref()
                    }
                    _ => None,
                };
                self.run_connector(*kind, slot, end, expected, delay_ms, rate_limit, opts, perf)
                    .await
            };
            eprintln!(
                "{slot}: {:.2} s, {:.0} changes/s, {} requests{}{}{}{}{}",
                r.secs,
                r.counted as f64 / r.secs,
                r.requests,
                if kind.is_recvlogical() {
                    String::new()
                } else {
                    format!(
                        " ({} HTTP/2), {} refused with 429, {} connections{}",
                        r.http2_requests,
                        r.limited,
                        r.connections,
                        r.busy_secs
                            .map(|b| format!(", {:.0} accepted requests/s", r.requests as f64 / b))
                            .unwrap_or_default()
                    )
                },
                r.cpu_s
                    .zip(r.user_s)
                    .map(|(c, u)| format!(", cpu {c:.2} s (user {u:.2} s)"))
                    .unwrap_or_default(),
                r.switches
                    .map(|c| format!(", {c} context switches"))
                    .unwrap_or_default(),
                r.instructions
                    .map(|i| format!(
                        ", {i} instructions ({:.0} per change)",
                        i as f64 / r.counted.max(1) as f64
                    ))
                    .unwrap_or_default(),
                if r.note.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", r.note)
                }
            );
            self.drop_slot(slot).await;
            results.push(r);
        }
        results
    }

    async fn drop_slot(&self, slot: &str) {
        let _ = self
            .admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await;
    }

    fn config(&self, slot: &str, workload: Workload, opts: &Opts) -> PathBuf {
        let mut extra = String::new();
        if let Some(b) = opts.batch_size {
            let _ = writeln!(extra, "  batch_size: {b}");
        }
        if let Some(w) = opts.batch_wait_ms {
            let _ = writeln!(extra, "  batch_wait_ms: {w}");
        }
        for kv in &opts.extra {
            let _ = writeln!(extra, "  {kv}");
        }
        let yaml = format!(
            "postgres:\n  url: \"{url}?sslmode={sslmode}\"\n  slot: {slot}\n  publication: {publication}\n\
             conveyour:\n  url: http://{rx}\n  appkey: bench-appkey\n  token: bench-token\n{extra}{tables}",
            publication = workload.publication(),
            tables = workload.tables_yaml(),
            url = self.db.url(),
            sslmode = opts.sslmode,
            rx = self.receiver,
        );
        let path = self.scratch.join(format!("{slot}.yaml"));
        fs::write(&path, yaml).expect("writing the connector config");
        path
    }

    fn spawn_connector(&self, slot: &str, workload: Workload, opts: &Opts) -> (Child, PathBuf) {
        let config = self.config(slot, workload, opts);
        let log = self.scratch.join(format!("{slot}.log"));
        let out = fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut command = match &opts.callgrind {
            Some(dir) => {
                let mut c = Command::new("valgrind");
                c.arg("--tool=callgrind")
                    .arg(format!(
                        "--callgrind-out-file={}",
                        callgrind_file(dir, slot).display()
                    ))
                    .arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = command
            .args(["run", "--config"])
            .arg(&config)
            // The connector logs at warn: BENCH_CONNECTOR_LOG=debug keeps more;
            // BENCH_KEEP=1 keeps the logs (the scratch directory).
            .env(
                "CONVEYOUR_CDC_LOG",
                std::env::var("BENCH_CONNECTOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| match opts.callgrind {
                Some(_) => panic!("starting valgrind (needed by --callgrind): {e}"),
                None => panic!("starting {}: {e}", self.bin.display()),
            });
        (child, log)
    }

    async fn run_recvlogical(
        &self,
        kind: Kind,
        slot: &str,
        sslmode: &str,
        end: u64,
        expected: u64,
        timeout: Duration,
    ) -> RunResult {
        let cluster = self.db.cluster();
        let endpos = format!("{:X}/{:X}", end >> 32, end & 0xffff_ffff);
        let dsn = format!(
            "host=127.0.0.1 port={} user=postgres dbname={} sslmode={}",
            cluster.port(),
            self.db.name(),
            sslmode
        );
        let err_path = self.scratch.join(format!("{slot}.recvlogical.log"));
        let t0 = Instant::now();
        let mut child = Command::new(cluster.bin("pg_recvlogical"))
            .args(["--start", "--no-loop", "-S", slot, "-d", &dsn])
            .args(["-o", "proto_version=1", "-o"])
            .arg(format!(
                "publication_names={}",
                kind.workload().publication()
            ))
            .args(["--plugin=pgoutput", "-f", "/dev/null", "--endpos", &endpos])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("starting pg_recvlogical");
        let pid = child.id();
        let mut walsender = Walsender::default();
        let mut last = None;
        let status = loop {
            if let Ok(Some(s)) = child.try_wait() {
                break Some(s);
            }
            if let Some(s) = sample(pid) {
                last = Some(s);
            }
            walsender.poll(self, slot).await;
            if t0.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let secs = t0.elapsed().as_secs_f64();
        let confirmed = self.confirmed(slot).await;
        let ok = matches!(status, Some(s) if s.success());
        RunResult {
            kind,
            secs,
            counted: if ok { expected } else { 0 },
            instructions: None,
            cpu_s: last.as_ref().map(|s| s.cpu_s),
            user_s: last.as_ref().map(|s| s.user_s),
            hwm_kib: last.as_ref().map(|s| s.hwm_kib),
            switches: last.as_ref().map(|s| s.switches),
            walsender_cpu_s: walsender.cpu_s,
            requests: 0,
            limited: 0,
            http2_requests: 0,
            connections: 0,
            busy_secs: None,
            ok,
            note: if ok {
                format!(
                    "confirmed {:X}/{:X}",
                    confirmed >> 32,
                    confirmed & 0xffff_ffff
                )
            } else {
                format!(
                    "pg_recvlogical failed: {status:?} {}",
                    fs::read_to_string(&err_path).unwrap_or_default().trim()
                )
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_connector(
        &self,
        kind: Kind,
        slot: &str,
        end: u64,
        expected: u64,
        delay_ms: u64,
        rate_limit: Option<u64>,
        opts: &Opts,
        perf: Option<&Path>,
    ) -> RunResult {
        self.stats.reset(delay_ms, rate_limit, false);
        let t0 = Instant::now();
        let (mut child, log) = self.spawn_connector(slot, kind.workload(), opts);
        let pid = child.id();
        let perf_child = perf.map(|file| {
            Command::new("perf")
                .args([
                    "record",
                    "-e",
                    "cpu-clock",
                    "-F",
                    "499",
                    "--call-graph",
                    "dwarf,16384",
                    "-o",
                ])
                .arg(file)
                .args(["-p", &pid.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting perf record")
        });
        let deadline = t0 + opts.timeout;
        let mut last_sample = None;
        let mut walsender = Walsender::default();
        let mut confirmed = 0;
        let mut note = String::new();
        let mut exited = None;
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Some(s) = sample(pid) {
                last_sample = Some(s);
            }
            walsender.poll(self, slot).await;
            if self.stats.changes() >= expected {
                confirmed = self.confirmed(slot).await;
                if confirmed >= end {
                    break;
                }
            }
            if let Ok(Some(s)) = child.try_wait() {
                exited = Some(s);
                note = format!("connector exited early: {s}");
                break;
            }
            if Instant::now() > deadline {
                confirmed = self.confirmed(slot).await;
                note = format!("timed out after {:?}", opts.timeout);
                break;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        if let Some(s) = sample(pid) {
            last_sample = Some(s);
        }
        // Settle: anything sent twice (retries) would show up now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let counted = self.stats.changes();
        let requests = self.stats.accepted.load(Ordering::Relaxed);
        let limited = self.stats.limited.load(Ordering::Relaxed);
        let http2_requests = self.stats.http2.load(Ordering::Relaxed);
        let connections = self.stats.connections.load(Ordering::Relaxed);
        let busy_secs = self.stats.busy_secs();
        let bad = self.stats.bad.load(Ordering::Relaxed);
        if let Some(mut p) = perf_child {
            signal(p.id(), "INT");
            let _ = p.wait();
        }
        if exited.is_none() {
            signal(pid, "TERM");
            match tokio::task::spawn_blocking(move || reap(&mut child, Duration::from_secs(30)))
                .await
                .unwrap()
            {
                Some(s) if s.success() => {}
                Some(s) => note.push_str(&format!(" exit after SIGTERM: {s}")),
                None => note.push_str(" did not exit within 30 s of SIGTERM (killed)"),
            }
        }
        let confirmed_ok = confirmed >= end;
        let ok =
            exited.is_none() && counted == expected && confirmed_ok && bad == 0 && note.is_empty();
        if !ok {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            eprintln!(
                "!! connector run on {slot} failed: counted {counted}/{expected}, bad requests {bad}, \
                 refused with 429 {limited}, confirmed {confirmed:X} vs end {end:X}, {note}\n--- log tail ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            if counted != expected {
                note.push_str(&format!(" counted {counted} of {expected}"));
            }
            if !confirmed_ok {
                note.push_str(" confirmed LSN short of the end");
            }
        }
        let instructions = opts
            .callgrind
            .as_ref()
            .and_then(|dir| callgrind_total(&callgrind_file(dir, slot)));
        RunResult {
            kind,
            secs,
            counted,
            instructions,
            cpu_s: last_sample.as_ref().map(|s| s.cpu_s),
            user_s: last_sample.as_ref().map(|s| s.user_s),
            hwm_kib: last_sample.as_ref().map(|s| s.hwm_kib),
            switches: last_sample.as_ref().map(|s| s.switches),
            walsender_cpu_s: walsender.cpu_s,
            requests,
            limited,
            http2_requests,
            connections,
            busy_secs,
            ok,
            note: note.trim().to_owned(),
        }
    }
}

struct Latency {
    rows: u64,
    counted: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_s: Option<f64>,
    hwm_kib: Option<u64>,
    ok: bool,
}

async fn run_latency(ctx: &Ctx, opts: &Opts, first_id: i64) -> Latency {
    let slot = "bench_latency";
    ctx.create_slot(slot).await;
    ctx.stats.reset(0, None, false);
    let (mut child, log) = ctx.spawn_connector(slot, Workload::Main, opts);
    let pid = child.id();
    // Streaming and caught up: the slot is active and confirmed reaches now.
    let start_lsn = ctx.db.wal_lsn().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if ctx.db.slot_active(slot).await && ctx.confirmed(slot).await >= start_lsn {
            break;
        }
        if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            eprintln!(
                "!! latency: connector did not start streaming\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            let _ = child.kill();
            return Latency {
                rows: 0,
                counted: 0,
                p50_ms: 0.0,
                p99_ms: 0.0,
                max_ms: 0.0,
                cpu_s: None,
                hwm_kib: None,
                ok: false,
            };
        }
    }
    ctx.stats.reset(0, None, true);
    let cpu0 = sample(pid).map(|s| s.cpu_s).unwrap_or(0.0);
    let writer = ctx.db.client().await;
    let insert = writer
        .prepare(
            "INSERT INTO employees (id, email, first_name, last_name, career_sales) \
             SELECT g, 'lat' || g || '@example.com', 'First' || g, 'Last' || g, 0 \
             FROM generate_series($1::bigint, $2::bigint) g",
        )
        .await
        .unwrap();
    let tx_rows: u64 = 100;
    let period = Duration::from_secs_f64(tx_rows as f64 / opts.latency_rate as f64);
    let txs = opts.latency_rate * opts.latency_secs / tx_rows;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut id = first_id;
    for _ in 0..txs {
        tick.tick().await;
        let end = id + tx_rows as i64 - 1;
        writer.execute(&insert, &[&id, &end]).await.unwrap();
        id = end + 1;
    }
    let rows = txs * tx_rows;
    let end_lsn = ctx.db.wal_lsn().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while (ctx.stats.changes() < rows || ctx.confirmed(slot).await < end_lsn)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = sample(pid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(pid, "TERM");
    let _ = tokio::task::spawn_blocking(move || reap(&mut child, Duration::from_secs(30))).await;
    let counted = ctx.stats.changes();
    let confirmed_ok = ctx.confirmed(slot).await >= end_lsn;
    let mut l = std::mem::take(&mut *ctx.stats.latencies.lock().unwrap());
    l.sort_unstable();
    let pct = |p: f64| -> f64 {
        if l.is_empty() {
            return f64::NAN;
        }
        let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
        l[i] as f64 / 1000.0
    };
    ctx.stats.reset(0, None, false);
    ctx.drop_slot(slot).await;
    let ok = counted == rows && confirmed_ok && l.len() as u64 == rows;
    if !ok {
        eprintln!("!! latency run: counted {counted} of {rows}, {} latencies, confirmed ok {confirmed_ok}", l.len());
    }
    Latency {
        rows,
        counted,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: l.last().map(|&v| v as f64 / 1000.0).unwrap_or(f64::NAN),
        cpu_s: s.as_ref().map(|s| s.cpu_s - cpu0),
        hwm_kib: s.as_ref().map(|s| s.hwm_kib),
        ok,
    }
}

// ---------------------------------------------------------------- report

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

fn machine() -> String {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    let load = fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("{nproc} CPUs (`nproc`), {cpu}, {mem} RAM, load average at the end {load} (the bench itself included)")
}

/// Bars of (label, rate, whether it is a pg_recvlogical baseline).
fn svg(bars: &[(String, f64, bool)]) -> String {
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max);
    let (w, bar_h, gap, left) = (720.0, 28.0, 12.0, 330.0);
    let h = 40.0 + bars.len() as f64 * (bar_h + gap);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <text x=\"10\" y=\"20\" font-weight=\"bold\">changes/s, events/s for (d0)-(f) (median)</text>\n"
    );
    for (i, (label, v, baseline)) in bars.iter().enumerate() {
        let y = 32.0 + i as f64 * (bar_h + gap);
        let bw = (w - left - 90.0) * v / max;
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{ty}\">{label}</text><rect x=\"{left}\" y=\"{y}\" width=\"{bw:.1}\" height=\"{bar_h}\" fill=\"{fill}\"/>\
             <text x=\"{tx:.1}\" y=\"{ty}\">{v:.0}</text>",
            ty = y + 19.0,
            fill = if *baseline { "#888" } else { "#2a6fb0" },
            tx = left + bw + 6.0,
        );
    }
    s.push_str("</svg>\n");
    s
}

/// `v` with `d` decimals, or a dash for NaN (no figure).
fn fmt_opt(v: f64, d: usize) -> String {
    if v.is_nan() {
        "—".to_string()
    } else {
        format!("{v:.d$}")
    }
}

/// The verified cell of a failed row: each failed run's note.
fn failures(runs: &[&RunResult]) -> String {
    let notes: Vec<&str> = runs
        .iter()
        .filter(|r| !r.note.is_empty() && !r.ok)
        .map(|r| r.note.as_str())
        .collect();
    format!("**FAILED** {}", notes.join("; "))
}

/// Appends the table of runs (a)-(c) and their bars; false when any run
/// failed its verification.
fn main_table(
    md: &mut String,
    bars: &mut Vec<(String, f64, bool)>,
    setup: &str,
    results: &[RunResult],
    expected: u64,
    n: i64,
    opts: &Opts,
) -> bool {
    let mut all_ok = true;
    let ceiling = median(
        results
            .iter()
            .filter(|r| r.kind == Kind::Recvlogical && r.ok)
            .map(|r| expected as f64 / r.secs)
            .collect(),
    );
    let _ = writeln!(
        md,
        "{setup} Workload: {expected} changes = {n} employee inserts + {n} updates + {} sales inserts, \
         transactions of {TX_ROWS} rows, {} consecutive sales per rep; WAL written before timing. \
         Median of {} runs each, alternating, each from its own fresh slot; times include starting the client. \
         Client = pg_recvlogical in (a), the connector in (b) and (c). \
         CPU = utime+stime from /proc at the end of the run; RSS = VmHWM.\n",
        n / 2,
        opts.sales_per_rep,
        opts.repeat,
    );
    let _ = writeln!(
        md,
        "| run | changes/s | seconds (each run) | client CPU s / M changes | walsender CPU s / M changes | client peak RSS MiB | HTTP requests | vs (a) | verified |\n|---|---:|---|---:|---:|---:|---:|---:|---|"
    );
    for (kind, label) in [
        (
            Kind::Recvlogical,
            "(a) pg_recvlogical → /dev/null (ceiling)".to_string(),
        ),
        (Kind::Connector, "(b) conveyour-cdc → receiver".to_string()),
        (
            Kind::ConnectorSlow,
            format!("(c) conveyour-cdc → receiver +{} ms/request", opts.delay_ms),
        ),
    ] {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.kind == kind).collect();
        let ok = runs.iter().all(|r| r.ok);
        all_ok &= ok;
        let rate = median(runs.iter().map(|r| r.counted as f64 / r.secs).collect());
        let secs: Vec<String> = runs.iter().map(|r| format!("{:.2}", r.secs)).collect();
        let cpu = median(
            runs.iter()
                .filter_map(|r| r.cpu_s)
                .map(|c| c / (expected as f64 / 1e6))
                .collect(),
        );
        let ws_cpu = median(
            runs.iter()
                .filter_map(|r| r.walsender_cpu_s)
                .map(|c| c / (expected as f64 / 1e6))
                .collect(),
        );
        let rss = runs.iter().filter_map(|r| r.hwm_kib).max();
        let reqs = median(runs.iter().map(|r| r.requests as f64).collect());
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_opt(rate, 0),
            secs.join(", "),
            fmt_opt(cpu, 2),
            fmt_opt(ws_cpu, 2),
            rss.map(|k| format!("{:.1}", k as f64 / 1024.0))
                .unwrap_or_else(|| "—".into()),
            if kind == Kind::Recvlogical {
                "—".into()
            } else {
                format!("{reqs:.0}")
            },
            if kind == Kind::Recvlogical {
                "1.00".into()
            } else {
                fmt_opt(rate / ceiling, 2)
            },
            if ok {
                if kind == Kind::Recvlogical {
                    "reached end LSN".to_string()
                } else {
                    "count ✓, confirmed LSN ✓".to_string()
                }
            } else {
                failures(&runs)
            },
        );
        bars.push((
            label.replace('→', "to").replace('&', "and"),
            rate,
            kind.is_recvlogical(),
        ));
    }
    all_ok
}

/// Appends the table of runs (d0)-(f) and their bars, after `setup` (empty
/// when the main table already said it); false when any run failed its
/// verification.
fn spread_table(
    md: &mut String,
    bars: &mut Vec<(String, f64, bool)>,
    setup: &str,
    results: &[RunResult],
    expected: u64,
    opts: &Opts,
) -> bool {
    let mut all_ok = true;
    let baseline = median(
        results
            .iter()
            .filter(|r| r.kind == Kind::SpreadRecvlogical && r.ok)
            .map(|r| expected as f64 / r.secs)
            .collect(),
    );
    let _ = writeln!(
            md,
            "{}Spread workload: {expected} sales inserts in a table and publication of their own, sale i for rep i mod {reps} \
             ({reps} contacts, each sale for another contact than the one before), transactions of {TX_ROWS} rows; WAL written before timing. \
             Its slots are created once every slot of (a)–(c) is dropped, and loaded after, so no run decodes the other workload. \
             Median of {} runs each, alternating, each from its own fresh slot; times include starting the client. \
             Client = pg_recvlogical in (d0), the connector in (d), (e) and (f). \
             (e) and (f): the receiver answers {delay} ms after each request it accepts; \
             (f): it accepts at most {limit} requests in any 1 s window and answers the rest at once with 429, `Retry-After: 1`, whose events are not counted. \
             HTTP requests = accepted requests (answered other than 429); accepted requests/s = accepted requests / the receiver's busy time \
             (first request's arrival to last answer); 429 share = 429 answers / all requests received; \
             connections = TCP connections the receiver accepted.\n",
            // After the main table a blank line; alone, the setup first.
            if setup.is_empty() {
                "\n".to_string()
            } else {
                format!("{setup} ")
            },
            opts.repeat,
            reps = opts.reps,
            delay = opts.spread_delay_ms,
            limit = opts.rate_limit,
        );
    let _ = writeln!(
            md,
            "| run | events/s | seconds (each run) | HTTP requests | events / request | connections | HTTP/2 requests | accepted requests/s | 429 share | client CPU s / M events | client peak RSS MiB | vs (d0) | verified |\n\
             |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
    for (kind, label) in [
        (
            Kind::SpreadRecvlogical,
            "(d0) pg_recvlogical → /dev/null (baseline)".to_string(),
        ),
        (Kind::Spread, "(d) conveyour-cdc → receiver".to_string()),
        (
            Kind::SpreadSlow,
            format!(
                "(e) conveyour-cdc → receiver +{} ms/request",
                opts.spread_delay_ms
            ),
        ),
        (
            Kind::SpreadLimited,
            format!("(f) as (e), ≤ {} requests/s, 429 beyond", opts.rate_limit),
        ),
    ] {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.kind == kind).collect();
        let ok = runs.iter().all(|r| r.ok);
        all_ok &= ok;
        let med = |f: &dyn Fn(&RunResult) -> Option<f64>| {
            median(runs.iter().filter_map(|r| f(r)).collect())
        };
        let rate = med(&|r| Some(r.counted as f64 / r.secs));
        let secs: Vec<String> = runs.iter().map(|r| format!("{:.2}", r.secs)).collect();
        let cpu = med(&|r| r.cpu_s.map(|c| c / (expected as f64 / 1e6)));
        let rss = runs.iter().filter_map(|r| r.hwm_kib).max();
        let client = !kind.is_recvlogical();
        let only = |v: String| if client { v } else { "—".into() };
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_opt(rate, 0),
            secs.join(", "),
            only(fmt_opt(med(&|r| Some(r.requests as f64)), 0)),
            only(fmt_opt(
                med(&|r| Some(r.counted as f64 / r.requests.max(1) as f64)),
                1
            )),
            only(fmt_opt(med(&|r| Some(r.connections as f64)), 0)),
            only(fmt_opt(med(&|r| Some(r.http2_requests as f64)), 0)),
            only(fmt_opt(
                med(&|r| r.busy_secs.map(|b| r.requests as f64 / b)),
                0
            )),
            if kind == Kind::SpreadLimited {
                fmt_opt(
                    med(&|r| {
                        Some(100.0 * r.limited as f64 / (r.requests + r.limited).max(1) as f64)
                    }),
                    1,
                ) + " %"
            } else {
                "—".into()
            },
            fmt_opt(cpu, 2),
            rss.map(|k| format!("{:.1}", k as f64 / 1024.0))
                .unwrap_or_else(|| "—".into()),
            if client {
                fmt_opt(rate / baseline, 3)
            } else {
                "1.00".into()
            },
            if !ok {
                failures(&runs)
            } else if client {
                "count ✓, confirmed LSN ✓".to_string()
            } else {
                "reached end LSN".to_string()
            },
        );
        bars.push((
            label
                .replace('→', "to")
                .replace('&', "and")
                .replace('≤', "at most"),
            rate,
            !client,
        ));
    }
    all_ok
}

// ---------------------------------------------------------------- main

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs bench
    // targets too, without it. The benchmark takes minutes and a release
    // build, so under `cargo test` it only says how to run it.
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput benchmark: run it with `cargo bench --bench throughput` (skipped under cargo test)");
        return;
    }
    let opts = parse_opts();
    if let Some(dir) = &opts.callgrind {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("--callgrind {}: {e}", dir.display()));
    }
    let n = (opts.changes * 2 / 5).max(2) as i64;
    let bin = connector_bin(&opts);
    let stats = Arc::new(Stats::default());
    let receiver = start_receiver(stats.clone()).await;
    eprintln!("receiver listening on http://{receiver}");
    eprintln!("starting Postgres ...");
    let db = pg::fresh_db("bench").await;
    let admin = db.client().await;
    let scratch = support::scratch_path("conveyour-cdc-bench");
    fs::create_dir_all(&scratch).unwrap();
    let pg_version = admin
        .query_one("SHOW server_version", &[])
        .await
        .map(|r| r.get::<_, String>(0))
        .unwrap_or_default();
    let ctx = Ctx {
        db,
        admin,
        stats,
        receiver,
        bin,
        scratch,
    };
    ctx.db.exec(SCHEMA).await;

    let mut results: Vec<RunResult> = Vec::new();
    let mut perf_done = false;
    let mut main_changes = None;
    if opts.main {
        // One fresh slot per run, all created before the workload.
        let plan = ctx
            .create_slots(
                &[Kind::Recvlogical, Kind::Connector, Kind::ConnectorSlow],
                opts.repeat,
            )
            .await;
        eprintln!(
            "loading the workload: {n} employee inserts, {n} updates, {} sales ...",
            n / 2
        );
        let t = Instant::now();
        let expected = load_workload(&ctx.admin, n, opts.sales_per_rep).await;
        let end = ctx.settle("employees, sales").await;
        eprintln!(
            "loaded {expected} changes in {:.1} s; WAL end {}",
            t.elapsed().as_secs_f64(),
            lsn_text(end)
        );
        results.extend(
            ctx.run_plan(&plan, end, expected, &opts, &mut perf_done)
                .await,
        );
        main_changes = Some(expected);
    }
    let mut spread_events = None;
    if opts.spread {
        // Every slot of (a)-(c) is dropped by now, so they never decode this
        // workload, and these slots, created after the main workload, see
        // only this one.
        let plan = ctx
            .create_slots(
                &[
                    Kind::SpreadRecvlogical,
                    Kind::Spread,
                    Kind::SpreadSlow,
                    Kind::SpreadLimited,
                ],
                opts.repeat,
            )
            .await;
        eprintln!(
            "loading the spread workload: {} sales over {} reps ...",
            opts.spread_sales, opts.reps
        );
        let t = Instant::now();
        let expected = load_spread(&ctx.admin, opts.spread_sales, opts.reps).await;
        let end = ctx.settle("spread_sales").await;
        eprintln!(
            "loaded {expected} sales in {:.1} s; WAL end {}",
            t.elapsed().as_secs_f64(),
            lsn_text(end)
        );
        results.extend(
            ctx.run_plan(&plan, end, expected, &opts, &mut perf_done)
                .await,
        );
        spread_events = Some(expected);
    }

    let latency = if opts.main && opts.latency {
        eprintln!(
            "latency: {} changes/s for {} s ...",
            opts.latency_rate, opts.latency_secs
        );
        Some(run_latency(&ctx, &opts, n + 1_000_000_000).await)
    } else {
        None
    };

    // ---- report
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### Throughput benchmark (`cargo bench --bench throughput`)\n"
    );
    let setup = format!(
        "Machine: {}; PostgreSQL {pg_version}. Connector `{}`: batch_size {}, batch_wait_ms {}{}; it and pg_recvlogical connect with sslmode={}{}.",
        machine(),
        ctx.bin.display(),
        opts.batch_size.map(|b| b.to_string()).unwrap_or_else(|| "default".into()),
        opts.batch_wait_ms.map(|b| b.to_string()).unwrap_or_else(|| "default".into()),
        opts.extra.iter().map(|kv| format!(", {kv}")).collect::<String>(),
        opts.sslmode,
        if opts.sslmode == "disable" {
            ", so the replication stream is plain TCP"
        } else {
            ", so the replication stream is TLS-encrypted in every run"
        },
    );
    let mut bars = Vec::new();
    let mut all_ok = true;
    if let Some(expected) = main_changes {
        all_ok &= main_table(&mut md, &mut bars, &setup, &results, expected, n, &opts);
    }
    if let Some(expected) = spread_events {
        let setup = if main_changes.is_some() {
            ""
        } else {
            setup.as_str()
        };
        all_ok &= spread_table(&mut md, &mut bars, setup, &results, expected, &opts);
    }
    if let Some(l) = &latency {
        all_ok &= l.ok;
        let _ = writeln!(
            md,
            "\nCommit-to-ack latency at {} changes/s ({} transactions of 100 employee inserts per second, {} s, {} rows; \
             write time = `clock_timestamp()` at insert, ack time = receiver answering): \
             **p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms**; connector CPU {} s, peak RSS {} MiB; {}.",
            opts.latency_rate,
            opts.latency_rate / 100,
            opts.latency_secs,
            l.rows,
            l.p50_ms,
            l.p99_ms,
            l.max_ms,
            l.cpu_s.map(|c| format!("{c:.2}")).unwrap_or_else(|| "—".into()),
            l.hwm_kib.map(|k| format!("{:.1}", k as f64 / 1024.0)).unwrap_or_else(|| "—".into()),
            if l.ok { "count ✓, confirmed LSN ✓".to_string() } else { format!("**FAILED**: counted {} of {}", l.counted, l.rows) },
        );
    }
    println!("\n{md}");
    let out_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench");
    let _ = fs::create_dir_all(&out_dir);
    let _ = fs::write(out_dir.join("throughput.md"), &md);
    let _ = fs::write(out_dir.join("throughput.svg"), svg(&bars));
    eprintln!(
        "wrote {}/throughput.md and throughput.svg",
        out_dir.display()
    );
    if std::env::var_os("BENCH_KEEP").is_some() {
        eprintln!(
            "kept the runs' configs and logs in {}",
            ctx.scratch.display()
        );
    } else {
        let _ = fs::remove_dir_all(&ctx.scratch);
    }
    drop(ctx);
    if !all_ok {
        eprintln!("verification FAILED");
        std::process::exit(1);
    }
}
