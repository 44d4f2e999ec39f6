//! Row filters (`where:`) carried by the publication, the replica identity
//! rule Postgres enforces only when the application next updates a row, and
//! what `check` says about filters, lookups and replica identity.

use std::time::Duration;

use serde_json::json;

use crate::support::connector::{run_cli, Connector, CONFIG_PLACEHOLDER as CONFIG};
use crate::support::setup::{world, World};

/// Employees whose updates carry the whole old row, so a filter may read
/// any column.
const FULL_SQL: &str = "
    CREATE TABLE employees (
        id serial PRIMARY KEY,
        email text NOT NULL,
        first_name text,
        active bool NOT NULL DEFAULT true,
        region text
    );
    ALTER TABLE employees REPLICA IDENTITY FULL;
";

/// The same table with the default replica identity (the primary key).
const DEFAULT_SQL: &str = "
    CREATE TABLE employees (
        id serial PRIMARY KEY,
        email text NOT NULL,
        first_name text,
        active bool NOT NULL DEFAULT true,
        region text
    );
";

fn filtered(filter: &str) -> String {
    format!(
        "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {{first_name: first_name, region: region}}
    where: \"{filter}\"
"
    )
}

const UNFILTERED: &str = "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {first_name: first_name, region: region}
";

/// The publication's filter on employees, as Postgres spells it; None when
/// it has none (or the publication does not hold the table).
async fn rowfilter(w: &World) -> Option<String> {
    w.db.query_opt_string(&format!(
        "SELECT rowfilter FROM pg_publication_tables WHERE pubname = 'pub_{}' AND tablename = 'employees'",
        w.slot
    ))
    .await
}

async fn publication_count(w: &World) -> i64 {
    w.db.query_i64(&format!(
        "SELECT count(*) FROM pg_publication WHERE pubname = 'pub_{}'",
        w.slot
    ))
    .await
}

