//! The connector's own schema: its tables, created when missing, and the
//! columns later versions added, added in place.

use tokio_postgres::Client;

use crate::source::SourceError;

/// The schema's name. `sql/setup.sql` creates it owned by the connector's
/// role; the connector creates it itself when it may.
pub const SCHEMA: &str = "conveyour_cdc";

/// Makes sure the schema and its tables exist, with this version's
/// columns. The existence checks come first: `CREATE SCHEMA IF NOT EXISTS`
/// needs CREATE on the database even when the schema is already there.
pub(super) async fn create(client: &Client) -> Result<(), SourceError> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&SCHEMA])
        .await
        .map_err(|e| SourceError::from_sql("looking up the connector's schema", e))?
        .is_some();
    if !exists {
        match client.batch_execute(&format!("CREATE SCHEMA {SCHEMA}")).await {
            Ok(()) => {}
            // Another connector created it just now.
            Err(e) if SourceError::already_exists(&e) => {}
            Err(e) => {
                return Err(SourceError::from_sql(
                    &format!("creating the connector's schema {SCHEMA} (run sql/setup.sql, or GRANT CREATE ON DATABASE to the role)"),
                    e,
                ))
            }
        }
    }
    // Created only when one is missing: IF NOT EXISTS on a table that
    // exists makes the server send a NOTICE, logged on every start.
    let present = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename IN ('progress', 'snapshot_progress', 'dead_letters')",
            &[&SCHEMA],
        )
        .await
        .map_err(|e| SourceError::from_sql("looking up the connector's tables", e))?
        .get::<_, i64>(0);
    let tables = if present == 3 {
        Ok(())
    } else {
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {SCHEMA}.progress (
                 slot text NOT NULL,
                 lane int NOT NULL,
                 lanes int NOT NULL,
                 system_id text NOT NULL,
                 commit_lsn pg_lsn NOT NULL,
                 change bigint NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (slot, lane)
             );
             CREATE TABLE IF NOT EXISTS {SCHEMA}.snapshot_progress (
                 slot text NOT NULL,
                 source_table text NOT NULL,
                 status text NOT NULL,
                 last_key text[],
                 rows_copied bigint NOT NULL DEFAULT 0,
                 rows_total bigint,
                 generation bigint NOT NULL DEFAULT 0,
                 started_at timestamptz,
                 updated_at timestamptz NOT NULL DEFAULT now(),
                 finished_at timestamptz,
                 PRIMARY KEY (slot, source_table)
             );
             CREATE TABLE IF NOT EXISTS {SCHEMA}.dead_letters (
                 id bigserial PRIMARY KEY,
                 slot text NOT NULL,
                 endpoint text NOT NULL,
                 source_table text NOT NULL,
                 contact text NOT NULL,
                 lsn pg_lsn NOT NULL,
                 payload jsonb NOT NULL,
                 status int NOT NULL,
                 message text NOT NULL,
                 attempts int NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now()
             );"
            ))
            .await
    };
    match tables {
        Ok(()) => {}
        // Two connectors creating the same table at once: the loser's
        // IF NOT EXISTS still trips on the catalog's unique index.
        Err(e) if SourceError::already_exists(&e) => {}
        Err(e) => {
            return Err(SourceError::from_sql(
                &format!("creating the tables in schema {SCHEMA}"),
                e,
            ))
        }
    }
    match upgrade(client).await {
        Ok(()) => {}
        Err(e) if SourceError::already_exists(&e) => {}
        Err(e) => return Err(upgrade_error(client, e).await),
    }
    Ok(())
}

/// Columns added after the table's first release, for installs made
/// before: each `ADD COLUMN IF NOT EXISTS`, so an existing table upgrades
/// in place and a new one gets them too. Rows stored before have no key
/// (NULL) and reason `rejected` (the only reason there was).
const UPGRADE: &str = "
    ALTER TABLE {SCHEMA}.dead_letters ADD COLUMN IF NOT EXISTS reason text NOT NULL DEFAULT 'rejected';
    ALTER TABLE {SCHEMA}.dead_letters ADD COLUMN IF NOT EXISTS key_columns text[];
    ALTER TABLE {SCHEMA}.dead_letters ADD COLUMN IF NOT EXISTS key_values text[];
    ALTER TABLE {SCHEMA}.dead_letters ADD COLUMN IF NOT EXISTS retries int NOT NULL DEFAULT 0;
    ALTER TABLE {SCHEMA}.dead_letters ADD COLUMN IF NOT EXISTS retry_requested boolean NOT NULL DEFAULT false;
    ALTER TABLE {SCHEMA}.dead_letters ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();
    CREATE INDEX IF NOT EXISTS dead_letters_row ON {SCHEMA}.dead_letters (slot, source_table, key_values);";

/// How many of [`UPGRADE`]'s columns there are, plus its index.
const UPGRADE_OBJECTS: i64 = 7;

/// Adds the columns and the index of [`UPGRADE`] the table lacks. Looked
/// up first: an ALTER TABLE locks the table even when it changes nothing,
/// and a standby connector opens the schema every few seconds. The index
/// finds a row's entry when it is stored again: without it, storing each
/// of many unmappable rows reads the whole table.
async fn upgrade(client: &Client) -> Result<(), tokio_postgres::Error> {
    let present: i64 = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM pg_attribute
                          WHERE attrelid = '{SCHEMA}.dead_letters'::regclass AND NOT attisdropped
                            AND attname IN ('reason', 'key_columns', 'key_values', 'retries', 'retry_requested', 'updated_at'))
                      + (SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                          WHERE i.indrelid = '{SCHEMA}.dead_letters'::regclass AND c.relname = 'dead_letters_row')"
            ),
            &[],
        )
        .await?
        .get(0);
    if present == UPGRADE_OBJECTS {
        return Ok(());
    }
    client
        .batch_execute(&UPGRADE.replace("{SCHEMA}", SCHEMA))
        .await
}

/// Why [`upgrade`] failed, with the fix: a table another role owns (made
/// by an earlier version run as that role) takes new columns only from its
/// owner.
async fn upgrade_error(client: &Client, e: tokio_postgres::Error) -> SourceError {
    let context = format!("adding this version's columns and index to {SCHEMA}.dead_letters");
    if e.code() != Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
        return SourceError::from_sql(&context, e);
    }
    let role: String = match client.query_one("SELECT current_user::text", &[]).await {
        Ok(r) => r.get(0),
        Err(_) => "<the connector's role>".into(),
    };
    SourceError::from_sql(
        &format!(
            "{context} (another role owns the table; as that role or a superuser run ALTER TABLE {SCHEMA}.dead_letters OWNER TO \"{role}\", then restart)"
        ),
        e,
    )
}
