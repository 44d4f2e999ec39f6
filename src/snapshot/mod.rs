//! The initial sync and resyncs: a table's existing rows, read in
//! primary-key order, chunk by chunk, and sent as if each were inserted.
//!
//! Two ways, one guarantee (no row missed, none sent with values older
//! than a change already sent):
//! - **First run** ([`copy_exported`]): the slot is created with its
//!   snapshot exported; every pending table is read inside that snapshot,
//!   and the stream starts at the slot's consistent point only after the
//!   copy is delivered. The seam is exact: a change is either in the
//!   snapshot or after the consistent point.
//! - **Alongside the stream** ([`copy_alongside`]: a resume after a crash,
//!   when the exported snapshot is gone, or a `resync`): each chunk is read
//!   between a low and a high watermark written into the WAL as logical
//!   decoding messages (the DBLog approach). The reader drops from the
//!   chunk every row the stream changed between the two watermarks (the
//!   stream's value is newer) and hands the rest over at the high
//!   watermark's place in the stream, so a row's later changes always come
//!   after its copy. Positions alone are not enough: a commit is in the WAL
//!   (and may be streamed and sent) a moment before new snapshots see it,
//!   so a chunk read after the low watermark can still miss a change the
//!   stream sent before it. Each chunk is therefore read in one snapshot
//!   whose visibility (`pg_current_snapshot()`) goes with the rows, the
//!   reader records the id of every transaction it carries on a copied
//!   table and the keys its changes touched (but changes that leave a
//!   row's mapped values and key as they were) until a snapshot of the
//!   copy's sees it, and at the high
//!   watermark treats a change by a transaction the chunk's snapshot did
//!   not see as one made between the watermarks.
//!
//! Progress (table, last key, rows) is recorded after a chunk's rows are
//! acknowledged, so a crash resends at most the chunks in flight.

mod carried;
mod chunks;
mod copy;
mod progress;
mod window;

pub(crate) use crate::source::current_snapshot;
pub(crate) use carried::{Carried, Seen};
pub(crate) use chunks::WatermarkedChunks;
pub(crate) use copy::{copy_alongside, copy_exported, map_rows, CopyContext, UNSURE_PAUSE};
pub(crate) use window::{watermark, Watermark, Window};

use crate::config::{Settings, SnapshotPolicy, TableMapping, TableName};
use crate::decode::{Relation, Tuple};
use crate::lsn::Lsn;
use crate::mapping::{Action, Mapped, Mapper, Schema};
use crate::sendable::{self, Sendable, Skip};
use crate::source::Resolver;
use crate::state::State;
use crate::Error;

/// The actions one copied row becomes, through the same mapping as a
/// streamed insert. A row that cannot be sent is logged and counted, as in
/// the stream. With `set_aside` (`on_unmappable: dead_letter`), a row whose
/// values the mapping cannot send is stored as a dead letter. `new_row`:
/// the row's insert never reached ConveYour (a retried unmappable insert),
/// so its counters go too.
pub(crate) async fn row_actions(
    mapper: &Mapper,
    resolver: &mut Resolver,
    relation: u32,
    tuple: &Tuple,
    lsn: Lsn,
    set_aside: Option<&State>,
    new_row: bool,
) -> Result<Vec<Action>, Error> {
    let outcome = match mapper.insert(relation, tuple, lsn) {
        Ok(outcome) => outcome,
        Err(e) if e.is_row_fault() && set_aside.is_some() => {
            if let Some(state) = set_aside {
                crate::state::set_aside(state, mapper, relation, tuple, &e).await?;
            }
            return Ok(Vec::new());
        }
        // An existing row the mapping cannot send (a NULL contact id, a
        // value that does not convert) with `on_unmappable: stop`: a copy
        // goes on without it rather than stop at it on every start; the
        // stream stops at such a row because it is news, this one is not.
        Err(e) => {
            Skip::unmappable(&e).report("row not copied", lsn);
            return Ok(Vec::new());
        }
    };
    let (mapped, contact) = match sendable::resolve(outcome, resolver).await? {
        Sendable::Nothing => return Ok(Vec::new()),
        Sendable::Skip(skip) => {
            skip.report("row not copied", lsn);
            return Ok(Vec::new());
        }
        Sendable::Send { mapped, contact } => (mapped, contact),
    };
    // A copied row is an existing row, not a new one: counters were
    // bumped when it was inserted, so only its event (or traits) go.
    let mapped = match new_row {
        true => mapped,
        false => Mapped {
            first: mapped.then.unwrap_or(mapped.first),
            then: None,
            ..mapped
        },
    };
    Ok(mapped.into_actions(contact, lsn).collect())
}

/// The tables the sync copies: mapped with `snapshot: initial`.
pub(crate) fn copied_tables(settings: &Settings) -> Vec<&TableMapping> {
    settings
        .tables
        .iter()
        .filter(|t| t.snapshot == SnapshotPolicy::Initial)
        .collect()
}

/// A mapper for one table's copied rows, planned on the table as it is.
pub(crate) fn table_mapper(
    t: &TableMapping,
    schema: &Schema,
    relation: &Relation,
    lsn: Lsn,
) -> Result<Mapper, Error> {
    let mut mapper = Mapper::new(std::slice::from_ref(t), schema.clone());
    mapper.relation(relation, lsn)?;
    Ok(mapper)
}

/// `resync`: validates the table and records the request for the running
/// connector (or the next one to start). Returns the table's name.
pub async fn request_resync(settings: &Settings, table: &str) -> Result<TableName, Error> {
    let name = TableName::parse(table).ok_or_else(|| {
        Error::Usage(format!(
            "--table: `{table}` is not a table name of the form schema.table"
        ))
    })?;
    let mapping = settings
        .tables
        .iter()
        .find(|t| t.table == name)
        .ok_or_else(|| {
            Error::Usage(format!(
                "--table: {name} is not a mapped table of this config"
            ))
        })?;
    if mapping.snapshot != SnapshotPolicy::Initial {
        return Err(Error::Usage(format!(
            "--table: {}.snapshot is never for {name}: a resync would send its rows as new events; set snapshot: initial on it to allow this",
            mapping.key
        )));
    }
    let client = crate::source::connect(&settings.postgres).await?;
    crate::state::request_resync(&client, &settings.slot, &name.to_string())
        .await
        .map_err(|e| {
            e.with_advice(
                "the connector's schema must exist (run the connector once, or sql/setup.sql)",
            )
        })?;
    Ok(name)
}
