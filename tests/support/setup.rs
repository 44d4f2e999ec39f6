//! A test's world in one call: a fresh database with its schema, a strict
//! receiver, a unique slot name, and the connector config that ties them.

use std::time::{Duration, Instant};

use conveyour_cdc::lsn::Lsn;

use super::pg::{cluster, Cluster, TestDb};
use super::receiver::Receiver;

/// Credentials the receiver expects; the token doubles as a canary for
/// secret-leak checks.
pub const APPKEY: &str = "test-appkey-7d1f";
pub const TOKEN: &str = "SECRET-TOKEN-5b2e9c";

/// The classic roster schema: employees are identified, sales tracked.
pub const ROSTER_SQL: &str = "
    CREATE TABLE employees (
        id serial PRIMARY KEY,
        email text,
        first_name text,
        last_name text,
        career_sales numeric
    );
    CREATE TABLE sales (
        id serial PRIMARY KEY,
        employee_email text NOT NULL,
        amount numeric,
        customer text
    );
";

/// The mapping for [`ROSTER_SQL`], as in docs/configuration.md's example.
pub const ROSTER_TABLES: &str = "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {first_name: first_name, last_name: last_name, career_sales: career_sales}
  - table: public.sales
    track:
      id: employee_email
      event: made_sale
      properties: {amount: amount, customer: customer}
";

pub struct World {
    pub db: TestDb,
    pub rx: Receiver,
    pub slot: String,
}

/// A fresh database running `schema_sql`, and a fresh receiver.
pub async fn world(hint: &str, schema_sql: &str) -> World {
    world_on(cluster(), hint, schema_sql).await
}

/// Like [`world`], in a given cluster: tests that restart or reconfigure
/// PostgreSQL pass a [`super::pg::private_cluster`].
pub async fn world_on(cluster: &'static Cluster, hint: &str, schema_sql: &str) -> World {
    let db = cluster.fresh_db(hint).await;
    db.exec(schema_sql).await;
    let rx = Receiver::start(APPKEY, TOKEN).await;
    let slot: String = db
        .name()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    World {
        db,
        rx,
        slot: format!("slot_{slot}"),
    }
}

impl World {
    /// A config for this world: `tables` is the YAML `tables:` section,
    /// `conveyour_extra` more keys under `conveyour:` (indented two spaces).
    /// Backoff is short so tests recover quickly from injected faults.
    pub fn config(&self, tables: &str, conveyour_extra: &str) -> String {
        self.config_with_url(&self.db.url(), tables, conveyour_extra)
    }

    pub fn config_with_url(&self, url: &str, tables: &str, conveyour_extra: &str) -> String {
        format!(
            "postgres:\n  url: \"{url}\"\n  slot: {slot}\n  publication: pub_{slot}\n  status_interval_ms: 1000\n\
             metrics:\n  listen: 127.0.0.1:0\n\
             conveyour:\n  url: {rx}\n  appkey: {APPKEY}\n  token: {TOKEN}\n  batch_wait_ms: 50\n  min_backoff_ms: 50\n  max_backoff_ms: 500\n{conveyour_extra}\n{tables}\n",
            slot = self.slot,
            rx = self.rx.url(),
        )
    }

    /// Starts a connector on `config` and streams one new employee through
    /// it (`email`, into a table `employees` with `email` and `first_name`):
    /// when this returns, ConveYour has seen `identifies` entries in all.
    pub async fn run_and_stream_one(
        &self,
        config: &str,
        email: &str,
        identifies: usize,
    ) -> super::connector::Connector {
        let conn = super::connector::Connector::run(config, &[]);
        self.wait_streaming(Duration::from_secs(30)).await;
        self.db
            .exec(&format!(
                "INSERT INTO employees (email, first_name) VALUES ('{email}', 'x');"
            ))
            .await;
        self.rx
            .wait_until("the streamed identify", Duration::from_secs(20), |r| {
                r.identify_count() == identifies
            })
            .await;
        conn
    }

    pub fn roster_config(&self) -> String {
        self.config(ROSTER_TABLES, "")
    }

    /// The slot's confirmed position, or 0 when there is none yet.
    pub async fn confirmed(&self) -> u64 {
        self.db.confirmed_flush(&self.slot).await.unwrap_or(0)
    }

    /// Waits until the slot exists and a connector streams from it, so
    /// every row committed from now on is in its stream.
    pub async fn wait_streaming(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.db.slot_active(&self.slot).await {
            assert!(
                Instant::now() < deadline,
                "the connector did not start streaming within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the slot's confirmed position reaches `lsn`.
    pub async fn wait_confirmed(&self, lsn: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.confirmed().await;
            if c >= lsn {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "confirmed_flush_lsn stayed at {} below {} for {timeout:?}\nreceiver: {}",
                Lsn(c),
                Lsn(lsn),
                self.rx.summary()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Sets server-wide settings on a private cluster and waits until a new
/// session sees them.
pub async fn reconfigure(cluster: &Cluster, settings: &[(&str, Option<&str>)]) {
    let admin = cluster.admin().await;
    for (name, value) in settings {
        let sql = match value {
            Some(v) => format!("ALTER SYSTEM SET {name} = '{v}'"),
            None => format!("ALTER SYSTEM RESET {name}"),
        };
        admin.batch_execute(&sql).await.unwrap();
    }
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    'wait: loop {
        let fresh = cluster.admin().await;
        for (name, value) in settings {
            let now: String = fresh
                .query_one(&format!("SELECT current_setting('{name}')"), &[])
                .await
                .unwrap()
                .get(0);
            let reset = value.is_none() && (now.is_empty() || now == "on");
            if Some(now.as_str()) != *value && !reset {
                assert!(Instant::now() < deadline, "{name} stayed {now}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue 'wait;
            }
        }
        return;
    }
}

/// A writer's commit that is in the WAL, and so in the stream, but not yet
/// visible to new snapshots (on a busy server that lasts microseconds; here
/// as long as a test needs): the cluster's commits wait for an absent
/// synchronous standby, and every session but the writer's opts out.
pub struct HeldCommit<'a> {
    cluster: &'a Cluster,
    writer: tokio::task::JoinHandle<u64>,
}

impl<'a> HeldCommit<'a> {
    /// Runs `sql` in a session of its own on `url` (a database of the
    /// private `cluster`); its commit waits until [`HeldCommit::release`].
    pub async fn start(cluster: &'a Cluster, url: &str, sql: &str) -> HeldCommit<'a> {
        reconfigure(
            cluster,
            &[
                ("synchronous_commit", Some("local")),
                (
                    "synchronous_standby_names",
                    Some("conveyour_cdc_test_absent"),
                ),
            ],
        )
        .await;
        let client = super::pg::connect(url).await.unwrap();
        client
            .batch_execute("SET synchronous_commit = on")
            .await
            .unwrap();
        let sql = sql.to_owned();
        let writer = tokio::spawn(async move { client.execute(&sql, &[]).await.unwrap() });
        HeldCommit { cluster, writer }
    }

    /// Gives the standby up: the commit turns visible. Returns the rows
    /// the statement changed, and puts the cluster's settings back.
    pub async fn release(self) -> u64 {
        reconfigure(self.cluster, &[("synchronous_standby_names", None)]).await;
        let changed = tokio::time::timeout(Duration::from_secs(30), self.writer)
            .await
            .expect("the writer's commit stayed waiting")
            .unwrap();
        reconfigure(self.cluster, &[("synchronous_commit", None)]).await;
        changed
    }
}
