//! What the catalog says of a publication: its `pg_publication` row and
//! the tables it publishes. Every read of those two catalogs is here.

use tokio_postgres::Client;

use crate::source::SourceError;

/// The publication as `pg_publication` describes it.
pub(super) struct PublicationInfo {
    /// `FOR ALL TABLES`: holds everything, and cannot filter rows.
    pub all_tables: bool,
    /// Publishes UPDATE or DELETE, which is when Postgres enforces the
    /// replica identity rule on row filters.
    pub changes_rows: bool,
}

/// The publication's row; None when it does not exist.
pub(super) async fn publication_info(
    client: &Client,
    publication: &str,
) -> Result<Option<PublicationInfo>, SourceError> {
    let row = client
        .query_opt(
            "SELECT puballtables, pubupdate OR pubdelete FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| SourceError::from_sql(&format!("looking up publication {publication}"), e))?;
    Ok(row.map(|r| PublicationInfo {
        all_tables: r.get(0),
        changes_rows: r.get(1),
    }))
}

/// Whether the publication exists.
pub(crate) async fn publication_exists(
    client: &Client,
    publication: &str,
) -> Result<bool, SourceError> {
    Ok(publication_info(client, publication).await?.is_some())
}

/// The tables `publication` publishes, as `schema.table`, sorted (empty
/// when it does not exist).
pub(crate) async fn published_table_names(
    client: &Client,
    publication: &str,
) -> Result<Vec<String>, SourceError> {
    let rows = client
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await
        .map_err(|e| {
            SourceError::from_sql(&format!("reading the tables of publication {publication}"), e)
        })?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
