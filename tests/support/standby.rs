//! A physical standby of a private cluster, for failover tests: made with
//! `pg_basebackup`, streaming through a physical slot, with slot sync on
//! (PostgreSQL 17+), so it keeps a copy of the primary's failover slots.

use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

use super::pg::Cluster;

/// The physical slot the standby streams through, on the primary.
pub const PHYSICAL_SLOT: &str = "standby_slot";

/// Starts a standby of `primary` (blocking; call it through
/// `spawn_blocking`): a base backup with `-R` (a `primary_conninfo` that
/// names a database, as slot sync needs), the physical slot
/// [`PHYSICAL_SLOT`] created on the primary as `primary_slot_name`, and
/// `sync_replication_slots` and `hot_standby_feedback` on. It logs at
/// `log` level, so "is sync-ready now" reaches its log. The primary's
/// `synchronized_standby_slots` is left to the caller: set before the
/// backup, the standby would inherit it and, once promoted, wait for a
/// slot it does not have.
pub fn start_standby(primary: &'static Cluster) -> &'static Cluster {
    match try_start(primary) {
        Ok(c) => Box::leak(Box::new(c)),
        Err(e) => panic!("the standby could not be started: {e}"),
    }
}

fn try_start(primary: &Cluster) -> Result<Cluster, String> {
    let standby = primary.sibling()?;
    let conninfo = format!(
        "host={} port={} user=postgres dbname=postgres",
        primary.host(),
        primary.port()
    );
    let out = standby
        .server_command(&standby.bin("pg_basebackup"))
        .arg("-d")
        .arg(&conninfo)
        .arg("-D")
        .arg(standby.data_dir())
        .args([
            "-R",
            "-C",
            "-S",
            PHYSICAL_SLOT,
            "-X",
            "stream",
            "-c",
            "fast",
        ])
        .output()
        .map_err(|e| format!("running pg_basebackup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pg_basebackup failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // The copied postgresql.conf is the primary's; later lines win. Slot
    // sync is new in 17: an older standby carries no logical slot.
    let sync = if crate::support::pg::server_major() >= 17 {
        "sync_replication_slots = on\n"
    } else {
        ""
    };
    let conf = format!(
        "\n# conveyour-cdc test harness: a standby with slot sync\n\
         port = {port}\n\
         unix_socket_directories = '{dir}'\n\
         {sync}\
         hot_standby_feedback = on\n\
         log_min_messages = log\n",
        port = standby.port(),
        dir = standby.dir().display(),
    );
    let path = standby.data_dir().join("postgresql.conf");
    fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(conf.as_bytes()))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    standby.chown(&standby.data_dir())?;
    standby.pg_ctl(&["-w", "-t", "60", "-l"], &["start"])?;
    standby.wait_ready()?;
    Ok(standby)
}

/// `pg_ctl stop -m immediate`: the server dies as in a crash, without a
/// shutdown checkpoint and without waiting for its standbys.
pub fn crash(cluster: &Cluster) {
    if let Err(e) = cluster.pg_ctl(&["-w", "-t", "60", "-m", "immediate", "-l"], &["stop"]) {
        panic!("stopping PostgreSQL -m immediate failed: {e}");
    }
}

/// `pg_ctl promote`: the standby becomes a primary; returns once it
/// accepts writes.
pub fn promote(standby: &Cluster) {
    if let Err(e) = standby.pg_ctl(&["-w", "-t", "60", "-l"], &["promote"]) {
        panic!("promoting the standby failed: {e}");
    }
}

/// The standby's copy of `slot`: `(synced, temporary, confirmed_flush_lsn)`,
/// None while it has none.
pub async fn slot_copy(standby: &Cluster, slot: &str) -> Option<(bool, bool, Option<String>)> {
    standby
        .admin()
        .await
        .query_opt(
            "SELECT synced, temporary, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap_or_else(|e| panic!("reading the standby's slots: {e}"))
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Waits until the standby's copy of `slot` is sync-ready (synchronized and
/// no longer temporary: it survives a promotion); returns its confirmed
/// position.
pub async fn wait_sync_ready(standby: &Cluster, slot: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let copy = slot_copy(standby, slot).await;
        if let Some((true, false, lsn)) = &copy {
            return lsn.clone().unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "the standby's copy of {slot} was not sync-ready within {timeout:?}: {copy:?}\n--- standby log ---\n{}",
            super::tail_of(&standby.log_path(), 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
