//! Publication changes run in a transaction that is rolled back when
//! Postgres would refuse the application's writes afterwards; and the
//! errors Postgres raises on the way.

use tokio_postgres::Client;

use crate::source::SourceError;

/// SQLSTATE insufficient_privilege.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// The role lacks a privilege (owner of the table or publication, CREATE
/// on the database).
pub(super) fn is_privilege(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.code().code() == INSUFFICIENT_PRIVILEGE)
}

/// Postgres's message with its detail and SQLSTATE, for an error about
/// something the user wrote.
pub(super) fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = db.message().to_owned();
            if let Some(detail) = db.detail() {
                text.push_str(&format!(": {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!(" (hint: {hint})"));
            }
            format!("{text} (SQLSTATE {})", db.code().code())
        }
        None => e.to_string(),
    }
}

pub(super) async fn begin(client: &Client) -> Result<(), SourceError> {
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| SourceError::from_sql("starting a transaction", e))
}

/// Ends the transaction [`begin`] started: commits when `outcome` is
/// `Ok((true, _))`, rolls back otherwise, and passes the outcome on.
pub(super) async fn finish<T>(
    client: &Client,
    outcome: Result<(bool, T), SourceError>,
) -> Result<T, SourceError> {
    let end = match &outcome {
        Ok((true, _)) => "COMMIT",
        _ => "ROLLBACK",
    };
    let ended = client.batch_execute(end).await;
    let (_, value) = outcome?;
    ended.map_err(|e| SourceError::from_sql(&format!("ending a transaction ({end})"), e))?;
    Ok(value)
}
