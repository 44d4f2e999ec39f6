//! A slot the server invalidated: `run` stops naming the reason and its
//! fix, `status` and `check` say the same. One test per reason that a
//! single server can force: `wal_removed` (`max_slot_wal_keep_size`) and,
//! on 18, `idle_timeout` (`idle_replication_slot_timeout`).
//! (`rows_removed` and `wal_level_insufficient` need a standby.)
//! And a slot dropped under a running connector: it stops, rather than
//! starting over on a new slot that skips the changes made meanwhile.

use std::time::{Duration, Instant};

use crate::support::connector::{run_cli, Connector, CONFIG_PLACEHOLDER as CONFIG};
use crate::support::pg::{private_cluster, server_major, skip_below, Cluster};
use crate::support::setup::{reconfigure, world, world_on, World, ROSTER_SQL};

const SCHEMA_SQL: &str = "CREATE TABLE filler (id bigserial PRIMARY KEY, pad text);";

/// Streams one row through a connector on `w`, then stops it: the slot
/// exists, holds a position, and no one streams from it.
async fn streamed_once_then_stopped(w: &World, config: &str) {
    let conn = w.run_and_stream_one(config, "l@x.test", 1).await;
    conn.sigterm();
    assert!(conn.wait(Duration::from_secs(30)).await.success());
}

/// The slot's `(invalidation_reason or wal_status, …)` as the server shows
/// it, whatever the version.
async fn slot_state(w: &World) -> String {
    w.db.query_opt_string(&format!(
        "SELECT coalesce(to_jsonb(s) ->> 'invalidation_reason', wal_status)
           FROM pg_replication_slots s WHERE slot_name = '{}'",
        w.slot
    ))
    .await
    .unwrap_or_default()
}

/// `run` on the invalidated slot: it stops at once (before streaming),
/// sending nothing more, and returns its log.
async fn run_refuses(w: &World, config: &str) -> String {
    let conn = Connector::run(config, &[]);
    let exit = conn.wait(Duration::from_secs(60)).await;
    let log = conn.log();
    assert!(
        !exit.success(),
        "an invalidated slot must stop the connector:\n{log}"
    );
    assert_eq!(w.rx.identify_count(), 1, "nothing more may have been sent");
    log
}

