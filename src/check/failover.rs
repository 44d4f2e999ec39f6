//! Whether a standby can carry the slot across a failover: the slot's
//! `failover` flag, `synchronized_standby_slots` on the primary, and each
//! standby of a multi-host URL with its settings and its copy of the slot.

use tokio_postgres::Client;

use super::result::{fail, pass, warn, CheckResult};
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
            "PostgreSQL {} cannot synchronize a logical slot to a standby (17 and later can): a failover loses the slot and its position: the running connector stops, saying so, and started again it makes a new slot (existing rows copied again; changes not delivered before the failover are not sent)",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Mark;
    use crate::source::{StandbySlot, SyncedSlot};

    fn primary(standby_slots: &[(&str, bool, bool)], physical: &[&str]) -> PrimaryFailover {
        PrimaryFailover {
            slot_failover: Some(true),
            standby_slots: standby_slots
                .iter()
                .map(|(name, exists, active)| StandbySlot {
                    name: (*name).to_owned(),
                    exists: *exists,
                    active: *active,
                })
                .collect(),
            physical_slots: physical.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn copy(synced: bool, temporary: bool) -> Option<SyncedSlot> {
        Some(SyncedSlot {
            synced,
            temporary,
            confirmed_flush_lsn: Some("0/3000060".into()),
        })
    }

    #[test]
    fn a_bare_standby_has_each_missing_setting_named() {
        let s = StandbyFailover {
            sync_replication_slots: false,
            hot_standby_feedback: false,
            primary_slot_name: String::new(),
            conninfo_has_dbname: Some(false),
            slot: None,
        };
        let r = standby_line("failover: standby db2:5432", &s, &primary(&[], &[]), "cdc");
        assert_eq!(r.mark, Mark::Warn);
        assert_eq!(
            r.detail,
            "cannot carry cdc across a failover: set sync_replication_slots = on, hot_standby_feedback = on, \
             primary_slot_name (a physical slot on the primary), dbname in primary_conninfo on the standby \
             (ALTER SYSTEM SET …; SELECT pg_reload_conf();); it has no copy of cdc yet"
        );
    }

    #[test]
    fn a_standby_is_ready_only_with_a_permanent_synchronized_copy() {
        let mut s = StandbyFailover {
            sync_replication_slots: true,
            hot_standby_feedback: true,
            primary_slot_name: "sb".into(),
            conninfo_has_dbname: Some(true),
            slot: copy(true, true),
        };
        let p = primary(&[("sb", true, true)], &["sb"]);
        let r = standby_line("n", &s, &p, "cdc");
        assert_eq!(r.mark, Mark::Warn);
        assert!(r
            .detail
            .contains("still temporary and would be dropped at promotion"));
        assert!(r
            .detail
            .contains("`newly created replication slot \"cdc\" is sync-ready now`"));
        s.slot = copy(true, false);
        let r = standby_line("n", &s, &p, "cdc");
        assert_eq!(r.mark, Mark::Ok);
        assert_eq!(
            r.detail,
            "slot sync is set up; its copy of cdc is ready (synchronized, confirmed 0/3000060)"
        );
        // Ready, but the primary does not wait for it.
        let r = standby_line("n", &s, &primary(&[], &["sb"]), "cdc");
        assert_eq!(r.mark, Mark::Warn);
        assert!(r
            .detail
            .starts_with("cannot carry cdc across a failover: add sb to the primary's synchronized_standby_slots;"));
    }

    #[test]
    fn the_primary_line_names_synchronized_standby_slots_and_its_fix() {
        let r = primary_line(&primary(&[], &[]));
        assert_eq!(r.mark, Mark::Ok);
        assert!(r.detail.starts_with("no standby streams from this server"));
        let r = primary_line(&primary(&[], &["sb"]));
        assert_eq!(r.mark, Mark::Warn);
        assert!(r.detail.ends_with(
            "run ALTER SYSTEM SET synchronized_standby_slots = 'sb'; SELECT pg_reload_conf();"
        ));
        let r = primary_line(&primary(&[("gone", false, false)], &[]));
        assert_eq!(r.mark, Mark::Fail);
        assert!(r
            .detail
            .contains("pg_create_physical_replication_slot('gone')"));
        let r = primary_line(&primary(&[("sb", true, false)], &[]));
        assert_eq!(r.mark, Mark::Warn);
        assert!(r
            .detail
            .starts_with("no standby streams through physical slot sb"));
        let r = primary_line(&primary(&[("sb", true, true)], &["sb"]));
        assert_eq!(r.mark, Mark::Ok);
    }
}
