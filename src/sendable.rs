//! From a mapped row change to what can be sent: the contact resolved (from
//! the row, or looked up), or a [`Skip`] saying why the row goes nowhere.
//! One step for the stream, the copy and `preview`, so the three agree on
//! what a row becomes; a skip logs and counts itself the same way wherever
//! it happens.

use std::sync::Arc;

use crate::lsn::Lsn;
use crate::mapping::{ContactRef, MapError, Mapped, Outcome};
use crate::source::{Resolver, SourceError};
use crate::telemetry;

/// What one row change comes to.
#[derive(Debug)]
pub(crate) enum Sendable {
    /// Nothing to send: the table is not mapped, the operation does not
    /// count, or nothing mapped changed.
    Nothing,
    /// The row's bodies and the contact they go to.
    Send { mapped: Mapped, contact: String },
    /// The row goes nowhere, and why.
    Skip(Skip),
}

/// Why a row goes nowhere: counted in `rows_skipped_total{table, reason}`
/// under [`Skip::label`] and logged once by [`Skip::report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Skip {
    pub(crate) table: Arc<str>,
    /// The column at fault, when one is (empty for a lookup that found no
    /// contact: the key is named in the reason).
    pub(crate) column: String,
    pub(crate) reason: String,
    pub(crate) kind: SkipKind,
}

/// The kinds of skip, as the metric labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SkipKind {
    /// No contact id or event name in the row.
    Unsendable,
    /// A lookup found no row with the key, or its contact id is empty.
    ContactNotFound,
    /// A value the mapping cannot convert, where the row is skipped rather
    /// than stored or stopped at (an existing row in a copy).
    Unmappable,
}

impl Skip {
    /// A row whose values the mapping cannot send.
    pub(crate) fn unmappable(e: &MapError) -> Skip {
        Skip {
            table: e.table.as_str().into(),
            column: e.column.clone().unwrap_or_default(),
            reason: e.problem.clone(),
            kind: SkipKind::Unmappable,
        }
    }

    /// The metric's `reason` label.
    pub(crate) fn label(&self) -> &'static str {
        match self.kind {
            SkipKind::Unsendable => "unsendable",
            SkipKind::ContactNotFound => "contact_not_found",
            SkipKind::Unmappable => "unmappable",
        }
    }

    /// Logs the skip (`what` says what did not happen to the row: "row not
    /// sent", "row not copied") at `lsn`, and counts it.
    pub(crate) fn report(&self, what: &str, lsn: Lsn) {
        tracing::warn!(%lsn, table = %self.table, column = %self.column, "{what}: {}", self.reason);
        telemetry::metrics()
            .rows_skipped
            .with_label_values(&[&self.table, self.label()])
            .inc();
    }
}

/// Resolves the contact of what the mapper made of a row change.
pub(crate) async fn resolve(
    outcome: Outcome,
    resolver: &mut Resolver,
) -> Result<Sendable, SourceError> {
    let mut mapped = match outcome {
        Outcome::Nothing => return Ok(Sendable::Nothing),
        Outcome::Skip {
            table,
            column,
            reason,
        } => {
            return Ok(Sendable::Skip(Skip {
                table,
                column,
                reason,
                kind: SkipKind::Unsendable,
            }))
        }
        Outcome::Send(mapped) => mapped,
    };
    // A known contact is moved out, not copied.
    let contact = match std::mem::replace(&mut mapped.contact, ContactRef::Known(String::new())) {
        ContactRef::Known(c) => c,
        lookup => match resolver.contact(&lookup).await? {
            Ok(c) => c,
            Err(reason) => {
                return Ok(Sendable::Skip(Skip {
                    table: mapped.table,
                    column: String::new(),
                    reason,
                    kind: SkipKind::ContactNotFound,
                }))
            }
        },
    };
    Ok(Sendable::Send { mapped, contact })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::MapFault;

    #[test]
    fn a_skip_counts_under_its_kind_for_its_table() {
        let e = MapError {
            table: "public.sendable_test".into(),
            column: Some("amount".into()),
            lsn: Lsn::ZERO,
            problem: "\"x\" is not a number".into(),
            fault: MapFault::Row,
        };
        let skip = Skip::unmappable(&e);
        assert_eq!(skip.label(), "unmappable");
        assert_eq!(skip.column, "amount");
        let counter = || {
            telemetry::metrics()
                .rows_skipped
                .with_label_values(&["public.sendable_test", "unmappable"])
                .get()
        };
        let before = counter();
        skip.report("row not copied", Lsn::ZERO);
        assert_eq!(counter(), before + 1);
        let other = Skip {
            kind: SkipKind::ContactNotFound,
            ..skip
        };
        assert_eq!(other.label(), "contact_not_found");
    }
}
