//! Stored generated columns the mapping reads, on PostgreSQL 18: the
//! publication their table goes through must publish them
//! (`publish_generated_columns = stored`), which `run` sets when the role
//! may. (A generated column the stream cannot carry fails "tables and
//! columns".)

use super::result::{fail, pass, CheckResult};
use crate::config::Settings;
use crate::source::{self, Plan, Route};

const NAME: &str = "generated columns";

/// One line when the mapping reads a stored generated column; none
/// otherwise, or before 18.
pub(super) async fn generated(
    client: &tokio_postgres::Client,
    settings: &Settings,
    plan: &Plan<'_>,
) -> Option<CheckResult> {
    let version = source::server_version_num(client).await.ok()?;
    if version < source::PUBLISH_GENERATED_SINCE {
        return None;
    }
    let columns = match source::generated_columns(client, &settings.tables).await {
        Ok(columns) => columns,
        Err(e) => return Some(fail(NAME, e.to_string())),
    };
    let mut notes = Vec::new();
    for (publication, route) in [(&plan.main, Route::Main), (&plan.inserts, Route::Inserts)] {
        let routed = plan.routed(route);
        let tables: Vec<_> = routed.iter().map(|t| t.table).collect();
        let needing = source::needing_publish(&columns, &tables);
        if needing.is_empty() {
            continue;
        }
        let listed: Vec<String> = needing
            .iter()
            .map(|c| format!("{}.{} ({})", c.table, c.column, c.key))
            .collect();
        let listed = listed.join(", ");
        let publishes = match source::publishes_generated(client, publication).await {
            Ok(p) => p,
            Err(e) => return Some(fail(NAME, e.to_string())),
        };
        let may_alter = client
            .query_one(
                "SELECT coalesce((SELECT pg_has_role(pubowner, 'USAGE') FROM pg_publication WHERE pubname = $1), true)
                        OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
                &[publication],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false);
        notes.push(match publishes {
            Some(true) => format!("{listed}: publication {publication} publishes stored generated columns"),
            None => format!("{listed}: run creates publication {publication} with publish_generated_columns = stored"),
            Some(false) if may_alter => format!("{listed}: run sets publish_generated_columns = stored on publication {publication}"),
            Some(false) => {
                return Some(fail(
                    NAME,
                    format!(
                        "{listed}: stored generated columns, which publication {publication} does not publish, and role {} may not alter it; as its owner run: {}",
                        settings.postgres.user,
                        source::publish_statement(publication)
                    ),
                ))
            }
        });
    }
    (!notes.is_empty()).then(|| pass(NAME, notes.join("; ")))
}