/// `status` (text and JSON) and `check` on the invalidated slot.
fn status_and_check(config: &str, reason: &str, fix: &str) {
    let (ok, out, err) = run_cli(&["status", "--config", CONFIG], config, &[]);
    assert!(ok.success(), "status:\n{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.contains("INVALIDATED"))
        .unwrap_or_else(|| panic!("status does not say the slot is invalidated:\n{out}"));
    assert!(
        line.contains(&format!("INVALIDATED ({reason})"))
            && line.contains("pg_drop_replication_slot(")
            && line.contains(fix),
        "status:\n{out}"
    );
    let (ok, out, err) = run_cli(&["status", "--config", CONFIG, "--json"], config, &[]);
    assert!(ok.success(), "status --json:\n{out}\n{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["slot"]["invalidation_reason"], reason, "{out}");
    assert!(
        json["slot"]["invalidation_hint"]
            .as_str()
            .is_some_and(|h| h.contains(fix)),
        "{out}"
    );
    let (ok, out, err) = run_cli(&["check", "--config", CONFIG], config, &[]);
    assert!(!ok.success(), "check must fail:\n{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.contains("replication slot"))
        .unwrap_or_else(|| panic!("no slot line:\n{out}"));
    assert!(
        line.starts_with("FAIL") && line.contains("invalidated") && line.contains(fix),
        "check:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_past_max_slot_wal_keep_size_is_reported_as_wal_removed_with_its_fix() {
    let cluster: &'static Cluster = tokio::task::spawn_blocking(private_cluster).await.unwrap();
    let w = world_on(
        cluster,
        "slot_wal_removed",
        &format!("{ROSTER_SQL}{SCHEMA_SQL}"),
    )
    .await;
    let config = w.roster_config();
    streamed_once_then_stopped(&w, &config).await;

    reconfigure(
        cluster,
        &[
            ("max_slot_wal_keep_size", Some("1MB")),
            ("max_wal_size", Some("32MB")),
            ("min_wal_size", Some("32MB")),
        ],
    )
    .await;
    let client = w.db.client().await;
    let lost = if server_major() >= 17 {
        "wal_removed"
    } else {
        "lost"
    };
    let mut state = String::new();
    for _ in 0..40 {
        client
            .batch_execute(
                "INSERT INTO filler (pad) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 3000) g;
                 SELECT pg_switch_wal(); CHECKPOINT;",
            )
            .await
            .unwrap();
        state = slot_state(&w).await;
        if state == lost {
            break;
        }
    }
    reconfigure(
        cluster,
        &[
            ("max_slot_wal_keep_size", Some("-1")),
            ("max_wal_size", Some("1GB")),
            ("min_wal_size", Some("80MB")),
        ],
    )
    .await;
    assert_eq!(state, lost, "could not get the slot invalidated");

    let log = run_refuses(&w, &config).await;
    let reported = if server_major() >= 17 {
        "(invalidation_reason = wal_removed)"
    } else {
        "(wal_status = lost)"
    };
    assert!(
        log.contains(&format!(
            "slot {} was invalidated by the server {reported}",
            w.slot
        )) && log.contains("more WAL than max_slot_wal_keep_size allows")
            && log.contains(&format!("SELECT pg_drop_replication_slot('{}')", w.slot))
            && log.contains("hint: raise max_slot_wal_keep_size"),
        "the stop message should name the reason and its fix:\n{log}"
    );
    status_and_check(&config, "wal_removed", "raise max_slot_wal_keep_size");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_idle_past_idle_replication_slot_timeout_is_reported_as_idle_timeout() {
    if skip_below(18, "idle_replication_slot_timeout is new in PostgreSQL 18") {
        return;
    }
    let cluster: &'static Cluster = tokio::task::spawn_blocking(private_cluster).await.unwrap();
    let w = world_on(cluster, "slot_idle", ROSTER_SQL).await;
    let config = w.roster_config();
    streamed_once_then_stopped(&w, &config).await;

    // The setting's unit is seconds; 1 s is its smallest nonzero value.
    reconfigure(cluster, &[("idle_replication_slot_timeout", Some("1s"))]).await;
    // `check` warns about the setting before anything happened.
    let (_, out, _) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert!(
        out.lines().any(
            |l| l.starts_with("WARN idle_replication_slot_timeout: is 1s")
                && l.contains("raise it to 3 days")
        ),
        "check should warn about a 1 s timeout:\n{out}"
    );
    // The checkpointer invalidates an idle slot at a checkpoint.
    let client = w.db.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut state = slot_state(&w).await;
    while state != "idle_timeout" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client.batch_execute("CHECKPOINT").await.unwrap();
        state = slot_state(&w).await;
    }
    reconfigure(cluster, &[("idle_replication_slot_timeout", Some("0"))]).await;
    assert_eq!(state, "idle_timeout", "could not get the slot invalidated");

    let log = run_refuses(&w, &config).await;
    assert!(
        log.contains(&format!(
            "slot {} was invalidated by the server (invalidation_reason = idle_timeout)",
            w.slot
        )) && log.contains("longer than idle_replication_slot_timeout")
            && log.contains("hint: raise idle_replication_slot_timeout"),
        "the stop message should name the reason and its fix:\n{log}"
    );
    status_and_check(
        &config,
        "idle_timeout",
        "raise idle_replication_slot_timeout",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_dropped_under_a_running_connector_stops_it_instead_of_starting_over() {
    let w = world("slot_dropped", ROSTER_SQL).await;
    let conn = w
        .run_and_stream_one(&w.roster_config(), "a@x.test", 1)
        .await;

    // Its mark recorded, so that a later start knows what it had delivered.
    let deadline = Instant::now() + Duration::from_secs(30);
    while w
        .db
        .query_i64(&format!(
            "SELECT count(*) FROM conveyour_cdc.progress WHERE slot = '{}'",
            w.slot
        ))
        .await
        == 0
    {
        assert!(Instant::now() < deadline, "no progress was recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // End the walsender, then drop the slot before the connector is back
    // (an active slot cannot be dropped; it reconnects after a pause).
    let admin = w.db.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        admin
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                  WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&w.slot],
            )
            .await
            .unwrap();
        if admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&w.slot])
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the slot could not be dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Made while no slot exists: a new slot would never see it.
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('b@x.test', 'b');")
        .await;

    let exit = conn.wait(Duration::from_secs(60)).await;
    let log = conn.log();
    assert!(
        !exit.success(),
        "a dropped slot must stop the connector:\n{log}"
    );
    assert!(
        log.contains("was dropped") && log.contains("find who dropped it"),
        "the error must say the slot was dropped, and the hint what that cost:\n{log}"
    );
    let slots =
        w.db.query_i64(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
            w.slot
        ))
        .await;
    assert_eq!(
        slots, 0,
        "no new slot may have been made behind the operator's back"
    );

    // Started again, it makes a new slot, saying what the old one's loss cost.
    let conn = Connector::run(&w.roster_config(), &[]);
    w.wait_streaming(Duration::from_secs(30)).await;
    conn.sigterm();
    assert!(conn.wait(Duration::from_secs(30)).await.success());
    let log = conn.log();
    assert!(
        log.contains("the slot was missing although progress up to")
            && log.contains("are lost; a new slot is created"),
        "a restart must say that the recorded progress outran the new slot:\n{log}"
    );
}
