//! What the connector shows about itself: Prometheus metrics on
//! `/metrics`, liveness on `/healthz` and readiness on `/readyz`.
//!
//! Every metric name is declared here once. No label carries a contact id
//! or any row value: labels are table names, operations, endpoints and
//! outcomes only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

use crate::lsn::Lsn;

/// Prefix of every metric name.
const PREFIX: &str = "conveyour_cdc";

/// Request latency buckets, in seconds: ConveYour answers in tens to
/// hundreds of milliseconds; the tail shows timeouts.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Commit-to-acknowledgement buckets, in seconds: well under a second when
/// keeping up, minutes and more after an outage or a long transaction.
const COMMIT_TO_ACK_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// `/healthz` fails when the runtime's heartbeat is older than this: the
/// event loop is stuck.
const STUCK_AFTER: Duration = Duration::from_secs(30);

/// `/readyz` fails when work is pending and the confirmed position has not
/// moved for this long.
const NO_PROGRESS_AFTER: Duration = Duration::from_secs(120);

/// The connector's metrics, registered once on a private registry.
pub(crate) struct Metrics {
    registry: Registry,
    pub changes_received: IntCounterVec,
    /// Reads of the replication stream, by what the reader waited for:
    /// `batch` (a busy stream's bytes to gather) or `change` (anything).
    pub stream_reads: IntCounterVec,
    pub snapshot_rows: IntCounter,
    pub snapshot_tables_remaining: IntGauge,
    pub snapshot_rows_estimate: IntGauge,
    pub snapshot_eta_seconds: Gauge,
    /// Row changes that could not be sent anywhere (no contact, no event
    /// name), by table and reason.
    pub rows_skipped: IntCounterVec,
    /// Contact lookups in related tables, by result (`cached`, `queried`,
    /// `missing`).
    pub lookups: IntCounterVec,
    pub identify_acknowledged: IntCounter,
    pub track_acknowledged: IntCounter,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub retries: IntCounterVec,
    pub backoff_seconds: Gauge,
    pub in_flight: IntGauge,
    pub buffered_actions: IntGauge,
    pub received_lsn: Gauge,
    pub confirmed_lsn: Gauge,
    pub lag_bytes: Gauge,
    pub lag_seconds: Gauge,
    pub slot_retained_wal_bytes: Gauge,
    pub connected: IntGauge,
    pub dead_letters: IntCounter,
    /// 1 while ConveYour refuses every request alike and refused requests
    /// are held.
    pub outage: IntGauge,
    /// Dead letters stored for this slot now (rejected and unmappable),
    /// read from the table after each store and retry pass.
    pub dead_letters_stored: IntGauge,
    /// Requests allowed at ConveYour at once, as adaptive concurrency set it.
    pub concurrency_limit: IntGauge,
    /// The smoothed round trip adaptive concurrency compares against.
    pub request_rtt_seconds: Gauge,
    /// Commit to ConveYour's acknowledgement of a transaction's last action.
    pub commit_to_ack: Histogram,
    /// The server's WAL end as last reported, for lag in bytes.
    server_wal_end: AtomicU64,
    confirmed: AtomicU64,
    /// Commit time (Unix ms) of the last acknowledged transaction.
    last_acked_commit_ms: AtomicU64,
    /// Unix ms of the last confirmed-position move.
    last_progress_ms: AtomicU64,
    /// Unix ms of the runtime's last heartbeat.
    heartbeat_ms: AtomicU64,
}

