//! Which of the connector's two publications each table goes through, and
//! which tables cannot be published at all without breaking the
//! application's writes. [`plan`] decides it for `check`, `status` and
//! `run` alike, so they never disagree.
//!
//! Postgres refuses every UPDATE and DELETE on a table without a usable
//! replica identity (no primary key under identity DEFAULT, NOTHING, or
//! USING INDEX of a dropped index) as soon as a publication that publishes
//! updates or deletes holds it. The main publication publishes everything.
//! A table whose mapping acts on inserts only and that has no usable replica
//! identity goes through a second one, `<publication>_inserts`, created
//! `WITH (publish = 'insert')`, which Postgres does not hold to that rule.
//! Only such tables go there (or insert-only tables an operator already put
//! there): every other table stays in the main publication, so deployments
//! that worked before keep their publication as it is. A table whose
//! mapping needs its updates or deletes (or that a lookup reads) and has no
//! usable replica identity is refused, with the fix.

use std::collections::HashSet;

use tokio_postgres::Client;

use super::identity::{replica_identity, ReplicaIdentity};
use super::info::publication_info;
use super::tables::{published_tables, PublishedTable};
use crate::config::{Settings, TableName, INSERT_PUBLICATION_SUFFIX};
use crate::source::slot::{self, Horizon};
use crate::source::SourceError;
use crate::sql::quote_ident;

/// The insert-only publication that goes with the main `publication`.
pub(crate) fn insert_publication(publication: &str) -> String {
    format!("{publication}{INSERT_PUBLICATION_SUFFIX}")
}

/// Which publication a table goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The main publication: inserts, updates and deletes.
    Main,
    /// `<publication>_inserts`: inserts only.
    Inserts,
}

/// One table the connector publishes, and where it goes.
#[derive(Debug)]
pub(crate) struct Placement<'a> {
    pub table: PublishedTable<'a>,
    /// Where it goes, or why it cannot be published (naming the table, the
    /// config key and the fix).
    pub route: Result<Route, String>,
}

/// A publication as the catalog has it now.
#[derive(Debug)]
pub(crate) struct Existing {
    /// `FOR ALL TABLES`.
    pub all_tables: bool,
    /// Publishes UPDATE or DELETE.
    pub changes_rows: bool,
    /// The tables it holds (by name or through their schema).
    pub tables: HashSet<TableName>,
    /// Those among `tables` it holds only through `FOR TABLES IN SCHEMA`
    /// (or `FOR ALL TABLES`): they cannot be dropped from it one by one.
    pub through_schema: HashSet<TableName>,
}

/// The connector's publications: what the catalog holds, and where each
/// table must go.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    pub main: String,
    pub inserts: String,
    pub main_now: Option<Existing>,
    pub inserts_now: Option<Existing>,
    pub placements: Vec<Placement<'a>>,
}

impl<'a> Plan<'a> {
    /// Every reason a table cannot be published; empty when all can.
    pub fn problems(&self) -> Vec<&str> {
        self.placements
            .iter()
            .filter_map(|p| p.route.as_ref().err().map(String::as_str))
            .collect()
    }