/// Waits until the connector has acknowledged everything written so far,
/// so the receiver holds all it will ever get for those changes.
async fn wait_caught_up(w: &World) {
    let lsn = w.db.wal_lsn().await;
    w.wait_confirmed(lsn, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_filter_streams_only_matching_rows() {
    let w = world("pub_filter", FULL_SQL).await;
    let conn = Connector::run(&w.config(&filtered("active AND region = 'eu'"), ""), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    assert_eq!(
        rowfilter(&w).await.as_deref(),
        Some("(active AND (region = 'eu'::text))")
    );

    w.db.exec(
        "INSERT INTO employees (email, first_name, region) VALUES ('ann@acme.test', 'Ann', 'eu');
         INSERT INTO employees (email, first_name, region) VALUES ('bob@acme.test', 'Bob', 'us');
         INSERT INTO employees (email, first_name, region, active) VALUES ('cat@acme.test', 'Cat', 'eu', false);
         -- Out of the filter: Postgres sends a delete, which does nothing by default.
         UPDATE employees SET active = false, first_name = 'Annie' WHERE email = 'ann@acme.test';
         -- Into the filter: Postgres sends an insert, the whole row.
         UPDATE employees SET active = true WHERE email = 'cat@acme.test';
         -- Outside before and after: nothing.
         UPDATE employees SET first_name = 'Robert' WHERE email = 'bob@acme.test';
         INSERT INTO employees (email, first_name, region) VALUES ('dan@acme.test', 'Dan', 'eu');",
    )
    .await;
    w.rx.wait_until("three identify entries", Duration::from_secs(60), |r| {
        r.identify_count() >= 3
    })
    .await;
    wait_caught_up(&w).await;
    // Different contacts' requests may go out in parallel: compare in id order.
    let mut sent = w.rx.identifies();
    sent.sort_by_key(|b| b["id"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        sent,
        vec![
            json!({"id": "ann@acme.test", "traits": {"first_name": "Ann", "region": "eu"}}),
            json!({"id": "cat@acme.test", "traits": {"first_name": "Cat", "region": "eu"}}),
            json!({"id": "dan@acme.test", "traits": {"first_name": "Dan", "region": "eu"}}),
        ]
    );
    conn.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_filter_outside_the_replica_identity_is_refused_before_the_publication_changes() {
    let w = world("pub_identity", DEFAULT_SQL).await;
    let config = w.config(&filtered("active"), "");

    // No publication yet: none is created.
    let (status, _, err) = run_cli(&["run", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("tables[0].where: the row filter reads `active` of public.employees, outside its replica identity (DEFAULT, the primary key (id))")
            && errors[0].contains("ALTER TABLE \"public\".\"employees\" REPLICA IDENTITY FULL;")
            && errors[0].contains("or filter only on id"),
        "{err}"
    );
    assert_eq!(
        publication_count(&w).await,
        0,
        "the publication was created"
    );

    // An existing publication keeps its (absent) filter.
    w.db.exec(&format!(
        "CREATE PUBLICATION pub_{} FOR TABLE employees;",
        w.slot
    ))
    .await;
    let xmin_before =
        w.db.query_opt_string(
            "SELECT xmin::text FROM pg_publication_rel WHERE prrelid = 'employees'::regclass",
        )
        .await;
    let (status, _, err) = run_cli(&["run", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("tables[0].where: the row filter reads `active`"),
        "{err}"
    );
    assert_eq!(rowfilter(&w).await, None);
    let xmin_after =
        w.db.query_opt_string(
            "SELECT xmin::text FROM pg_publication_rel WHERE prrelid = 'employees'::regclass",
        )
        .await;
    assert_eq!(
        xmin_before, xmin_after,
        "the publication's table was re-added"
    );
    // The application can still update the table.
    w.db.exec(
        "INSERT INTO employees (email) VALUES ('ann@acme.test');
         UPDATE employees SET active = false;
         DELETE FROM employees;",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_postgres_rejects_are_refused_with_its_reason() {
    let w = world(
        "pub_rejects",
        &format!(
            "{FULL_SQL} CREATE FUNCTION is_eu(text) RETURNS bool IMMUTABLE LANGUAGE sql AS $$ SELECT $1 = 'eu' $$;"
        ),
    )
    .await;
    for (filter, reason) in [
        (
            "random() > 0.5",
            "invalid publication WHERE expression: User-defined or built-in mutable functions are not allowed.",
        ),
        (
            "is_eu(region)",
            "invalid publication WHERE expression: User-defined or built-in mutable functions are not allowed.",
        ),
        ("nope = 1", "column \"nope\" does not exist"),
        ("active AND", "syntax error at or near \")\""),
    ] {
        let (status, _, err) = run_cli(
            &["run", "--config", CONFIG],
            &w.config(&filtered(filter), ""),
            &[],
        );
        assert!(!status.success(), "{filter}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        assert!(
            errors[0].contains(&format!(
                "tables[0].where: Postgres refuses the row filter ({filter}) on public.employees: {reason}"
            )),
            "{filter}: {err}"
        );
        assert_eq!(publication_count(&w).await, 0, "{filter}: publication created");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_publication_is_brought_in_line_with_the_config() {
    let w = world("pub_existing", FULL_SQL).await;
    w.db.exec(&format!(
        "CREATE PUBLICATION pub_{} FOR TABLE employees;",
        w.slot
    ))
    .await;
    let config = w.config(&filtered("region = 'eu'"), "");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    assert_eq!(
        rowfilter(&w).await.as_deref(),
        Some("(region = 'eu'::text)")
    );
    w.db.exec(
        "INSERT INTO employees (email, first_name, region) VALUES ('bob@acme.test', 'Bob', 'us');
         INSERT INTO employees (email, first_name, region) VALUES ('ann@acme.test', 'Ann', 'eu');",
    )
    .await;
    w.rx.wait_until("one identify entry", Duration::from_secs(60), |r| {
        r.identify_count() >= 1
    })
    .await;
    wait_caught_up(&w).await;
    assert_eq!(
        w.rx.identifies(),
        vec![json!({"id": "ann@acme.test", "traits": {"first_name": "Ann", "region": "eu"}})]
    );
    conn.stop().await;

    // A restart with the same filter leaves the catalog alone.
    let xmin = "SELECT xmin::text FROM pg_publication_rel WHERE prrelid = 'employees'::regclass";
    let before = w.db.query_opt_string(xmin).await;
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    assert_eq!(
        w.db.query_opt_string(xmin).await,
        before,
        "needless catalog churn"
    );
    conn.stop().await;

    // Without where:, the filter goes.
    let conn = Connector::run(&w.config(UNFILTERED, ""), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    assert_eq!(rowfilter(&w).await, None);
    conn.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_that_may_not_alter_the_publication_gets_the_statements_to_run() {
    let w = world("pub_not_owner", FULL_SQL).await;
    let role = format!("r_{}", w.db.name());
    w.db.exec(&format!(
        "CREATE ROLE \"{role}\" LOGIN REPLICATION;
         GRANT SELECT ON employees TO \"{role}\";
         GRANT CREATE ON DATABASE \"{db}\" TO \"{role}\";
         CREATE PUBLICATION pub_{slot} FOR TABLE employees WHERE (active);",
        db = w.db.name(),
        slot = w.slot
    ))
    .await;
    let url = w.db.url().replacen("postgres@", &format!("{role}@"), 1);

    // The publication already filters as configured: the role starts.
    let conn = Connector::run(&w.config_with_url(&url, &filtered("active"), ""), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    conn.stop().await;

    // Another filter: refused, with the statements for the owner.
    let (status, _, err) = run_cli(
        &["run", "--config", CONFIG],
        &w.config_with_url(&url, &filtered("NOT active"), ""),
        &[],
    );
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "tables[0].where: publication pub_{slot} filters public.employees by active, not the configured (NOT active), and this role may not alter the publication; as its owner run: BEGIN; ALTER PUBLICATION \"pub_{slot}\" DROP TABLE \"public\".\"employees\"; ALTER PUBLICATION \"pub_{slot}\" ADD TABLE \"public\".\"employees\" WHERE (NOT active); COMMIT;",
            slot = w.slot
        )),
        "{err}"
    );
    assert_eq!(rowfilter(&w).await.as_deref(), Some("active"));
    // Leave no role behind in the shared cluster.
    w.db.exec(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\";"))
        .await;
}

/// A roster whose sales find their rep through a code nobody indexed.
const LOOKUP_SQL: &str = "
    CREATE TABLE employees (
        id serial PRIMARY KEY,
        code text NOT NULL,
        email text NOT NULL,
        tags text[],
        active bool NOT NULL DEFAULT true
    );
    CREATE TABLE sales (
        id serial PRIMARY KEY,
        employee_code text NOT NULL,
        amount numeric
    );
";

const LOOKUP_TABLES: &str = "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {tags: {list: tags}}
  - table: public.sales
    track:
      id: {from: public.employees, key: employee_code, column: email, references: code}
      event: made_sale
      properties: {amount: amount}
";

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_replica_identity_lookups_and_filters_with_fixes() {
    let w = world("pub_check", LOOKUP_SQL).await;
    let (status, out, err) = run_cli(
        &["check", "--config", CONFIG],
        &w.config(LOOKUP_TABLES, ""),
        &[],
    );
    // Warnings alone do not fail check.
    assert!(status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.lines().any(|l| l
            == "WARN replica identity public.employees: is DEFAULT, the primary key (id), not FULL: \
                updates that change no mapped column are sent anyway, because the old row is not known; \
                list trait tags cannot remove values, because the old row is not known; \
                run ALTER TABLE \"public\".\"employees\" REPLICA IDENTITY FULL;"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l
            == "WARN lookup public.sales -> public.employees: tables[1].track.id: \
                public.sales.employee_code -> public.employees.code -> email; \
                no index leads with code, so every lookup the cache misses scans public.employees; \
                run CREATE INDEX ON \"public\".\"employees\" (\"code\");"),
        "{out}"
    );
    assert!(!out.contains("replica identity public.sales"), "{out}");

    // Fixed as told: both lines pass.
    w.db.exec(
        "CREATE INDEX ON employees (code);
         ALTER TABLE employees REPLICA IDENTITY FULL;",
    )
    .await;
    let (status, out, err) = run_cli(
        &["check", "--config", CONFIG],
        &w.config(LOOKUP_TABLES, ""),
        &[],
    );
    assert!(status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.lines().any(|l| l
            == "ok   replica identity public.employees: is FULL: the old row is known, so updates that change no mapped column are skipped"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l
            == "ok   lookup public.sales -> public.employees: tables[1].track.id: \
                public.sales.employee_code -> public.employees.code -> email; an index leads with code"),
        "{out}"
    );
    assert!(!out.contains("WARN"), "{out}");

    // Row filters: one Postgres accepts, one outside the replica identity,
    // one it refuses. Each is judged without creating anything.
    let tables = LOOKUP_TABLES
        .replace(
            "      traits: {tags: {list: tags}}\n",
            "      traits: {tags: {list: tags}}\n    where: active\n",
        )
        .replace(
            "      properties: {amount: amount}\n",
            "      properties: {amount: amount}\n    where: amount > 0\n",
        );
    let (status, out, _) = run_cli(&["check", "--config", CONFIG], &w.config(&tables, ""), &[]);
    assert!(!status.success(), "{out}");
    assert!(
        out.lines().any(|l| l
            == "ok   row filter public.employees: tables[0].where is accepted by Postgres and reads only columns of the replica identity"),
        "{out}"
    );
    // Sales look their rep up in a table streamed only in part.
    assert!(
        out.lines().any(|l| l
            == "WARN lookup public.sales -> public.employees: tables[1].track.id: \
                public.sales.employee_code -> public.employees.code -> email; an index leads with code; \
                tables[0].where keeps changes to public.employees's other rows out of the stream, \
                so a cached email of such a row is not refreshed when it changes"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with(
            "FAIL row filter public.sales: tables[1].where: the row filter reads `amount` of public.sales, outside its replica identity (DEFAULT, the primary key (id))"
        ) && l.contains("ALTER TABLE \"public\".\"sales\" REPLICA IDENTITY FULL;")),
        "{out}"
    );
    let tables = tables.replace("where: amount > 0", "where: random() > 0.5");
    let (status, out, _) = run_cli(&["check", "--config", CONFIG], &w.config(&tables, ""), &[]);
    assert!(!status.success(), "{out}");
    assert!(
        out.lines().any(|l| l
            == "FAIL row filter public.sales: tables[1].where: Postgres refuses the row filter (random() > 0.5): \
                invalid publication WHERE expression: User-defined or built-in mutable functions are not allowed. (SQLSTATE 0A000)"),
        "{out}"
    );
    assert_eq!(
        w.db.query_i64("SELECT count(*) FROM pg_publication").await,
        0,
        "check created a publication"
    );
}

/// An event log without a primary key, like pgbench's `pgbench_history`:
/// the application inserts, and now and then updates or deletes.
const HISTORY_SQL: &str = "
    CREATE TABLE history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22));
";

/// `history` as a track table: insert-only, the default for track.
const HISTORY_TRACKED: &str = "
tables:
  - table: public.history
    track:
      id: aid
      event: balance_changed
      properties: {delta: delta}
";

/// Runs `sql` as the application, returning Postgres's error if it refuses.
async fn app_write(w: &World, sql: &str) -> Result<(), String> {
    w.db.client()
        .await
        .batch_execute(sql)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => e.to_string(),
        })
}

/// `schema.table` names a publication holds, sorted.
async fn held_by(w: &World, publication: &str) -> Option<String> {
    w.db.query_opt_string(&format!(
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = '{publication}'"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_insert_only_table_without_a_primary_key_is_tracked_and_keeps_taking_updates_and_deletes(
) {
    let w = world("pub_keyless", HISTORY_SQL).await;
    let config = w.config(HISTORY_TRACKED, "");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;

    // The application goes on as before, the connector running.
    app_write(
        &w,
        "INSERT INTO history VALUES (1, 1, 7, 5, now(), 'a'), (1, 1, 8, -3, now(), 'b');",
    )
    .await
    .unwrap();
    app_write(&w, "UPDATE history SET delta = delta + 1 WHERE aid = 7;")
        .await
        .unwrap_or_else(|e| panic!("the application's UPDATE was refused: {e}"));
    app_write(&w, "DELETE FROM history WHERE aid = 8;")
        .await
        .unwrap_or_else(|e| panic!("the application's DELETE was refused: {e}"));
    app_write(&w, "INSERT INTO history VALUES (2, 1, 9, 4, now(), 'c');")
        .await
        .unwrap();
    w.rx.wait_until("three track events", Duration::from_secs(60), |r| {
        r.track_count() >= 3
    })
    .await;
    wait_caught_up(&w).await;
    let mut sent: Vec<(String, serde_json::Value)> =
        w.rx.tracks()
            .into_iter()
            .map(|(id, e)| (id, e["properties"].clone()))
            .collect();
    sent.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        sent,
        vec![
            ("7".to_owned(), json!({"delta": 5})),
            ("8".to_owned(), json!({"delta": -3})),
            ("9".to_owned(), json!({"delta": 4})),
        ]
    );
    conn.stop().await;

    // It went through the insert-only publication, not the main one.
    assert_eq!(held_by(&w, &format!("pub_{}", w.slot)).await, None);
    assert_eq!(
        held_by(&w, &format!("pub_{}_inserts", w.slot))
            .await
            .as_deref(),
        Some("history")
    );
    // A restart streams from both again, and the writes still work.
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    app_write(
        &w,
        "INSERT INTO history VALUES (3, 1, 10, 1, now(), 'd'); UPDATE history SET filler = 'x'; DELETE FROM history WHERE aid = 7;",
    )
    .await
    .unwrap_or_else(|e| panic!("the application's writes were refused after a restart: {e}"));
    w.rx.wait_until("a fourth track event", Duration::from_secs(60), |r| {
        r.track_count() >= 4
    })
    .await;
    conn.stop().await;

    let (status, out, err) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert!(status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.lines().any(|l| l
            == format!(
                "ok   replica identity public.history: tables[0] acts on inserts only, so the table goes through the insert-only publication pub_{}_inserts (publish = 'insert'), and Postgres keeps taking the application's UPDATEs and DELETEs on it whatever its replica identity",
                w.slot
            )),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l
            == format!(
                "ok   insert-only publication: pub_{}_inserts holds public.history",
                w.slot
            )),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_a_primary_key_mapped_with_updates_is_refused_before_any_publication_changes(
) {
    let w = world("pub_keyless_updates", HISTORY_SQL).await;
    let fix = "run ALTER TABLE \"public\".\"history\" REPLICA IDENTITY FULL; or add a primary key, or make the mapping insert-only (tables[0].operations: [insert])";
    for tables in [
        HISTORY_TRACKED.replace(
            "properties: {delta: delta}\n",
            "properties: {delta: delta}\n    operations: [insert, update]\n",
        ),
        "
tables:
  - table: public.history
    identify:
      id: aid
      traits: {delta: delta}
"
        .to_owned(),
    ] {
        let config = w.config(&tables, "");
        let (status, out, _) = run_cli(&["check", "--config", CONFIG], &config, &[]);
        assert!(!status.success(), "{out}");
        let line = out
            .lines()
            .find(|l| l.starts_with("FAIL replica identity public.history: "))
            .unwrap_or_else(|| panic!("no FAIL line for history:\n{out}"));
        assert!(line.contains(fix), "{line}");

        let (status, _, err) = run_cli(&["run", "--config", CONFIG], &config, &[]);
        assert!(!status.success(), "{err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        assert!(
            errors[0].contains("tables[0]: the replica identity of public.history is DEFAULT, but the table has no primary key")
                && errors[0].contains(fix)
                && errors[0].contains("No publication was created or changed"),
            "{err}"
        );
        assert_eq!(
            publication_count(&w).await,
            0,
            "the publication was created"
        );
        assert_eq!(
            w.db.query_i64("SELECT count(*) FROM pg_publication").await,
            0,
            "a publication was created"
        );
        app_write(
            &w,
            "INSERT INTO history VALUES (1, 1, 7, 5, now(), 'a'); UPDATE history SET delta = 6; DELETE FROM history;",
        )
        .await
        .unwrap();
    }

    // An existing publication is left as it is, and does not gain the table.
    w.db.exec(&format!("CREATE PUBLICATION pub_{} ;", w.slot))
        .await;
    let config = w.config(
        &HISTORY_TRACKED.replace(
            "properties: {delta: delta}\n",
            "properties: {delta: delta}\n    operations: [insert, delete]\n",
        ),
        "",
    );
    let (status, _, err) = run_cli(&["run", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "{err}");
    assert!(err.contains(fix), "{err}");
    assert_eq!(held_by(&w, &format!("pub_{}", w.slot)).await, None);
    assert_eq!(
        w.db.query_i64("SELECT count(*) FROM pg_publication").await,
        1,
        "the insert-only publication was created"
    );
    app_write(
        &w,
        "INSERT INTO history VALUES (1, 1, 7, 5, now(), 'a'); UPDATE history SET delta = 6; DELETE FROM history;",
    )
    .await
    .unwrap();
}

/// Upgrades: a keyless table an existing publication holds (so the
/// application's UPDATEs already fail) moves to the insert-only
/// publication; when its mapping gains updates (and the table a full
/// replica identity) it moves back.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_moves_between_the_publications_when_its_mapping_changes() {
    let w = world("pub_moves", HISTORY_SQL).await;
    let main = format!("pub_{}", w.slot);
    let inserts = format!("pub_{}_inserts", w.slot);
    w.db.exec(&format!("CREATE PUBLICATION {main} FOR TABLE history;"))
        .await;
    assert!(app_write(
        &w,
        "INSERT INTO history (aid) VALUES (1); DELETE FROM history;"
    )
    .await
    .is_err_and(|e| e.contains("does not have a replica identity")));

    let conn = Connector::run(&w.config(HISTORY_TRACKED, ""), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    assert_eq!(held_by(&w, &main).await, None);
    assert_eq!(held_by(&w, &inserts).await.as_deref(), Some("history"));
    app_write(
        &w,
        "INSERT INTO history (aid, delta) VALUES (2, 1); UPDATE history SET delta = 2; DELETE FROM history WHERE aid = 1;",
    )
    .await
    .unwrap();
    w.rx.wait_until("one track event", Duration::from_secs(60), |r| {
        r.track_count() >= 1
    })
    .await;
    conn.stop().await;

    // Updates tracked too: the table needs its updates published.
    w.db.exec("ALTER TABLE history REPLICA IDENTITY FULL;")
        .await;
    let with_updates = HISTORY_TRACKED.replace(
        "properties: {delta: delta}\n",
        "properties: {delta: delta}\n    operations: [insert, update]\n",
    );
    let conn = Connector::run(&w.config(&with_updates, ""), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    assert_eq!(held_by(&w, &main).await.as_deref(), Some("history"));
    assert_eq!(held_by(&w, &inserts).await, None);
    app_write(&w, "UPDATE history SET delta = 3 WHERE aid = 2;")
        .await
        .unwrap();
    w.rx.wait_until("the update tracked", Duration::from_secs(60), |r| {
        r.track_count() >= 2
    })
    .await;
    conn.stop().await;
}

/// A slot older than the insert-only publication (an upgrade from a
/// version without one, with changes waiting): PostgreSQL before 18 cannot
/// decode the slot's backlog with the publication listed, so the connector
/// streams the backlog without it, and publishes and streams the keyless
/// table once the slot has passed the publication's creation. PostgreSQL
/// 18 decodes with it at once (skipping it where it did not exist yet), so
/// there the table is streamed without reconnecting.
#[tokio::test(flavor = "multi_thread")]
async fn an_insert_only_publication_newer_than_the_slot_is_streamed_once_the_slot_passes_it() {
    let w = world(
        "pub_newer",
        &format!("{HISTORY_SQL} CREATE TABLE employees (id serial PRIMARY KEY, email text);"),
    )
    .await;
    let inserts = format!("pub_{}_inserts", w.slot);
    let employees = "
tables:
  - table: public.employees
    identify: {id: email}
";
    let conn = Connector::run(&w.config(employees, ""), &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    conn.stop().await;
    // As a version without the insert-only publication would have left it,
    // with changes waiting in the slot.
    w.db.exec(&format!("DROP PUBLICATION {inserts};")).await;
    w.db.exec("INSERT INTO employees (email) VALUES ('ann@acme.test');")
        .await;

    let both = format!(
        "{employees}  - table: public.history\n    track:\n      id: aid\n      event: balance_changed\n      properties: {{delta: delta}}\n"
    );
    let conn = Connector::run(&w.config(&both, ""), &[]);
    w.rx.wait_until("the waiting identify", Duration::from_secs(60), |r| {
        r.identify_count() >= 1
    })
    .await;
    // Published once the slot has passed the publication's creation.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while held_by(&w, &inserts).await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "history was never published; connector log:\n{}",
            conn.log()
        );
        w.db.exec("INSERT INTO employees (email) VALUES ('tick@acme.test'); DELETE FROM employees WHERE email = 'tick@acme.test';")
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    w.wait_streaming(Duration::from_secs(60)).await;
    app_write(
        &w,
        "INSERT INTO history (aid, delta) VALUES (5, 1); UPDATE history SET delta = 2; DELETE FROM history;",
    )
    .await
    .unwrap();
    w.rx.wait_until("the history insert", Duration::from_secs(60), |r| {
        r.track_count() >= 1
    })
    .await;
    let reconnected = conn.log().contains("reconnecting to stream it too");
    assert_eq!(
        reconnected,
        crate::support::pg::server_major() < 18,
        "reconnected to stream the publication: {reconnected}\n{}",
        conn.log()
    );
    conn.stop().await;
}

/// A role that does not own the keyless table may not put it in the
/// insert-only publication: `check` and `run` print the statements for an
/// owner, and once an owner ran them the role streams the table.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_that_may_not_publish_the_table_gets_the_statements_to_run() {
    let w = world("pub_inserts_not_owner", HISTORY_SQL).await;
    let role = format!("r_{}", w.db.name());
    w.db.exec(&format!(
        "CREATE ROLE \"{role}\" LOGIN REPLICATION;
         GRANT SELECT ON history TO \"{role}\";
         GRANT CREATE ON DATABASE \"{db}\" TO \"{role}\";",
        db = w.db.name(),
    ))
    .await;
    let url = w.db.url().replacen("postgres@", &format!("{role}@"), 1);
    let config = w.config_with_url(&url, HISTORY_TRACKED, "");
    let statements = format!(
        "ALTER PUBLICATION \"pub_{}_inserts\" ADD TABLE \"public\".\"history\"; COMMIT;",
        w.slot
    );

    let (status, out, _) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("FAIL insert-only publication: ")
            && l.ends_with(&format!(
                "as a table owner run BEGIN; CREATE PUBLICATION \"pub_{}_inserts\" WITH (publish = 'insert'); {statements}",
                w.slot
            ))),
        "{out}"
    );
    let (status, _, err) = run_cli(&["run", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "{err}");
    assert!(err.contains(&format!("run: BEGIN; {statements}")), "{err}");
    assert_eq!(held_by(&w, &format!("pub_{}", w.slot)).await, None);
    app_write(
        &w,
        "INSERT INTO history (aid) VALUES (1); UPDATE history SET delta = 1; DELETE FROM history;",
    )
    .await
    .unwrap();

    // The owner runs them; the role streams the table.
    w.db.exec(&format!("BEGIN; {statements}")).await;
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    app_write(&w, "INSERT INTO history (aid, delta) VALUES (3, 1); UPDATE history SET delta = 2; DELETE FROM history;")
        .await
        .unwrap();
    w.rx.wait_until("the history insert", Duration::from_secs(60), |r| {
        r.track_count() >= 1
    })
    .await;
    let (_, out, _) = run_cli(&["status", "--config", CONFIG], &config, &[]);
    assert!(
        out.lines().any(|l| l
            == format!(
                "publication pub_{}_inserts (inserts only): public.history",
                w.slot
            )),
        "{out}"
    );
    conn.stop().await;
    w.db.exec(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\";"))
        .await;
}

/// The insert-only publication publishes no updates or deletes, so a row
/// filter there may read any column: the application's writes keep
/// working, and only matching inserts are tracked. One Postgres refuses is
/// refused naming `tables[0].where`.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_filter_on_an_insert_only_table_may_read_any_column() {
    let w = world("pub_keyless_filter", HISTORY_SQL).await;
    let bad = w.config(
        &format!("{HISTORY_TRACKED}    where: \"random() > 0.5\"\n"),
        "",
    );
    let (status, _, err) = run_cli(&["run", "--config", CONFIG], &bad, &[]);
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(
            "tables[0].where: Postgres refuses the row filter (random() > 0.5) on public.history"
        ),
        "{err}"
    );
    assert_eq!(
        w.db.query_i64("SELECT count(*) FROM pg_publication").await,
        0,
        "a publication was created"
    );

    let config = w.config(&format!("{HISTORY_TRACKED}    where: \"delta > 0\"\n"), "");
    let (status, out, err) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert!(status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.lines().any(|l| l
            == format!("ok   row filter public.history: tables[0].where is accepted by Postgres; the table goes through the insert-only publication pub_{}_inserts, whose filters may read any column", w.slot)),
        "{out}"
    );
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    app_write(
        &w,
        "INSERT INTO history (aid, delta) VALUES (1, -1), (2, 5);
         UPDATE history SET delta = 7 WHERE aid = 1;
         DELETE FROM history WHERE aid = 2;
         INSERT INTO history (aid, delta) VALUES (3, 1);",
    )
    .await
    .unwrap();
    wait_caught_up(&w).await;
    let mut sent: Vec<String> = w.rx.tracks().into_iter().map(|(id, _)| id).collect();
    sent.sort();
    assert_eq!(sent, vec!["2", "3"]);
    conn.stop().await;
}

/// A partitioned table: Postgres checks each partition's own replica
/// identity when the application updates a row, and `ALTER TABLE …
/// REPLICA IDENTITY FULL` on the parent (the fix run suggests for a
/// keyless table) does not reach the partitions. Publishing the parent
/// would make Postgres refuse the application's UPDATEs and DELETEs on
/// every keyless partition; run refuses the table before any publication
/// exists, naming the partitions and the fixes.
#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_table_is_refused_before_any_publication_changes() {
    let w = world(
        "pub_partitioned",
        "CREATE TABLE staff (email text NOT NULL, region text NOT NULL, first_name text)
             PARTITION BY LIST (region);
         CREATE TABLE staff_eu PARTITION OF staff FOR VALUES IN ('eu');
         CREATE TABLE staff_us PARTITION OF staff FOR VALUES IN ('us');
         ALTER TABLE staff REPLICA IDENTITY FULL;
         INSERT INTO staff VALUES ('ann@acme.test', 'eu', 'Ann');",
    )
    .await;
    let config = w.config(
        "
tables:
  - table: public.staff
    identify:
      id: email
      traits: {first_name: first_name}
",
        "",
    );
    // Run first: the old run created the publication, then failed.
    let (status, _, err) = run_cli(&["run", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "{err}");
    app_write(
        &w,
        "UPDATE staff SET first_name = 'Annie'; DELETE FROM staff;",
    )
    .await
    .unwrap_or_else(|e| panic!("the application's writes were refused: {e}\n{err}"));
    assert_eq!(
        w.db.query_i64("SELECT count(*) FROM pg_publication").await,
        0,
        "a publication was created"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("tables[0]: public.staff is a partitioned table whose partitions public.staff_eu, public.staff_us have no usable replica identity of their own")
            && errors[0].contains("or make the mapping insert-only (tables[0].operations: [insert])")
            && errors[0].contains("No publication was created or changed"),
        "{err}"
    );
    let (status, out, _) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with(
            "FAIL replica identity public.staff: tables[0]: public.staff is a partitioned table"
        )),
        "{out}"
    );
}

/// An `<publication>_inserts` someone made without `WITH (publish =
/// 'insert')` publishes updates and deletes: a keyless table put there
/// would have the application's UPDATEs and DELETEs refused. run refuses,
/// naming the publication and the statement that fixes it, and adds
/// nothing to it.
#[tokio::test(flavor = "multi_thread")]
async fn an_insert_only_publication_that_publishes_updates_is_not_used() {
    let w = world("pub_inserts_updates", HISTORY_SQL).await;
    let inserts = format!("pub_{}_inserts", w.slot);
    w.db.exec(&format!("CREATE PUBLICATION {inserts};")).await;
    let config = w.config(HISTORY_TRACKED, "");
    let (status, _, err) = run_cli(&["run", "--config", CONFIG], &config, &[]);
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "tables[0]: the replica identity of public.history is DEFAULT, but the table has no primary key, and publication {inserts} publishes updates or deletes"
        )) && err.contains(&format!("ALTER PUBLICATION \"{inserts}\" SET (publish = 'insert');")),
        "{err}"
    );
    assert_eq!(held_by(&w, &inserts).await, None);
    app_write(
        &w,
        "INSERT INTO history (aid, delta) VALUES (1, 1); UPDATE history SET delta = 2; DELETE FROM history;",
    )
    .await
    .unwrap_or_else(|e| panic!("the application's writes were refused: {e}"));

    // Fixed as the error says, the table is streamed.
    w.db.exec(&format!(
        "ALTER PUBLICATION {inserts} SET (publish = 'insert');"
    ))
    .await;
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    app_write(
        &w,
        "INSERT INTO history (aid, delta) VALUES (3, 1); UPDATE history SET delta = 2; DELETE FROM history;",
    )
    .await
    .unwrap();
    w.rx.wait_until("the history insert", Duration::from_secs(60), |r| {
        r.track_count() >= 1
    })
    .await;
    conn.stop().await;
}

