//! Whether a standby can carry the slot across a failover: the slot's
//! `failover` flag, `synchronized_standby_slots` on the primary, and each
//! standby of a multi-host URL with its settings and its copy of the slot.

use tokio_postgres::Client;

use super::{fail, pass, warn, CheckResult};
use crate::config::Settings;
use crate::source::{self, PrimaryFailover, StandbyFailover, FAILOVER_SLOTS_SINCE};

/// The failover lines of `check`. A server with no standby gets one `ok`
/// line saying so; warnings come only where a standby exists and would
/// lose the slot, or can read it but not take it over.
pub(super) async fn failover_checks(client: &Client, settings: &Settings) -> Vec<CheckResult> {
    let slot = &settings.slot;
    let version = match source::server_version_num(client).await {
        Ok(v) => v,
        Err(e) => return vec![warn("failover slot", e.to_string())],
    };
    let primary = match PrimaryFailover::read(client, slot, version).await {
        Ok(p) => p,
        Err(e) => return vec![warn("failover slot", e.to_string())],
    };
    let standbys = source::standbys(&settings.postgres, slot).await;
    let has_standby = !primary.physical_slots.is_empty()
        || !primary.standby_slots.is_empty()
        || standbys.iter().any(|(_, s)| matches!(s, Ok(Some(_))));
    let mark = |detail: String| {
        if has_standby {
            warn("failover slot", detail)
        } else {
            pass("failover slot", detail)
        }
    };
    if version < FAILOVER_SLOTS_SINCE {
        return vec![mark(format!(
            "PostgreSQL {} cannot synchronize a logical slot to a standby (17 and later can): a failover loses the slot and its position, and the connector starts over with a new slot (existing rows copied again; changes not delivered before the failover are not sent)",
            version / 10_000
        ))];
    }
    if settings.failover_slot == Some(false) {
        return vec![mark(format!(
            "postgres.failover_slot is false: {slot} stays on the primary and a failover loses it and its position; remove the setting to have the slot synchronized to standbys"
        ))];
    }
    let mut out = vec![pass(
        "failover slot",
        match primary.slot_failover {
            Some(true) => {
                format!("{slot} is a failover slot: standbys with slot sync on keep a copy")
            }
            Some(false) => format!(
                "{slot} is not a failover slot yet; run makes it one (postgres.failover_slot)"
            ),
            None => format!("run creates {slot} as a failover slot"),
        },
    )];
    out.push(primary_line(&primary));
    if !settings.postgres.is_multi_host() && !primary.physical_slots.is_empty() {
        out.push(pass(
            "failover: standbys",
            format!(
                "standbys stream through physical slot {}; their settings and their copy of {slot} cannot be read through a single-host postgres.url: list them in it (postgres://…@primary:5432,standby:5432/db?target_session_attrs=read-write) to have them checked",
                primary.physical_slots.join(", ")
            ),
        ));
    }
    for (address, standby) in &standbys {
        let name = format!("failover: standby {address}");
        match standby {
            Ok(None) => {}
            Ok(Some(s)) => out.push(standby_line(&name, s, &primary, slot)),
            Err(e) => out.push(warn(&name, format!("cannot read it: {e}"))),
        }
    }
    out
}

/// `synchronized_standby_slots`: set, naming physical slots that exist and
/// that a standby streams through.
fn primary_line(primary: &PrimaryFailover) -> CheckResult {
    let name = "failover: primary";
    let reload = "SELECT pg_reload_conf();";
    if primary.standby_slots.is_empty() {
        if primary.physical_slots.is_empty() {
            return pass(
                name,
                "no standby streams from this server through a physical slot: nothing to fail over to. A standby that carries the slot needs sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name, and dbname in primary_conninfo; the primary needs synchronized_standby_slots naming that physical slot",
            );
        }
        return warn(
            name,
            format!(
                "synchronized_standby_slots is not set: the connector may receive and confirm changes no standby has yet, which a failover then loses from the database but not from ConveYour; run ALTER SYSTEM SET synchronized_standby_slots = '{}'; {reload}",
                primary.physical_slots.join(",")
            ),
        );
    }
    if let Some(missing) = primary.standby_slots.iter().find(|s| !s.exists) {
        return fail(
            name,
            format!(
                "synchronized_standby_slots names {0}, which is no physical slot on this server: the primary holds back every change from the connector until it exists; create it for the standby (SELECT pg_create_physical_replication_slot('{0}');) or take it out of synchronized_standby_slots and {reload}",
                missing.name
            ),
        );
    }
    let idle: Vec<&str> = primary
        .standby_slots
        .iter()
        .filter(|s| !s.active)
        .map(|s| s.name.as_str())
        .collect();
    if !idle.is_empty() {
        return warn(
            name,
            format!(
                "no standby streams through physical slot {}, named in synchronized_standby_slots: the primary holds back changes from the connector until one does; start the standby, or take the slot out of synchronized_standby_slots and {reload}",
                idle.join(", ")
            ),
        );
    }
    let names: Vec<&str> = primary
        .standby_slots
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    pass(
        name,
        format!(
            "synchronized_standby_slots = {}, each with its standby connected: the connector gets no change before they have it",
            names.join(",")
        ),
    )
}

/// A standby's settings for slot sync, each missing one named with what to
/// set, and whether its copy of the slot would survive a promotion.
fn standby_line(
    name: &str,
    s: &StandbyFailover,
    primary: &PrimaryFailover,
    slot: &str,
) -> CheckResult {
    // Settings of the standby, and what the primary lacks for it.
    let mut missing = Vec::new();
    if !s.sync_replication_slots {
        missing.push("sync_replication_slots = on".to_owned());
    }
    if !s.hot_standby_feedback {
        missing.push("hot_standby_feedback = on".to_owned());
    }
    if s.primary_slot_name.is_empty() {
        missing.push("primary_slot_name (a physical slot on the primary)".to_owned());
    }
    if s.conninfo_has_dbname == Some(false) {
        missing.push("dbname in primary_conninfo".to_owned());
    }
    let mut fixes = Vec::new();
    if !missing.is_empty() {
        fixes.push(format!(
            "set {} on the standby (ALTER SYSTEM SET …; SELECT pg_reload_conf();)",
            missing.join(", ")
        ));
    }
    if !s.primary_slot_name.is_empty()
        && !primary
            .standby_slots
            .iter()
            .any(|p| p.name == s.primary_slot_name)
    {
        fixes.push(format!(
            "add {} to the primary's synchronized_standby_slots",
            s.primary_slot_name
        ));
    }
    let copy = match &s.slot {
        Some(c) if c.ready() => format!(
            "its copy of {slot} is ready (synchronized, confirmed {})",
            c.confirmed_flush_lsn.as_deref().unwrap_or("?")
        ),
        Some(c) if c.synced => format!(
            "its copy of {slot} is still temporary and would be dropped at promotion: it becomes permanent once the primary's slot has passed what the standby has replayed (Postgres logs `newly created replication slot \"{slot}\" is sync-ready now`); let the connector stream"
        ),
        Some(_) => format!(
            "it holds a slot named {slot} that was not synchronized from the primary; drop it on the standby"
        ),
        None => format!("it has no copy of {slot} yet"),
    };
    let ready = s.slot.as_ref().is_some_and(|c| c.ready());
    if fixes.is_empty() {
        let detail = format!("slot sync is set up; {copy}");
        return if ready {
            pass(name, detail)
        } else {
            warn(name, detail)
        };
    }
    warn(
        name,
        format!(
            "cannot carry {slot} across a failover: {}; {copy}",
            fixes.join("; ")
        ),
    )
}
