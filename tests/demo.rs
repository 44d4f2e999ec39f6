//! The local end-to-end demo: a throwaway Postgres, a local
//! ConveYour-compatible receiver, and the connector between them, with a
//! few writes to watch go through.
//!
//! Run it with `bash .ci/demo` (installs Postgres if missing) or
//! `cargo run --example demo`.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use conveyour_cdc::config::Config;
use conveyour_cdc::pipeline::{self, Shutdown};
use support::setup::{world, ROSTER_SQL};

const STEPS: &[(&str, &str)] = &[
    (
        "A new rep joins",
        "INSERT INTO employees (email, first_name, last_name, career_sales) VALUES ('jill@acme.test', 'Jill', 'Hill', 0);",
    ),
    (
        "Jill makes a sale, and her career sales go up in the same transaction",
        "BEGIN;
         INSERT INTO sales (employee_email, amount, customer) VALUES ('jill@acme.test', 1000, 'John Doe');
         UPDATE employees SET career_sales = career_sales + 1000 WHERE email = 'jill@acme.test';
         COMMIT;",
    ),
    (
        "Fifty more reps arrive in one batch",
        "INSERT INTO employees (email, first_name, last_name, career_sales)
         SELECT 'rep' || g || '@acme.test', 'Rep', 'No. ' || g, g * 100 FROM generate_series(1, 50) g;",
    ),
];

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("conveyour_cdc=info"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    println!("== starting a throwaway Postgres and a local ConveYour receiver");
    let w = world("demo", ROSTER_SQL).await;
    let yaml = w.roster_config();
    println!("== connector config:\n{yaml}");
    let settings = Config::from_yaml(&yaml)
        .and_then(|c| c.validate(&|_| None))
        .expect("the demo config is valid");
    let (trigger, shutdown) = Shutdown::new();
    let connector = tokio::spawn(async move { pipeline::run(&settings, shutdown).await });
    w.wait_streaming(Duration::from_secs(30)).await;

    let mut seen = 0;
    for (what, sql) in STEPS {
        println!(
            "\n== {what}\n   {}",
            sql.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        let before = w.rx.request_count();
        w.db.exec(sql).await;
        let end = w.db.wal_lsn().await;
        w.rx.wait_until(
            "the change to reach the receiver",
            Duration::from_secs(30),
            |r| r.request_count() > before,
        )
        .await;
        w.wait_confirmed(end, Duration::from_secs(30)).await;
        let requests = w.rx.requests();
        for r in &requests[seen..] {
            let mut body = serde_json::to_string(&r.body).unwrap_or_default();
            if let Some((cut, _)) = body.char_indices().nth(400) {
                body.truncate(cut);
                body.push('…');
            }
            println!("   POST {} -> {}  {body}", r.endpoint, r.response_status);
        }
        seen = requests.len();
        println!(
            "   slot confirmed up to {:X} after ConveYour acknowledged it",
            w.confirmed().await
        );
    }

    println!("\n== what ConveYour now knows about Jill");
    println!(
        "   {}",
        serde_json::to_string_pretty(&w.rx.contact("jill@acme.test")).unwrap_or_default()
    );
    println!(
        "   {} contacts, {} track events, {} requests",
        w.rx.contact_count(),
        w.rx.track_count(),
        w.rx.request_count()
    );
    trigger.trigger();
    match connector.await {
        Ok(Ok(())) => {
            println!("\n== connector stopped cleanly; the demo database is dropped on exit")
        }
        Ok(Err(e)) => println!("\n== connector stopped with an error: {e}"),
        Err(e) => println!("\n== connector task failed: {e}"),
    }
}