/// A DEFERRABLE primary key is no replica identity to Postgres (it looks
/// only at immediate ones), so a table whose updates are published needs
/// REPLICA IDENTITY FULL all the same: run refuses before the publication
/// exists instead of breaking the application's UPDATEs and DELETEs.
#[tokio::test(flavor = "multi_thread")]
async fn a_deferrable_primary_key_is_no_replica_identity() {
    let w = world(
        "pub_deferrable",
        "CREATE TABLE employees (
             id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE,
             email text NOT NULL,
             first_name text
         );
         INSERT INTO employees VALUES (1, 'ann@acme.test', 'Ann');",
    )
    .await;
    let config = w.config(
        "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {first_name: first_name}
",
        "",
    );
    let (status, _, err) = run_cli(&["run", "--config", CONFIG], &config, &[]);
    app_write(
        &w,
        "UPDATE employees SET first_name = 'Annie'; DELETE FROM employees WHERE id = 2;",
    )
    .await
    .unwrap_or_else(|e| panic!("the application's writes were refused: {e}\n{err}"));
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("tables[0]: the replica identity of public.employees is DEFAULT, but the primary key is DEFERRABLE")
            && err.contains("ALTER TABLE \"public\".\"employees\" REPLICA IDENTITY FULL;")
            && err.contains("No publication was created or changed"),
        "{err}"
    );
    assert_eq!(
        w.db.query_i64("SELECT count(*) FROM pg_publication").await,
        0,
        "a publication was created"
    );
}

