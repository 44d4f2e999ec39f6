//! The local end-to-end demo: a throwaway Postgres, a local
//! ConveYour-compatible receiver, and the real `conveyour-cdc` binary between
//! them. A few writes to watch go through, a ConveYour outage, a `kill -9`
//! of the connector while changes flow, a restart, and a comparison of the
//! database with what ConveYour received.
//!
//! Run it with `bash .ci/demo` (installs Postgres if missing, builds the
//! connector and this demo). It runs the `conveyour-cdc` built next to it,
//! so `cargo run --example demo` alone needs `cargo build --bin
//! conveyour-cdc` first. `--keep` leaves the database and the receiver
//! running at the end, with the commands to go on by hand, until Ctrl-C.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use conveyour_cdc::lsn::Lsn;
use serde_json::Value;
use support::connector::Connector;
use support::receiver::{Fault, RecordedRequest};
use support::setup::{world, World, ROSTER_SQL};

/// Generous: a loaded machine is slow, never wrong.
const WAIT: Duration = Duration::from_secs(60);

/// Sales written while the connector is killed: one transaction each, a sale
/// and the rep's career sales going up.
const FLOWING_SALES: usize = 60;

#[tokio::main]
async fn main() {
    let keep = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--keep") => true,
        Some(other) => {
            eprintln!("unknown argument {other:?}: the demo takes only --keep");
            std::process::exit(2);
        }
    };
    let bin = connector_bin();
    if !bin.is_file() {
        eprintln!(
            "the connector binary {} is missing: build it with `cargo build --bin conveyour-cdc` \
             (bash .ci/demo does)",
            bin.display()
        );
        std::process::exit(1);
    }
    let mut demo = Demo::start(bin).await;
    demo.first_writes().await;
    demo.receiver_outage().await;
    demo.kill_while_flowing().await;
    demo.restart().await;
    let matches = demo.compare().await;
    if keep {
        demo.keep().await;
    } else {
        demo.stop().await;
    }
    if !matches {
        eprintln!("the database and ConveYour's state differ: see the comparison above");
        std::process::exit(1);
    }
}

/// The connector built next to this demo: `<target>/debug/conveyour-cdc`
/// for `<target>/debug/examples/demo`, whatever the target directory.
fn connector_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("conveyour-cdc")))
        .unwrap_or_else(support::connector::bin)
}

struct Demo {
    w: World,
    bin: PathBuf,
    /// Holds `config.yaml`; removed when the demo ends.
    dir: PathBuf,
    connector: Option<Connector>,
    /// The part of the connector's log already shown.
    log_shown: usize,
    step: usize,
    /// Requests already shown.
    seen: usize,
    /// Customer numbers so far: every sale gets a distinct customer, so the
    /// final comparison can match each sale row with its track event.
    customers: usize,
}

