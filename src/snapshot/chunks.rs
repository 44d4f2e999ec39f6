//! One chunk at a time between a low and a high watermark written into
//! the WAL as logical decoding messages.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio_postgres::Client;

use crate::config::TableName;
use crate::mapping::Action;
use crate::pg_time::pg_now;
use crate::shutdown::Shutdown;
use crate::source::{Key, SourceError};
use crate::state::WATERMARK_PREFIX;
use crate::Error;

use super::window::{Chunk, Window};
use crate::source::begin_snapshot;

/// Reads chunks between watermarks and hands them to the reader: a chunk's
/// rows are delivered at the high watermark's place in the stream, less
/// those the stream changed in full between the watermarks, so no row is
/// sent with values older than a change already sent.
pub(crate) struct WatermarkedChunks<'a> {
    pub(super) client: &'a Arc<Client>,
    window: &'a Mutex<Window>,
    slot: &'a str,
    /// Tells this run's watermarks from those of earlier runs still in the
    /// WAL.
    nonce: String,
    count: u64,
}

impl<'a> WatermarkedChunks<'a> {
    /// Chunks through `window` (one the reader watches); `tag` tells this
    /// user's watermarks from another's sharing the stream.
    pub(crate) fn new(
        client: &'a Arc<Client>,
        window: &'a Mutex<Window>,
        slot: &'a str,
        tag: &str,
    ) -> WatermarkedChunks<'a> {
        WatermarkedChunks {
            client,
            window,
            slot,
            nonce: format!("{tag}{:x}", pg_now()),
            count: 0,
        }
    }

    /// One chunk: the low watermark, `read`, the high watermark; waits until
    /// the rows the stream did not supersede are delivered. Returns what was
    /// read and the keys to read again (and whether those are all of them
    /// for want of knowing which), or None on a stop.
    pub(crate) async fn chunk<F, Fut>(
        &mut self,
        table: &TableName,
        key_columns: &[String],
        read: F,
        shutdown: &mut Shutdown,
    ) -> Result<Option<(Vec<Key>, (Vec<Key>, bool))>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<(Key, Vec<Action>)>, Error>>,
    {
        self.count += 1;
        let id = format!("{}-{}", self.nonce, self.count);
        if let Ok(mut w) = self.window.lock() {
            w.expect(&id, table, key_columns);
        }
        emit(self.client, &format!("lw:{}:{id}", self.slot)).await?;
        // One snapshot for the rows and their lookups, whose visibility the
        // reader checks the stream's transactions against.
        let snapshot = begin_snapshot(self.client).await?;
        let rows = match read().await {
            Ok(rows) => rows,
            Err(e) => {
                let _ = self.client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        };
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| SourceError::from_sql("ending a sync chunk's read", e))?;
        let keys: Vec<Key> = rows.iter().map(|(k, _)| k.clone()).collect();
        let (done, delivered) = oneshot::channel();
        if let Ok(mut w) = self.window.lock() {
            w.hold(Chunk {
                rows,
                snapshot,
                done,
            });
        }
        emit(self.client, &format!("hw:{}:{id}", self.slot)).await?;
        tokio::select! {
            r = delivered => if r.is_err() { return Ok(None) },
            _ = shutdown.wait() => return Ok(None),
        }
        let redo = self
            .window
            .lock()
            .map(|mut w| w.take_redo())
            .unwrap_or_default();
        Ok(Some((keys, redo)))
    }
}

/// Writes one of the connector's messages into the WAL, outside any
/// transaction, so the stream carries it at this point.
async fn emit(client: &Client, content: &str) -> Result<(), SourceError> {
    client
        .execute(
            "SELECT pg_logical_emit_message(false, $1, $2)",
            &[&WATERMARK_PREFIX, &content],
        )
        .await
        .map_err(|e| SourceError::from_sql("writing a sync watermark", e))?;
    Ok(())
}