    /// The tables that go through `route`.
    pub fn routed(&self, route: Route) -> Vec<PublishedTable<'a>> {
        self.placements
            .iter()
            .filter(|p| p.route == Ok(route))
            .map(|p| p.table)
            .collect()
    }

    /// Whether the insert-only publication holds `table` now.
    fn in_inserts(&self, table: &TableName) -> bool {
        self.inserts_now
            .as_ref()
            .is_some_and(|p| p.tables.contains(table))
    }

    /// Whether the main publication holds `table` now, in a way it can be
    /// dropped from (not `FOR ALL TABLES`).
    fn in_main(&self, table: &TableName) -> bool {
        self.main_now.as_ref().is_some_and(|p| {
            !p.all_tables && p.tables.contains(table) && !p.through_schema.contains(table)
        })
    }

    /// The statements that move each table into the publication it goes
    /// through, once both exist: out of the main publication and into the
    /// insert-only one, or back. Tables the insert-only publication lacks
    /// are added only when `add_inserts` (it is listed in the stream).
    /// Empty when every table is where it belongs.
    pub fn moves(&self, add_inserts: bool) -> Vec<String> {
        let main = quote_ident(&self.main);
        let inserts = quote_ident(&self.inserts);
        let mut out = Vec::new();
        for p in &self.placements {
            let t = &p.table;
            match p.route {
                Ok(Route::Inserts) => {
                    if !self.in_inserts(t.table) {
                        if !add_inserts {
                            continue;
                        }
                        out.push(format!(
                            "ALTER PUBLICATION {inserts} ADD TABLE {};",
                            t.clause(None)
                        ));
                    }
                    if self.in_main(t.table)
                        && self.main_now.as_ref().is_some_and(|m| m.changes_rows)
                    {
                        out.push(format!(
                            "ALTER PUBLICATION {main} DROP TABLE {};",
                            t.table.quoted()
                        ));
                    }
                }
                Ok(Route::Main) if self.in_inserts(t.table) => {
                    if self.main_now.is_some()
                        && !self
                            .main_now
                            .as_ref()
                            .is_some_and(|m| m.tables.contains(t.table))
                    {
                        out.push(format!(
                            "ALTER PUBLICATION {main} ADD TABLE {};",
                            t.clause(None)
                        ));
                    }
                    out.push(format!(
                        "ALTER PUBLICATION {inserts} DROP TABLE {};",
                        t.table.quoted()
                    ));
                }
                _ => {}
            }
        }
        out
    }

    /// What an owner of the tables and publications runs to put every
    /// table where it belongs: create the insert-only publication when it
    /// is missing, and the moves, in one transaction.
    pub fn owner_sql(&self) -> String {
        let mut sql = vec!["BEGIN;".to_owned()];
        if self.inserts_now.is_none() {
            sql.push(format!(
                "CREATE PUBLICATION {} WITH (publish = 'insert');",
                quote_ident(&self.inserts)
            ));
        }
        sql.extend(self.moves(true));
        sql.push("COMMIT;".to_owned());
        sql.join(" ")
    }
}

/// Reads a publication from the catalog; None when it does not exist.
pub(crate) async fn existing(
    client: &Client,
    publication: &str,
) -> Result<Option<Existing>, SourceError> {
    let Some(info) = publication_info(client, publication).await? else {
        return Ok(None);
    };
    let rows = client
        .query(
            "SELECT pt.schemaname::text, pt.tablename::text,
                    NOT EXISTS (SELECT 1 FROM pg_publication_rel pr
                                  JOIN pg_publication p ON p.oid = pr.prpubid
                                 WHERE p.pubname = pt.pubname
                                   AND pr.prrelid = format('%I.%I', pt.schemaname, pt.tablename)::regclass)
               FROM pg_publication_tables pt WHERE pt.pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| {
            SourceError::from_sql(&format!("reading the tables of publication {publication}"), e)
        })?;
    let mut tables = HashSet::new();
    let mut through_schema = HashSet::new();
    for r in &rows {
        let table = TableName {
            schema: r.get(0),
            name: r.get(1),
        };
        if r.get::<_, bool>(2) {
            through_schema.insert(table.clone());
        }
        tables.insert(table);
    }
    Ok(Some(Existing {
        all_tables: info.all_tables,
        changes_rows: info.changes_rows,
        tables,
        through_schema,
    }))
}

/// Where each table the config publishes goes, read from the catalog
/// (replica identities, what each publication holds now). Changes nothing.
pub(crate) async fn plan<'a>(
    client: &Client,
    settings: &'a Settings,
) -> Result<Plan<'a>, SourceError> {
    let main = settings.publication.clone();
    let inserts = insert_publication(&main);
    let main_now = existing(client, &main).await?;
    let inserts_now = existing(client, &inserts).await?;
    let mut placements = Vec::new();
    for table in published_tables(settings) {
        let bare = bare_partitions(client, table.table).await?;
        if !bare.is_empty() && !table.insert_only {
            placements.push(Placement {
                table,
                route: Err(partitioned(&table, &bare)),
            });
            continue;
        }
        let identity = if bare.is_empty() {
            replica_identity(client, table.table).await?
        } else {
            // Published for its inserts only, whatever the parent's.
            ReplicaIdentity::Nothing {
                how: "partitioned, and some of its partitions have no replica identity",
            }
        };
        let held = inserts_now
            .as_ref()
            .is_some_and(|p| p.tables.contains(table.table));
        let route = route(
            &table,
            &identity,
            held,
            &main,
            main_now.as_ref(),
            (&inserts, inserts_now.as_ref()),
        );
        placements.push(Placement { table, route });
    }
    Ok(Plan {
        main,
        inserts,
        main_now,
        inserts_now,
        placements,
    })
}