/// A main publication `FOR TABLES IN SCHEMA` publishes a keyless table's
/// updates whatever run does (it cannot be dropped from it alone): run
/// says so, naming the publication and the fixes, and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_keyless_table_the_main_publication_holds_through_its_schema_is_refused() {
    let w = world("pub_schema", HISTORY_SQL).await;
    let main = format!("pub_{}", w.slot);
    w.db.exec(&format!(
        "CREATE PUBLICATION {main} FOR TABLES IN SCHEMA public;"
    ))
    .await;
    let (status, _, err) = run_cli(
        &["run", "--config", CONFIG],
        &w.config(HISTORY_TRACKED, ""),
        &[],
    );
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "tables[0]: the replica identity of public.history is DEFAULT, but the table has no primary key, and publication {main} holds it through FOR TABLES IN SCHEMA \"public\""
        )) && err.contains("No publication was created or changed"),
        "{err}"
    );
    assert_eq!(
        w.db.query_i64("SELECT count(*) FROM pg_publication").await,
        1,
        "a publication was created"
    );
}

/// Employees with a stored generated column.
const GENERATED_SQL: &str = "
    CREATE TABLE employees (
        id serial PRIMARY KEY,
        email text NOT NULL,
        first_name text,
        last_name text,
        full_name text GENERATED ALWAYS AS (first_name || ' ' || last_name) STORED
    );
    INSERT INTO employees (email, first_name, last_name) VALUES ('ada@acme.test', 'Ada', 'Byron');
