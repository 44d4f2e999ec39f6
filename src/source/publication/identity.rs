//! A table's replica identity, and whether a row filter reads only
//! columns it holds.

use std::collections::BTreeSet;

use tokio_postgres::Client;

use crate::config::TableName;
use crate::source::SourceError;
/// The replica identity of a table: which of its columns Postgres writes
/// into the WAL as the old row of an UPDATE or DELETE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReplicaIdentity {
    /// `REPLICA IDENTITY FULL`: every column.
    Full,
    /// DEFAULT with a primary key, or USING INDEX: these columns.
    Columns {
        /// `DEFAULT, the primary key` or `USING INDEX`.
        how: &'static str,
        columns: Vec<String>,
    },
    /// NOTHING, or DEFAULT without a primary key, or USING INDEX of an
    /// index since dropped: Postgres refuses UPDATE and DELETE on the table
    /// once a publication that publishes them holds it.
    Nothing {
        /// `NOTHING` or `DEFAULT, but the table has no primary key`.
        how: &'static str,
    },
}

impl ReplicaIdentity {
    /// Whether the old row carries `column`.
    fn covers(&self, column: &str) -> bool {
        match self {
            ReplicaIdentity::Full => true,
            ReplicaIdentity::Columns { columns, .. } => columns.iter().any(|c| c == column),
            ReplicaIdentity::Nothing { .. } => false,
        }
    }
}

impl std::fmt::Display for ReplicaIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaIdentity::Full => f.write_str("FULL"),
            ReplicaIdentity::Columns { how, columns } => {
                write!(f, "{how} ({})", columns.join(", "))
            }
            ReplicaIdentity::Nothing { how } => f.write_str(how),
        }
    }
}

/// Reads a table's replica identity from the catalog.
pub(crate) async fn replica_identity(
    client: &Client,
    table: &TableName,
) -> Result<ReplicaIdentity, SourceError> {
    let row = client
        .query_one(
            // Postgres passes over a deferrable (or invalid) primary key
            // when it looks for the replica identity, as if there were none.
            "SELECT c.relreplident::text,
                    ARRAY(SELECT a.attname::text
                            FROM pg_index i
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                           WHERE i.indrelid = c.oid AND i.indimmediate AND i.indisvalid
                             AND CASE c.relreplident WHEN 'd' THEN i.indisprimary
                                                     WHEN 'i' THEN i.indisreplident
                                                     ELSE false END
                           ORDER BY a.attnum),
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
               FROM pg_class c WHERE c.oid = $1::text::regclass",
            &[&table.quoted()],
        )
        .await
        .map_err(|e| SourceError::from_sql(&format!("reading the replica identity of {table}"), e))?;
    let kind: String = row.get(0);
    let columns: Vec<String> = row.get(1);
    let has_primary_key: bool = row.get(2);
    Ok(match (kind.as_str(), columns.is_empty()) {
        ("f", _) => ReplicaIdentity::Full,
        ("n", _) => ReplicaIdentity::Nothing { how: "NOTHING" },
        ("d", true) if has_primary_key => ReplicaIdentity::Nothing {
            how: "DEFAULT, but the primary key is DEFERRABLE (or not valid), which Postgres does not use as a replica identity",
        },
        ("d", true) => ReplicaIdentity::Nothing {
            how: "DEFAULT, but the table has no primary key",
        },
        ("i", true) => ReplicaIdentity::Nothing {
            how: "USING INDEX of an index that no longer exists",
        },
        ("i", false) => ReplicaIdentity::Columns {
            how: "USING INDEX",
            columns,
        },
        _ => ReplicaIdentity::Columns {
            how: "DEFAULT, the primary key",
            columns,
        },
    })
}

/// The attribute numbers a stored expression (`pg_node_tree` as text)
/// reads, from its `:varattno N` fields; 0 stands for the whole row.
fn varattnos(node_tree: &str) -> BTreeSet<i16> {
    node_tree
        .split(":varattno ")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '-')
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// Why the publication's row filter on `table` would make Postgres refuse
/// the table's UPDATEs and DELETEs: the columns it reads outside the
/// replica identity, and the fix. None when it reads only identity columns
/// (or the publication holds no filter for the table).
pub(crate) async fn identity_problem(
    client: &Client,
    publication: &str,
    table: &TableName,
) -> Result<Option<String>, SourceError> {
    let row = client
        .query_opt(
            "SELECT pr.prqual::text FROM pg_publication_rel pr
               JOIN pg_publication p ON p.oid = pr.prpubid
              WHERE p.pubname = $1 AND pr.prrelid = $2::text::regclass",
            &[&publication, &table.quoted()],
        )
        .await
        .map_err(|e| SourceError::from_sql(&format!("reading the row filter of {table}"), e))?;
    let Some(qual) = row.and_then(|r| r.get::<_, Option<String>>(0)) else {
        return Ok(None);
    };
    let identity = replica_identity(client, table).await?;
    if identity == ReplicaIdentity::Full {
        return Ok(None);
    }
    let attnums: Vec<i16> = varattnos(&qual).into_iter().collect();
    let rows = client
        .query(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum = ANY ($2) ORDER BY attnum",
            &[&table.quoted(), &attnums],
        )
        .await
        .map_err(|e| SourceError::from_sql(&format!("reading the columns of {table}"), e))?;
    let mut outside: Vec<String> = rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|c| !identity.covers(c))
        .map(|c| format!("`{c}`"))
        .collect();
    if attnums.contains(&0) {
        outside.push("the whole row".to_owned());
    }
    if outside.is_empty() {
        return Ok(None);
    }
    let alternative = match &identity {
        ReplicaIdentity::Columns { columns, .. } => {
            format!(", or filter only on {}", columns.join(", "))
        }
        _ => String::new(),
    };
    Ok(Some(format!(
        "the row filter reads {} of {table}, outside its replica identity ({identity}); Postgres would accept it and then refuse every UPDATE and DELETE on the table. Run ALTER TABLE {} REPLICA IDENTITY FULL;{alternative}",
        outside.join(", "),
        table.quoted()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_read_from_the_node_tree() {
        let tree = "{BOOLEXPR :boolop and :args ({VAR :varno 1 :varattno 3 :vartype 16} {OPEXPR :args ({VAR :varno 1 :varattno 7 :vartype 25} {CONST :consttype 25})}) {VAR :varno 1 :varattno 3}}";
        assert_eq!(varattnos(tree), BTreeSet::from([3, 7]));
        assert!(varattnos("{CONST :consttype 16 :constvalue 1 [ 1 0 0 0 0 0 0 0 ]}").is_empty());
    }
}