/// The partitions of `table`, when it is a partitioned table, that have
/// no usable replica identity of their own: Postgres judges each
/// partition's own when the application writes to it, and `ALTER TABLE …
/// REPLICA IDENTITY` on the parent does not reach them. Empty for any
/// other table.
async fn bare_partitions(client: &Client, table: &TableName) -> Result<Vec<String>, SourceError> {
    let rows = client
        .query(
            "SELECT n.nspname || '.' || l.relname
               FROM pg_class c
               CROSS JOIN LATERAL pg_partition_tree(c.oid) t
               JOIN pg_class l ON l.oid = t.relid
               JOIN pg_namespace n ON n.oid = l.relnamespace
              WHERE c.oid = $1::text::regclass AND c.relkind = 'p' AND t.isleaf
                AND l.relreplident <> 'f'
                AND NOT EXISTS (SELECT 1 FROM pg_index i
                                 WHERE i.indrelid = l.oid AND i.indimmediate AND i.indisvalid
                                   AND CASE l.relreplident WHEN 'd' THEN i.indisprimary
                                                           WHEN 'i' THEN i.indisreplident
                                                           ELSE false END)
              ORDER BY 1",
            &[&table.quoted()],
        )
        .await
        .map_err(|e| SourceError::from_sql(&format!("looking up the partitions of {table}"), e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Why a partitioned table whose updates must be published cannot be,
/// while some of its partitions have no usable replica identity.
fn partitioned(t: &PublishedTable<'_>, bare: &[String]) -> String {
    let prefix = t.key.map(|k| format!("{k}: ")).unwrap_or_default();
    let insert_only = match (t.key, t.read_by_lookup) {
        (Some(key), false) => {
            format!(", or make the mapping insert-only ({key}.operations: [insert])")
        }
        _ => String::new(),
    };
    format!(
        "{prefix}{} is a partitioned table whose partitions {} have no usable replica identity of their own (Postgres judges each partition's, and REPLICA IDENTITY on the parent does not reach them), and its updates and deletes must be published, so Postgres would refuse every UPDATE and DELETE the application makes on them; run ALTER TABLE … REPLICA IDENTITY FULL on each of them, or add a primary key to {}{insert_only}",
        t.table,
        bare.join(", "),
        t.table
    )
}

/// The rule: a table whose updates and deletes must be published needs a
/// usable replica identity and goes through the main publication; an
/// insert-only table without one goes through the insert-only publication
/// (and stays there once there, with or without one).
fn route(
    t: &PublishedTable<'_>,
    identity: &ReplicaIdentity,
    in_inserts: bool,
    main: &str,
    main_now: Option<&Existing>,
    (inserts, inserts_now): (&str, Option<&Existing>),
) -> Result<Route, String> {
    let unusable = match identity {
        ReplicaIdentity::Nothing { how } => Some(*how),
        _ => None,
    };
    let alter = format!("ALTER TABLE {} REPLICA IDENTITY FULL;", t.table.quoted());
    // A publication the connector creates publishes every operation.
    let main_changes = main_now.is_none_or(|p| p.changes_rows);
    if !t.insert_only {
        let Some(how) = unusable.filter(|_| main_changes) else {
            return Ok(Route::Main);
        };
        let (why, fix) = match (t.key, t.read_by_lookup) {
            (_, true) => (
                "a lookup reads it, so its updates and deletes must be published (they keep the lookup cache fresh)".to_owned(),
                format!("run {alter} or add a primary key"),
            ),
            (Some(key), false) => (
                format!("{key}.operations include update or delete, so its updates and deletes must be published"),
                format!("run {alter} or add a primary key, or make the mapping insert-only ({key}.operations: [insert])"),
            ),
            (None, false) => ("its updates and deletes must be published".to_owned(), format!("run {alter} or add a primary key")),
        };
        let prefix = t.key.map(|k| format!("{k}: ")).unwrap_or_default();
        return Err(format!(
            "{prefix}the replica identity of {} is {how} and {why}, and Postgres would then refuse every UPDATE and DELETE the application makes on the table; {fix}",
            t.table
        ));
    }
    if unusable.is_none() && !in_inserts {
        return Ok(Route::Main);
    }
    if let (Some(how), Some(p)) = (unusable, main_now) {
        if p.changes_rows && !p.all_tables && p.through_schema.contains(t.table) {
            return Err(format!(
                "{}: the replica identity of {} is {how}, and publication {main} holds it through FOR TABLES IN SCHEMA {}, so it publishes the table's updates and deletes and Postgres refuses every UPDATE and DELETE on it; give the connector a publication of its own (postgres.publication), or run {alter} or add a primary key",
                t.key.unwrap_or("postgres.publication"),
                t.table,
                quote_ident(&t.table.schema)
            ));
        }
        if p.all_tables && p.changes_rows {
            return Err(format!(
                "{}: the replica identity of {} is {how}, and publication {main} is FOR ALL TABLES, so it publishes the table's updates and deletes and Postgres refuses every UPDATE and DELETE on it; give the connector a publication of its own (postgres.publication), or run {alter} or add a primary key",
                t.key.unwrap_or("postgres.publication"),
                t.table
            ));
        }
    }
    if let (Some(how), Some(p)) = (unusable, inserts_now) {
        if p.changes_rows {
            return Err(format!(
                "{}: the replica identity of {} is {how}, and publication {inserts} publishes updates or deletes (it was not created WITH (publish = 'insert')), so Postgres would refuse every UPDATE and DELETE the application makes on the table once it is there; as its owner run ALTER PUBLICATION {} SET (publish = 'insert'); or run {alter} or add a primary key",
                t.key.unwrap_or("postgres.publication"),
                t.table,
                quote_ident(inserts)
            ));
        }
    }
    Ok(Route::Inserts)
}

/// Whether the slot can decode with `publication` among its
/// `publication_names`. Before PostgreSQL 18, pgoutput looks publications
/// up in the catalog as of each change it decodes and fails on one created
/// after that change, so a publication created after the slot's confirmed
/// position may be listed only once the slot has passed its creation.
/// True when the slot does not exist yet (it is created after the
/// publication), when the slot's catalog horizon is past the publication's
/// creation, or when decoding the slot's next transaction with it works.
pub(crate) async fn visible_to_slot(
    client: &Client,
    slot: &str,
    main: &str,
    publication: &str,
) -> Result<bool, SourceError> {
    let Horizon {
        slot_exists,
        older,
        unreadable,
    } = slot::horizon(client, slot, publication).await?;
    if !slot_exists || older {
        return Ok(true);
    }
    if unreadable {
        // Another connector streams (this one stands by and asks again),
        // or the slot is not one the connector can use (its checks say so).
        return Ok(false);
    }
    let names = format!("{},{}", quote_ident(main), quote_ident(publication));
    match client
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, 1,
                 'proto_version', '1', 'publication_names', $2)",
            &[&slot, &names],
        )
        .await
    {
        Ok(_) => Ok(true),
        // "publication … does not exist" (SQLSTATE 42704) as of the slot's
        // next change; or the slot became busy, or something else is wrong
        // with it, which the slot checks report.
        Err(e) if e.as_db_error().is_some() => {
            tracing::debug!(slot, publication, "the slot could not be read ahead: {e}");
            Ok(false)
        }
        Err(e) => Err(SourceError::from_sql(
            &format!("checking that slot {slot} can decode with publication {publication}"),
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table<'a>(name: &'a TableName, insert_only: bool, lookup: bool) -> PublishedTable<'a> {
        PublishedTable {
            table: name,
            key: Some("tables[0]"),
            filter: None,
            insert_only,
            read_by_lookup: lookup,
        }
    }

    const NO_PK: ReplicaIdentity = ReplicaIdentity::Nothing {
        how: "DEFAULT, but the table has no primary key",
    };

    #[test]
    fn a_keyless_table_goes_through_the_insert_only_publication_only_when_insert_only() {
        let h = TableName::parse("public.history").unwrap();
        assert_eq!(
            route(
                &table(&h, true, false),
                &NO_PK,
                false,
                "p",
                None,
                ("p_inserts", None)
            ),
            Ok(Route::Inserts)
        );
        let e = route(
            &table(&h, false, false),
            &NO_PK,
            false,
            "p",
            None,
            ("p_inserts", None),
        )
        .unwrap_err();
        assert!(
            e.starts_with("tables[0]: the replica identity of public.history is DEFAULT, but the table has no primary key and tables[0].operations include update or delete")
                && e.contains("run ALTER TABLE \"public\".\"history\" REPLICA IDENTITY FULL; or add a primary key, or make the mapping insert-only (tables[0].operations: [insert])"),
            "{e}"
        );
        let e = route(
            &table(&h, false, true),
            &NO_PK,
            false,
            "p",
            None,
            ("p_inserts", None),
        )
        .unwrap_err();
        assert!(
            e.contains("a lookup reads it") && !e.contains("insert-only"),
            "{e}"
        );
        // A table with a primary key stays in the main publication, unless
        // it is insert-only and already in the insert-only one.
        let pk = ReplicaIdentity::Columns {
            how: "DEFAULT, the primary key",
            columns: vec!["id".into()],
        };
        assert_eq!(
            route(
                &table(&h, true, false),
                &pk,
                false,
                "p",
                None,
                ("p_inserts", None)
            ),
            Ok(Route::Main)
        );
        assert_eq!(
            route(
                &table(&h, true, false),
                &pk,
                true,
                "p",
                None,
                ("p_inserts", None)
            ),
            Ok(Route::Inserts)
        );
        assert_eq!(
            route(
                &table(&h, false, false),
                &pk,
                true,
                "p",
                None,
                ("p_inserts", None)
            ),
            Ok(Route::Main)
        );
        // A main publication FOR ALL TABLES publishes it anyway.
        let all = Existing {
            all_tables: true,
            changes_rows: true,
            tables: HashSet::from([h.clone()]),
            through_schema: HashSet::from([h.clone()]),
        };
        let e = route(
            &table(&h, true, false),
            &NO_PK,
            false,
            "p",
            Some(&all),
            ("p_inserts", None),
        )
        .unwrap_err();
        assert!(e.contains("publication p is FOR ALL TABLES"), "{e}");
        // An insert-only publication that publishes updates takes no
        // keyless table (one with a key is fine there).
        let changes = Existing {
            all_tables: false,
            changes_rows: true,
            tables: HashSet::new(),
            through_schema: HashSet::new(),
        };
        let e = route(
            &table(&h, true, false),
            &NO_PK,
            false,
            "p",
            None,
            ("p_inserts", Some(&changes)),
        )
        .unwrap_err();
        assert!(
            e.contains("publication p_inserts publishes updates or deletes")
                && e.contains(r#"ALTER PUBLICATION "p_inserts" SET (publish = 'insert');"#),
            "{e}"
        );
        assert_eq!(
            route(
                &table(&h, true, false),
                &pk,
                true,
                "p",
                None,
                ("p_inserts", Some(&changes))
            ),
            Ok(Route::Inserts)
        );
    }

    #[test]
    fn moves_take_a_table_out_of_the_main_publication_and_back() {
        let h = TableName::parse("public.history").unwrap();
        let s = TableName::parse("public.sales").unwrap();
        let plan =
            |inserts_holds: &[&TableName], main_holds: &[&TableName], routes: [Route; 2]| Plan {
                main: "p".into(),
                inserts: "p_inserts".into(),
                main_now: Some(Existing {
                    all_tables: false,
                    changes_rows: true,
                    tables: main_holds.iter().map(|t| (*t).clone()).collect(),
                    through_schema: HashSet::new(),
                }),
                inserts_now: Some(Existing {
                    all_tables: false,
                    changes_rows: false,
                    tables: inserts_holds.iter().map(|t| (*t).clone()).collect(),
                    through_schema: HashSet::new(),
                }),
                placements: vec![
                    Placement {
                        table: table(&h, true, false),
                        route: Ok(routes[0]),
                    },
                    Placement {
                        table: table(&s, false, false),
                        route: Ok(routes[1]),
                    },
                ],
            };
        let p = plan(&[], &[&h, &s], [Route::Inserts, Route::Main]);
        assert_eq!(
            p.moves(true),
            vec![
                r#"ALTER PUBLICATION "p_inserts" ADD TABLE "public"."history";"#,
                r#"ALTER PUBLICATION "p" DROP TABLE "public"."history";"#,
            ]
        );
        assert!(p.moves(false).is_empty());
        assert_eq!(
            p.owner_sql(),
            r#"BEGIN; ALTER PUBLICATION "p_inserts" ADD TABLE "public"."history"; ALTER PUBLICATION "p" DROP TABLE "public"."history"; COMMIT;"#
        );
        let p = plan(&[&h, &s], &[], [Route::Inserts, Route::Main]);
        assert_eq!(
            p.moves(true),
            vec![
                r#"ALTER PUBLICATION "p" ADD TABLE "public"."sales";"#,
                r#"ALTER PUBLICATION "p_inserts" DROP TABLE "public"."sales";"#,
            ]
        );
        let p = plan(&[&h], &[&s], [Route::Inserts, Route::Main]);
        assert!(p.moves(true).is_empty());
    }
}