fn name(short: &str) -> String {
    format!("{PREFIX}_{short}")
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |n: &str, help: &str| {
            let c = IntCounter::new(name(n), help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |n: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name(n), help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |n: &str, help: &str| {
            let g = Gauge::new(name(n), help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let int_gauge = |n: &str, help: &str| {
            let g = IntGauge::new(name(n), help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                name("request_duration_seconds"),
                "ConveYour request latency per attempt",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(request_duration.clone()))
            .expect("unique metric");
        let commit_to_ack = Histogram::with_opts(
            HistogramOpts::new(
                name("commit_to_ack_seconds"),
                "From a transaction's commit in Postgres to ConveYour acknowledging the last of its changes",
            )
            .buckets(COMMIT_TO_ACK_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(commit_to_ack.clone()))
            .expect("unique metric");
        let build_info = GaugeVec::new(
            Opts::new(name("build_info"), "Always 1; the version in a label"),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        // Exported from the start so dashboards and alerts see zeros rather
        // than gaps; the initial sync and dead-lettering move them.
        let snapshot_rows = counter(
            "snapshot_rows_total",
            "Rows the initial sync or a resync copied and ConveYour acknowledged",
        );
        let snapshot_tables_remaining = int_gauge(
            "snapshot_tables_remaining",
            "Tables the initial sync or a resync has not finished",
        );
        let snapshot_rows_estimate = int_gauge(
            "snapshot_rows_estimate",
            "Rows in the table being copied when its copy started (0 when none is)",
        );
        let snapshot_eta_seconds = gauge(
            "snapshot_eta_seconds",
            "Seconds until the table being copied is done, at the rate so far (0 when none is)",
        );

        let now = unix_ms();
        Metrics {
            snapshot_rows,
            snapshot_tables_remaining,
            snapshot_rows_estimate,
            snapshot_eta_seconds,
            changes_received: counter_vec(
                "changes_received_total",
                "Row changes of mapped tables received from Postgres",
                &["table", "op"],
            ),
            stream_reads: counter_vec(
                "stream_reads_total",
                "Reads of the replication stream: batch (a busy stream gathered first) or change (woke for whatever came)",
                &["wait"],
            ),
            rows_skipped: counter_vec(
                "rows_skipped_total",
                "Row changes that could not be sent: no contact id or event name (see the log)",
                &["table", "reason"],
            ),
            lookups: counter_vec(
                "contact_lookups_total",
                "Contact ids looked up in a related table, by result",
                &["result"],
            ),
            identify_acknowledged: counter(
                "identify_entries_acknowledged_total",
                "Identify entries ConveYour acknowledged",
            ),
            track_acknowledged: counter("track_events_acknowledged_total", "Track events ConveYour acknowledged"),
            requests: counter_vec(
                "requests_total",
                "ConveYour requests by endpoint and outcome (ok, retried, rejected, dead_lettered)",
                &["endpoint", "outcome"],
            ),
            request_duration,
            retries: counter_vec("retries_total", "ConveYour request retries", &["endpoint"]),
            backoff_seconds: gauge("backoff_seconds", "Current retry delay; 0 when requests succeed"),
            in_flight: int_gauge("in_flight_requests", "ConveYour requests awaiting an answer"),
            buffered_actions: int_gauge("buffered_actions", "Actions batched and not yet sent"),
            received_lsn: gauge("received_lsn", "WAL position of the last message received"),
            confirmed_lsn: gauge("confirmed_lsn", "WAL position confirmed to Postgres"),
            lag_bytes: gauge("lag_bytes", "Server WAL end minus the confirmed position"),
            lag_seconds: gauge(
                "lag_seconds",
                "Now minus the commit time of the last acknowledged transaction; 0 when nothing is pending",
            ),
            slot_retained_wal_bytes: gauge("slot_retained_wal_bytes", "WAL the server keeps for the slot"),
            connected: int_gauge("connected", "1 while the replication stream is connected"),
            dead_letters: counter("dead_letters_total", "Entries stored as dead letters"),
            outage: int_gauge(
                "outage",
                "1 while ConveYour refuses every request alike (no entry blamed) and delivery holds the position",
            ),
            dead_letters_stored: int_gauge(
                "dead_letters_stored",
                "Dead letters stored for this slot now; 0 once every one was retried or purged",
            ),
            concurrency_limit: int_gauge(
                "concurrency_limit",
                "ConveYour requests allowed in flight at once (adaptive; at most conveyour.max_in_flight)",
            ),
            request_rtt_seconds: gauge(
                "request_rtt_seconds",
                "Smoothed round trip of acknowledged ConveYour requests, the baseline adaptive concurrency compares against",
            ),
            commit_to_ack,
            registry,
            server_wal_end: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            last_acked_commit_ms: AtomicU64::new(0),
            last_progress_ms: AtomicU64::new(now),
            heartbeat_ms: AtomicU64::new(now),
        }
    }

    /// Records the server's WAL end from a keepalive or XLogData header.
    pub(crate) fn server_wal_end(&self, end: Lsn) {
        self.server_wal_end.fetch_max(end.0, Ordering::Relaxed);
        self.update_lag_bytes();
    }

    /// Records a new confirmed position, and the commit time (µs since
    /// 2000-01-01) of the transaction it ends, when known.
    pub(crate) fn confirmed(&self, lsn: Lsn, commit_time: Option<i64>) {
        self.confirmed.store(lsn.0, Ordering::Relaxed);
        self.confirmed_lsn.set(lsn.0 as f64);
        self.last_progress_ms.store(unix_ms(), Ordering::Relaxed);
        if let Some(t) = commit_time {
            self.last_acked_commit_ms
                .store(crate::pg_time::unix_ms(t), Ordering::Relaxed);
        }
        self.update_lag_bytes();
    }

    /// ConveYour acknowledged the last action of a transaction committed
    /// at `commit_time` (µs since 2000-01-01).
    pub(crate) fn transaction_acknowledged(&self, commit_time: i64) {
        let committed = crate::pg_time::unix_ms(commit_time);
        let ms = unix_ms().saturating_sub(committed);
        self.commit_to_ack.observe(ms as f64 / 1000.0);
    }

    /// A sync chunk was acknowledged: work moves though the confirmed
    /// position does not (the first copy runs before the stream starts).
    pub(crate) fn copy_progressed(&self) {
        self.last_progress_ms.store(unix_ms(), Ordering::Relaxed);
    }

    fn update_lag_bytes(&self) {
        let end = self.server_wal_end.load(Ordering::Relaxed);
        let confirmed = self.confirmed.load(Ordering::Relaxed);
        self.lag_bytes.set(end.saturating_sub(confirmed) as f64);
    }

    fn pending(&self) -> bool {
        self.buffered_actions.get() > 0 || self.in_flight.get() > 0
    }

    /// Refreshes time-based gauges; called by the heartbeat.
    fn tick(&self) {
        let now = unix_ms();
        self.heartbeat_ms.store(now, Ordering::Relaxed);
        let lag = if self.pending() {
            let last = self.last_acked_commit_ms.load(Ordering::Relaxed);
            if last == 0 {
                0.0
            } else {
                now.saturating_sub(last) as f64 / 1000.0
            }
        } else {
            0.0
        };
        self.lag_seconds.set(lag);
    }

    fn alive(&self) -> bool {
        unix_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed))
            < STUCK_AFTER.as_millis() as u64
    }

    /// Streaming, and either nothing is pending or the position moved
    /// recently.
    fn ready(&self) -> Result<(), &'static str> {
        if self.connected.get() != 1 {
            return Err(
                "not connected to the replication stream (or to the first copy's snapshot)",
            );
        }
        let stalled = unix_ms().saturating_sub(self.last_progress_ms.load(Ordering::Relaxed))
            > NO_PROGRESS_AFTER.as_millis() as u64;
        if self.pending() && stalled {
            return Err("work is pending and the confirmed position has not moved");
        }
        Ok(())
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The process-wide metrics.
pub(crate) fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Binds the metrics and health listener. Fails with the address when it
/// is taken, before anything else starts.
pub async fn bind(listen: &str) -> Result<tokio::net::TcpListener, String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("config metrics.listen: cannot listen on {listen}: {e}"))?;
    Ok(listener)
}

/// The address actually bound (useful with port 0).
pub fn local_addr(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped,
/// and keeps the heartbeat and time-based gauges fresh.
pub async fn serve(listener: tokio::net::TcpListener) {
    let m = metrics();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            m.tick();
        }
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let service =
                hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(respond(req.method(), req.uri().path()))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn respond(method: &hyper::Method, path: &str) -> Response<Full<Bytes>> {
    let m = metrics();
    let (status, content_type, body) = match (method, path) {
        (&hyper::Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            m.render(),
        ),
        (&hyper::Method::GET, "/healthz") if m.alive() => {
            (StatusCode::OK, "text/plain", "ok\n".to_owned())
        }
        (&hyper::Method::GET, "/healthz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "event loop stuck\n".to_owned(),
        ),
        (&hyper::Method::GET, "/readyz") => match m.ready() {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        (&hyper::Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
