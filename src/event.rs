//! What the reader and the copy hand delivery, in stream order.

use tokio::sync::oneshot;

use crate::lsn::Lsn;
use crate::mapping::Action;
use crate::state::Progress;

/// What the reader hands the dispatcher, in stream order.
#[derive(Debug)]
pub(crate) enum Event {
    /// A transaction starts.
    Begin,
    /// A row change to deliver, and its place in the stream.
    Action {
        action: Action,
        at: Progress,
    },
    Commit {
        end_lsn: Lsn,
        commit_time: i64,
    },
    /// The server has sent everything up to here.
    Keepalive {
        wal_end: Lsn,
    },
    /// Fires once every action before it is acknowledged (or durably
    /// dead-lettered): a sync chunk's rows are delivered.
    Marker(oneshot::Sender<()>),
    /// Nothing more is due soon: what is batched goes out, if a
    /// transaction ended since the last time, rather than wait for the
    /// batch to fill.
    Quiet,
}