impl Demo {
    async fn start(bin: PathBuf) -> Demo {
        println!("conveyour-cdc demo: Postgres → the connector → a local ConveYour receiver");
        let mut step = 1;
        println!(
            "\n{step}. Start a throwaway Postgres with an employees and a sales table, and a \
             local receiver that enforces ConveYour's API contract"
        );
        let w = world("demo", ROSTER_SQL).await;
        println!("   database: {}", w.db.url());
        println!("   receiver: {}", w.rx.url());

        let dir = support::scratch_path("conveyour-cdc-demo");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let config = dir.join("config.yaml");
        fs::write(&config, w.roster_config()).expect("writing the demo config");
        step += 1;
        println!(
            "\n{step}. Start the connector: employees become identify calls, sales track events"
        );
        println!("   $ {} run --config {}", bin.display(), config.display());
        for line in w.roster_config().lines().filter(|l| !l.trim().is_empty()) {
            // Even a local receiver's credentials are not shown: a demo
            // transcript gets pasted around.
            match line.split_once(':') {
                Some((key, _)) if matches!(key.trim(), "appkey" | "token") => {
                    println!("   │ {key}: ********")
                }
                _ => println!("   │ {line}"),
            }
        }
        let mut demo = Demo {
            w,
            bin,
            dir,
            connector: None,
            log_shown: 0,
            step,
            seen: 0,
            customers: 0,
        };
        demo.spawn_connector().await;
        demo
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    fn next_step(&mut self, what: &str) {
        self.step += 1;
        println!("\n{}. {what}", self.step);
    }

    /// Starts the binary and waits until it streams from the slot.
    async fn spawn_connector(&mut self) {
        let config = self.config_path();
        let config = config.to_str().expect("a UTF-8 temp path");
        let c = Connector::spawn_bin(
            &self.bin,
            &["run", "--config", config],
            &self.w.roster_config(),
            &[],
        );
        println!("   connector running, pid {}", c.pid());
        self.connector = Some(c);
        self.log_shown = 0;
        self.w.wait_streaming(WAIT).await;
        self.show_log();
    }

    /// Prints the connector's own log lines not shown yet, without
    /// timestamps; repeated retry warnings are counted, not all printed.
    fn show_log(&mut self) {
        let Some(c) = &self.connector else { return };
        let log = c.log();
        let Some(new) = log.get(self.log_shown..) else {
            return;
        };
        // Only whole lines; the rest waits for the next call.
        let Some(end) = new.rfind('\n') else { return };
        let mut retries = 0;
        for line in new[..end].lines().map(without_timestamp) {
            if !is_connector_line(line) {
                continue;
            }
            if line.contains("will retry") {
                retries += 1;
                if retries > 1 {
                    continue;
                }
            }
            println!("   connector: {line}");
        }
        if retries > 1 {
            println!("   connector: … {retries} such retries in all");
        }
        self.log_shown += end + 1;
    }

    /// Prints the requests not shown yet, their bodies cut short.
    fn show_requests(&mut self) {
        let requests = self.w.rx.requests();
        for r in &requests[self.seen..] {
            println!("   {}", request_line(r));
        }
        self.seen = requests.len();
    }

    fn show_confirmed(&self, confirmed: u64) {
        println!(
            "   slot confirmed up to {} after ConveYour acknowledged it",
            Lsn(confirmed)
        );
    }

    /// Runs `sql`, waits until ConveYour acknowledged it and the slot moved
    /// past it, and shows the requests.
    async fn write(&mut self, what: &str, sql: &str) {
        self.next_step(what);
        println!("   {}", one_line(sql));
        self.w.db.exec(sql).await;
        let end = self.w.db.wal_lsn().await;
        self.w.wait_confirmed(end, WAIT).await;
        self.show_requests();
        self.show_confirmed(self.w.confirmed().await);
    }

    fn next_customer(&mut self) -> String {
        self.customers += 1;
        format!("Customer {}", self.customers)
    }

    async fn first_writes(&mut self) {
        self.write(
            "A new rep joins",
            "INSERT INTO employees (email, first_name, last_name, career_sales) \
             VALUES ('jill@acme.test', 'Jill', 'Hill', 0);",
        )
        .await;
        let customer = self.next_customer();
        self.write(
            "Jill makes a sale, and her career sales go up in the same transaction",
            &format!(
                "BEGIN; \
                 INSERT INTO sales (employee_email, amount, customer) VALUES ('jill@acme.test', 1000, '{customer}'); \
                 UPDATE employees SET career_sales = career_sales + 1000 WHERE email = 'jill@acme.test'; \
                 COMMIT;"
            ),
        )
        .await;
        let before = self.seen;
        self.write(
            "Fifty more reps arrive in one statement",
            "INSERT INTO employees (email, first_name, last_name, career_sales) \
             SELECT 'rep' || g || '@acme.test', 'Rep', 'No. ' || g, 0 FROM generate_series(1, 50) g;",
        )
        .await;
        let requests = self.seen - before;
        println!(
            "   50 inserts, {requests} request{}: up to `batch_size` (500) identify entries share \
             a request, sent when the stream goes quiet after a commit or after `batch_wait_ms` \
             (50 ms here); requests wait for each other only for the same contact",
            if requests == 1 { "" } else { "s" }
        );
    }

    /// A sale for rep `rep` (1..=50), as one transaction with the rep's
    /// career sales going up.
    fn sale_sql(&mut self, rep: usize, amount: u32) -> String {
        let customer = self.next_customer();
        format!(
            "BEGIN; \
             INSERT INTO sales (employee_email, amount, customer) VALUES ('rep{rep}@acme.test', {amount}, '{customer}'); \
             UPDATE employees SET career_sales = career_sales + {amount} WHERE email = 'rep{rep}@acme.test'; \
             COMMIT;"
        )
    }

    async fn receiver_outage(&mut self) {
        self.next_step("ConveYour goes down (connections refused) while five reps make a sale");
        let before = self.w.confirmed().await;
        self.w.rx.set_fault(Fault::Outage);
        let sql: String = (1..=5).map(|rep| self.sale_sql(rep, 500)).collect();
        self.w.db.exec(&sql).await;
        let end = self.w.db.wal_lsn().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let held = self.w.confirmed().await;
        println!(
            "   after 3 s: database at {}, slot still confirmed at {} (was {}): nothing \
             unacknowledged is confirmed, the connector retries with backoff",
            Lsn(end),
            Lsn(held),
            Lsn(before)
        );
        self.show_log();
        self.w.rx.clear_fault();
        println!("   ConveYour is back");
        self.w.wait_confirmed(end, WAIT).await;
        self.show_requests();
        self.show_confirmed(self.w.confirmed().await);
    }

    async fn kill_while_flowing(&mut self) {
        self.next_step(&format!(
            "kill -9 the connector while {FLOWING_SALES} sales are being written, one \
             transaction each"
        ));
        let sqls: Vec<String> = (0..FLOWING_SALES)
            .map(|i| self.sale_sql(i % 50 + 1, 100))
            .collect();
        let url = self.w.db.url();
        let writer = tokio::spawn(async move {
            let client = support::pg::connect(&url)
                .await
                .expect("connecting the writer");
            for sql in sqls {
                client.batch_execute(&sql).await.expect("writing a sale");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        });
        let tracks_before = self.w.rx.track_count();
        self.w
            .rx
            .wait_until("the stream to reach ConveYour", WAIT, |r| {
                r.track_count() >= tracks_before + 5
            })
            .await;
        let c = self.connector.take().expect("the connector runs");
        c.sigkill();
        c.wait(WAIT).await;
        println!(
            "   killed pid {} with SIGKILL mid-stream: ConveYour had {} of the {FLOWING_SALES} \
             sales; slot confirmed at {}",
            c.pid(),
            self.w.rx.track_count() - tracks_before,
            Lsn(self.w.confirmed().await)
        );
        self.seen = self.w.rx.request_count();
        writer.await.expect("the writer");
        let sales = self.w.db.query_i64("SELECT count(*) FROM sales").await;
        println!(
            "   the writes went on without it: all {FLOWING_SALES} committed, {sales} sales in \
             the database now"
        );

        self.next_step("More writes while the connector is down: twenty new reps");
        let sql = "INSERT INTO employees (email, first_name, last_name, career_sales) \
                   SELECT 'rep' || g || '@acme.test', 'Rep', 'No. ' || g, 0 FROM generate_series(51, 70) g;";
        println!("   {sql}");
        self.w.db.exec(sql).await;
        println!("   $ conveyour-cdc status --config …");
        for line in self.status().lines().take(2) {
            println!("   │ {line}");
        }
        println!("   the slot keeps every change since its confirmed position until the connector is back");
    }

    /// `conveyour-cdc status` on the demo's config.
    fn status(&self) -> String {
        let out = Command::new(&self.bin)
            .arg("status")
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {} status: {e}", self.bin.display()));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return format!(
                "status failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        text
    }

    async fn restart(&mut self) {
        self.next_step("Restart the connector on the same config");
        let before = self.w.rx.request_count();
        self.spawn_connector().await;
        let end = self.w.db.wal_lsn().await;
        self.w.wait_confirmed(end, WAIT).await;
        self.show_log();
        println!(
            "   caught up: {} requests since the restart; slot confirmed up to {}",
            self.w.rx.request_count() - before,
            Lsn(self.w.confirmed().await)
        );
        self.seen = self.w.rx.request_count();
    }

    /// The database against ConveYour's state: every employee a contact with
    /// the same career sales, every sale one track event, and what the
    /// restart sent twice. True when nothing is missing or stale.
    async fn compare(&mut self) -> bool {
        self.next_step("Compare the database with what ConveYour holds");
        let client = self.w.db.client().await;
        let employees: Vec<(String, String)> = client
            .query("SELECT email, career_sales::text FROM employees", &[])
            .await
            .expect("reading employees")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let sales: Vec<(String, String)> = client
            .query("SELECT employee_email, customer FROM sales", &[])
            .await
            .expect("reading sales")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let contacts = self.w.rx.contacts();
        let missing = employees
            .iter()
            .filter(|(email, _)| !contacts.contains_key(email))
            .count();
        let stale = employees
            .iter()
            .filter(|(email, career)| {
                contacts
                    .get(email)
                    .is_some_and(|c| !same_number(c.get("career_sales"), career))
            })
            .count();
        println!(
            "   {} employees in the database, {} contacts at ConveYour, {missing} missing, \
             {stale} with other career sales",
            employees.len(),
            contacts.len()
        );

        let tracks = self.w.rx.tracks();
        let received: HashSet<(String, String)> = tracks
            .iter()
            .map(|(id, event)| (id.clone(), customer_of(event)))
            .collect();
        let missing_contacts = missing;
        let missing = sales
            .iter()
            .filter(|sale| !received.contains(*sale))
            .count();
        println!(
            "   {} sales in the database, {} distinct track events at ConveYour, {missing} missing",
            sales.len(),
            received.len()
        );

        let identifies = self.w.rx.identifies();
        let distinct: HashSet<String> = identifies.iter().map(|v| v.to_string()).collect();
        let repeated_requests = repeated_keys(&self.w.rx.requests());
        println!(
            "   sent twice because of the kill: {} identify entries (idempotent), {} track \
             events, {repeated_requests} requests with an Idempotency-Key seen before: a restart \
             resends only what lay past the recorded mark (the connector records how far \
             everything is acknowledged)",
            identifies.len() - distinct.len(),
            tracks.len() - received.len()
        );
        missing_contacts == 0 && stale == 0 && missing == 0
    }

    async fn stop(&mut self) {
        if let Some(c) = self.connector.take() {
            c.sigterm();
            c.wait(WAIT).await;
        }
        let _ = fs::remove_dir_all(&self.dir);
        println!(
            "\nDone: the connector stopped; the demo database and its cluster go away on exit."
        );
    }

    /// Leaves the database and the receiver up, stops the demo's connector
    /// so it can be run by hand, shows each new request until Ctrl-C.
    async fn keep(&mut self) {
        if let Some(c) = self.connector.take() {
            c.sigterm();
            c.wait(WAIT).await;
        }
        self.seen = self.w.rx.request_count();
        let config = self.config_path();
        let bin = self.bin.display().to_string();
        self.next_step(
            "Left running until Ctrl-C: the database and the receiver (which lives inside this \
             demo, so both stop with it; the connector was stopped so it can be run by hand)",
        );
        println!(
            "   psql:      {} '{}'",
            self.w.db.cluster().bin("psql").display(),
            self.w.db.url()
        );
        println!("   config:    {}", config.display());
        println!(
            "   connector: {bin} run --config {}   (in another terminal)",
            config.display()
        );
        println!("   status:    {bin} status --config {}", config.display());
        println!(
            "   try: INSERT INTO employees (email, first_name) VALUES ('me@acme.test', 'Me');"
        );
        println!("   requests ConveYour receives are shown here as they arrive");
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => self.show_requests(),
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        println!(
            "\nStopping: the database, its cluster and the receiver go away; a connector still \
             running by hand loses its database and retries until stopped."
        );
    }
}

/// A log line without the leading timestamp.
fn without_timestamp(line: &str) -> &str {
    match line.split_once(' ') {
        Some((first, rest)) if first.len() > 20 && first.as_bytes()[0].is_ascii_digit() => {
            rest.trim_start()
        }
        _ => line,
    }
}

/// The connector's own lines, not its libraries' (e.g. Postgres NOTICEs).
fn is_connector_line(line: &str) -> bool {
    line.split_whitespace()
        .nth(1)
        .is_some_and(|target| target.starts_with("conveyour_cdc"))
}

/// SQL on one line, its whitespace collapsed.
fn one_line(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `POST /api/analytics/identify -> 200  {...}`, the body cut at 300 characters.
fn request_line(r: &RecordedRequest) -> String {
    let mut body = serde_json::to_string(&r.body).unwrap_or_default();
    if let Some((cut, _)) = body.char_indices().nth(300) {
        body.truncate(cut);
        body.push('…');
    }
    format!("POST {} -> {}  {body}", r.endpoint, r.response_status)
}

/// The `customer` property of a track event.
fn customer_of(event: &Value) -> String {
    event["properties"]["customer"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Whether a trait holds the number Postgres printed as `text`.
fn same_number(value: Option<&Value>, text: &str) -> bool {
    let want: Option<f64> = text.parse().ok();
    let got = match value {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    want.is_some() && got == want
}

/// Accepted requests whose Idempotency-Key an earlier accepted request
/// already carried.
fn repeated_keys(requests: &[RecordedRequest]) -> usize {
    let mut seen = HashSet::new();
    requests
        .iter()
        .filter(|r| r.accepted)
        .filter_map(|r| r.idempotency_key.as_deref())
        .filter(|key| !seen.insert(*key))
        .count()
}