";

const GENERATED_TABLES: &str = "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {name: full_name}
";

/// A mapped stored generated column: from 18 the connector's publication
/// publishes it (`publish_generated_columns = stored`) and the stream
/// carries it like any column; before 18 pgoutput never sends one, so
/// `check` and `run` refuse the mapping up front, naming table, column and
/// key (rather than stopping at the first change with "dropped or
/// renamed").
#[tokio::test(flavor = "multi_thread")]
async fn a_mapped_stored_generated_column_is_published_on_18_and_refused_before() {
    let w = world("pub_generated", GENERATED_SQL).await;
    let config = w.config(GENERATED_TABLES, "");
    let (ok, out, err) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    if crate::support::pg::server_major() < 18 {
        let refusal = "tables[0].identify.traits.name: column `full_name` of table public.employees is a generated column, which logical replication sends only from PostgreSQL 18 on";
        assert!(!ok.success(), "check must fail:\n{out}\n{err}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("FAIL tables and columns") && l.contains(refusal)),
            "check:\n{out}"
        );
        let conn = Connector::run(&config, &[]);
        let exit = conn.wait(Duration::from_secs(60)).await;
        let log = conn.log();
        assert!(!exit.success() && log.contains(refusal), "run:\n{log}");
        assert_eq!(w.rx.identify_count(), 0, "nothing may have been sent");
        assert_eq!(publication_count(&w).await, 0, "{log}");
        return;
    }
    assert!(
        out.lines().any(|l| l.starts_with("ok   generated columns: public.employees.full_name (tables[0].identify.traits.name): run creates publication")),
        "check:\n{out}\n{err}"
    );
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    assert_eq!(
        w.db.query_opt_string(&format!(
            "SELECT pubgencols::text FROM pg_publication WHERE pubname = 'pub_{}'",
            w.slot
        ))
        .await
        .as_deref(),
        Some("s")
    );
    w.db.exec(
        "INSERT INTO employees (email, first_name, last_name) VALUES ('bob@acme.test', 'Bob', 'Ross');
         UPDATE employees SET last_name = 'Lovelace' WHERE email = 'ada@acme.test';",
    )
    .await;
    w.rx.wait_until("the copy and two changes", Duration::from_secs(60), |r| {
        r.identify_count() >= 3
    })
    .await;
    wait_caught_up(&w).await;
    let name = |id: &str| w.rx.contact(id).map(|c| c["name"].clone());
    assert_eq!(name("ada@acme.test"), Some(json!("Ada Lovelace")));
    assert_eq!(name("bob@acme.test"), Some(json!("Bob Ross")));
    // The first identify of Ada is the copy's (the SELECT reads the value).
    assert_eq!(
        w.rx.identifies()[0],
        json!({"id": "ada@acme.test", "traits": {"name": "Ada Byron"}})
    );
    conn.stop().await;
    let (_, out, _) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert!(
        out.lines().any(|l| l.starts_with("ok   generated columns:")
            && l.contains("publishes stored generated columns")),
        "check:\n{out}"
    );

    // A virtual generated column (18's default) is never published.
    w.db.exec(
        "CREATE TABLE badges (id serial PRIMARY KEY, email text, code text,
                              label text GENERATED ALWAYS AS (upper(code)) VIRTUAL);",
    )
    .await;
    let virtual_config = w.config(
        "
tables:
  - table: public.badges
    identify:
      id: email
      traits: {label: label}
",
        "",
    );
    let (ok, out, _) = run_cli(&["check", "--config", CONFIG], &virtual_config, &[]);
    assert!(
        !ok.success()
            && out.lines().any(|l| l.starts_with("FAIL tables and columns")
                && l.contains("tables[0].identify.traits.label: column `label` of table public.badges is a virtual generated column")),
        "check:\n{out}"
    );
}
