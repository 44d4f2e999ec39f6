//! The tables the publications must hold, as the config asks for them.

use crate::config::{ContactSource, Settings, TableName};
use crate::sql::quote_ident;

/// One table the publication must hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PublishedTable<'a> {
    pub table: &'a TableName,
    /// `tables[i]` for a mapped table; None for a table only lookups read.
    pub key: Option<&'a str>,
    /// The row filter from `where:`.
    pub filter: Option<&'a str>,
    /// Mapped, and its mapping acts on inserts only (and no lookup reads
    /// it): its updates and deletes need not be published.
    pub insert_only: bool,
    /// A lookup reads it: its updates keep the lookup cache fresh.
    pub read_by_lookup: bool,
}

impl PublishedTable<'_> {
    /// The config key errors about this table's filter name.
    pub(super) fn where_key(&self) -> String {
        match self.key {
            Some(key) => format!("{key}.where"),
            None => "postgres.publication".to_owned(),
        }
    }

    /// The table as `ADD TABLE` / `FOR TABLE` take it, with its filter and
    /// (when the publication already limits them) its columns.
    pub(crate) fn clause(&self, columns: Option<&[String]>) -> String {
        let mut out = self.table.quoted();
        if let Some(columns) = columns {
            let list: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
            out.push_str(&format!(" ({})", list.join(", ")));
        }
        if let Some(filter) = self.filter {
            out.push_str(&format!(" WHERE ({filter})"));
        }
        out
    }
}

/// Every table the publication must hold ([`Settings::published_tables`]),
/// with each mapped table's key and row filter.
pub(crate) fn published_tables(settings: &Settings) -> Vec<PublishedTable<'_>> {
    settings
        .published_tables()
        .into_iter()
        .map(|table| {
            let mapping = settings.tables.iter().find(|m| &m.table == table);
            let read_by_lookup = settings
                .tables
                .iter()
                .any(|m| matches!(&m.contact, ContactSource::Lookup(l) if &l.from == table));
            PublishedTable {
                table,
                key: mapping.map(|m| m.key.as_str()),
                filter: mapping.and_then(|m| m.row_filter.as_deref()),
                insert_only: !read_by_lookup
                    && mapping.is_some_and(|m| !m.operations.update && !m.operations.delete),
                read_by_lookup,
            }
        })
        .collect()
}
