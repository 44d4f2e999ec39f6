//! `preview`: the exact bodies the mapping would send for the rows a
//! database holds, checked byte for byte against a fixture written by
//! hand; `--table` and `--limit`; read-only; and the same bodies the
//! running connector sends for the same rows.

use std::time::Duration;

use serde_json::Value;

use crate::support::connector::{run_cli, Connector, CONFIG_PLACEHOLDER as CONFIG};
use crate::support::setup::{world, World, APPKEY, TOKEN};

/// The fixture schema: employees identified by email (a `text[]` of tags,
/// a date, a padded `char(6)`, a float that needs every digit, NULLs);
/// sales tracked on the employee found through `employee_id`.
const SCHEMA_SQL: &str = "
    CREATE TABLE employees (
        id int PRIMARY KEY,
        email text,
        first_name text,
        team char(6),
        tags text[],
        hired date,
        nickname text,
        rating float8,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE sales (
        id int PRIMARY KEY,
        employee_id int,
        kind text,
        amount numeric,
        customer text,
        sold_at timestamptz
    );
";

/// Employee rows by id. Employee 3 has no email: its identify is rejected,
/// and a sale of theirs finds no contact.
const EMPLOYEES: [(i32, &str); 4] = [
    (1, "1, 'jill@acme.test', 'Jill', 'west', '{closer,\"west coast\"}', '2021-03-15', NULL, 0.1::float8 + 0.2::float8"),
    (2, "2, 'bob@acme.test', 'Bob', 'east', '{}', '2019-11-02', 'Bobby', 4.5"),
    (3, "3, NULL, 'Nemo', NULL, NULL, NULL, NULL, NULL"),
    (4, "4, 'ann@acme.test', 'Ann', 'west', '{mentor,NULL,closer,mentor}', '2023-01-09', 'Annie', NULL"),
];

/// Sales: two made_sale and a refund (event from `kind`), a NULL kind, an
/// employee that does not exist, the employee without email, a NULL
/// foreign key, and a sale with NULL amount (no `$inc` from it).
const SALES_SQL: &str = "
    INSERT INTO sales VALUES
        (1, 1, 'made_sale', 1000.50, 'John Doe', '2024-01-31 12:00:00+02'),
        (2, 2, 'made_sale', 250, 'Acme Corp', '2024-02-01 09:30:00.25+00'),
        (3, 1, 'refund', -99.99, 'John Doe', '2024-02-02 00:00:00-05'),
        (4, 1, NULL, 10, 'Nobody', NULL),
        (5, 99, 'made_sale', 5, 'Ghost', NULL),
        (6, 3, 'made_sale', 7, 'Nemo''s client', NULL),
        (7, NULL, 'made_sale', 1, 'Walk-in', NULL),
        (8, 4, 'made_sale', NULL, NULL, NULL);
";

/// Declared after the rows, as legacy data often is: sale 5 breaks it.
const FOREIGN_KEY_SQL: &str = "ALTER TABLE sales ADD CONSTRAINT sales_employee_id_fkey
    FOREIGN KEY (employee_id) REFERENCES employees (id) NOT VALID;";

const TABLES: &str = "
tables:
  - table: public.employees
    identify:
      id: email
      traits:
        first_name: first_name
        team: team
        tags: {list: tags}
        hired: hired
        nickname: nickname
        rating: rating
        source: {value: roster}
  - table: sales
    track:
      id: {from: public.employees, key: employee_id, column: email}
      event: {column: kind}
      properties:
        amount: amount
        customer: customer
        sold_at: sold_at
        channel: {value: store}
      increment:
        sales_count: 1
        career_sales: amount
";

/// Written by hand from the mapping above, one line per row.
const EXPECTED: &str = include_str!("fixtures/preview_roster.jsonl");

/// A database whose sessions default to other value formats than the
/// stream's, so preview must pin them as the replication session does.
async fn fixture_world(hint: &str, employees: &[i32], sales: bool) -> World {
    let w = world(hint, SCHEMA_SQL).await;
    let rows: Vec<String> = EMPLOYEES
        .iter()
        .filter(|(id, _)| employees.contains(id))
        .map(|(_, row)| format!("({row})"))
        .collect();
    if !rows.is_empty() {
        w.db.exec(&format!(
            "INSERT INTO employees (id, email, first_name, team, tags, hired, nickname, rating) VALUES {};",
            rows.join(", ")
        ))
        .await;
    }
    if sales {
        w.db.exec(SALES_SQL).await;
        w.db.exec(FOREIGN_KEY_SQL).await;
    }
    w.db.exec(&format!(
        "ALTER DATABASE \"{db}\" SET DateStyle = 'SQL, DMY';
         ALTER DATABASE \"{db}\" SET TimeZone = 'Asia/Kolkata';
         ALTER DATABASE \"{db}\" SET extra_float_digits = 0;
         ALTER DATABASE \"{db}\" SET IntervalStyle = 'postgres_verbose';",
        db = w.db.name()
    ))
    .await;
    w
}

fn preview(config: &str, extra: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut args = vec!["preview", "--config", CONFIG];
    args.extend_from_slice(extra);
    run_cli(&args, config, &[])
}

/// The fixture's lines of one table whose key id is in `ids`.
fn expected_lines(table: &str, ids: &[i64]) -> String {
    EXPECTED
        .lines()
        .filter(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["table"] == table && ids.contains(&v["key"]["id"].as_i64().unwrap())
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn preview_prints_exactly_what_the_mapping_would_send_and_writes_nothing() {
    let w = fixture_world("preview_exact", &[1, 2, 3, 4], true).await;
    // Any write preview tried would now fail, and fail the run.
    w.db.exec(&format!(
        "ALTER DATABASE \"{}\" SET default_transaction_read_only = on;",
        w.db.name()
    ))
    .await;

    let (status, out, err) = preview(&w.config(TABLES, ""), &[]);
    assert!(status.success(), "stdout:\n{out}\nstderr:\n{err}");
    if out != EXPECTED {
        for (i, (got, want)) in out.lines().zip(EXPECTED.lines()).enumerate() {
            assert_eq!(got, want, "line {} differs", i + 1);
        }
        panic!("the output differs from the fixture in its line count:\n{out}");
    }
    assert_eq!(
        err.trim_end(),
        "preview: 12 rows read from 2 tables, 11 requests, 5 rejected; nothing was sent"
    );
    for secret in [TOKEN, APPKEY] {
        assert!(!out.contains(secret) && !err.contains(secret));
    }

    // Nothing of the connector's own was created.
    for (what, sql) in [
        (
            "slot",
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
        ),
        ("publication", "SELECT count(*) FROM pg_publication"),
        (
            "connector schema",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'conveyour_cdc'",
        ),
    ] {
        assert_eq!(w.db.query_i64(sql).await, 0, "preview created a {what}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn preview_table_limit_and_row_filter_choose_the_rows_and_bad_input_is_named() {
    let w = fixture_world("preview_args", &[1, 2, 3, 4], true).await;
    let config = w.config(TABLES, "");

    let (status, out, err) = preview(&config, &["--table", "sales", "--limit", "2"]);
    assert!(status.success(), "{err}");
    assert_eq!(out, expected_lines("public.sales", &[1, 2]));
    assert!(
        err.contains("preview: 2 rows read from 1 table, 4 requests, 0 rejected; nothing was sent"),
        "{err}"
    );

    let (status, out, err) = preview(&config, &["--table", "public.employees"]);
    assert!(status.success(), "{err}");
    assert_eq!(out, expected_lines("public.employees", &[1, 2, 3, 4]));

    // Only rows the row filter accepts are streamed, so only those show.
    let filtered = w.config(
        &TABLES.replace(
            "  - table: sales\n",
            "  - table: sales\n    where: \"kind = 'made_sale'\"\n",
        ),
        "",
    );
    let (status, out, err) = preview(&filtered, &["--table", "sales"]);
    assert!(status.success(), "{err}");
    assert_eq!(out, expected_lines("public.sales", &[1, 2, 5, 6, 7, 8]));

    // Without a primary key, rows come in the text order of every column
    // read, and the key is all of them.
    w.db.exec(
        "CREATE TABLE visits (email text, page text);
         INSERT INTO visits VALUES ('b@acme.test', '/home'), ('a@acme.test', NULL), ('a@acme.test', '/pricing');",
    )
    .await;
    let visits = w.config(
        "tables:\n  - table: visits\n    track: {id: email, event: visited, properties: {page: page}}\n",
        "",
    );
    let (status, out, err) = preview(&visits, &[]);
    assert!(status.success(), "{err}");
    let visit = |email: &str, page: &str| {
        format!(
            "{{\"table\":\"public.visits\",\"key\":{{\"email\":\"{email}\",\"page\":{page}}},\"requests\":[{{\"endpoint\":\"/api/analytics/track\",\"body\":{{\"id\":\"{email}\",\"events\":[{{\"event\":\"visited\",\"properties\":{{\"page\":{page}}}}}]}}}}]}}\n"
        )
    };
    assert_eq!(
        out,
        [
            visit("a@acme.test", "\"/pricing\""),
            visit("a@acme.test", "null"),
            visit("b@acme.test", "\"/home\""),
        ]
        .concat()
    );

    // Not a mapped table: a usage error listing the mapped ones.
    let (status, out, err) = preview(&config, &["--table", "public.nope"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("--table: public.nope is not a mapped table; the mapped tables are public.employees, public.sales"),
        "{err}"
    );
    let (status, _, err) = preview(&config, &["--table", "a.b.c"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("`a.b.c` is not a table name"), "{err}");

    // A table only a lookup reads sends nothing for its own rows.
    let sales_only = TABLES.replace(
            "  - table: public.employees\n    identify:\n      id: email\n      traits:\n        first_name: first_name\n        team: team\n        tags: {list: tags}\n        hired: hired\n        nickname: nickname\n        rating: rating\n        source: {value: roster}\n",
        "",
    );
    assert!(!sales_only.contains("identify"));
    let sales_only = w.config(&sales_only, "");
    let (status, _, err) = preview(&sales_only, &["--table", "employees"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "public.employees is not mapped: it is only read by the lookup tables[0].track.id.from"
        ),
        "{err}"
    );
    // ...while the sales of that config preview fine.
    let (status, out, err) = preview(&sales_only, &["--limit", "1"]);
    assert!(status.success(), "{err}");
    assert_eq!(out, expected_lines("public.sales", &[1]));

    let (status, _, err) = preview(&config, &["--limit", "0"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--limit"), "{err}");

    // A mapping that does not fit the table stops preview, naming the key.
    let broken = w.config(&TABLES.replace("customer: customer", "customer: buyer"), "");
    let (status, out, err) = preview(&broken, &[]);
    assert!(!status.success());
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("tables[1].track.properties.customer: column `buyer` does not exist in table public.sales"),
        "{err}"
    );
    // A row filter Postgres refuses names its key.
    let bad_filter = w.config(
        &TABLES.replace(
            "  - table: sales\n",
            "  - table: sales\n    where: \"no_such_column > 1\"\n",
        ),
        "",
    );
    let (status, _, err) = preview(&bad_filter, &["--table", "sales"]);
    assert!(!status.success());
    assert!(
        err.contains("reading public.sales with its row filter tables[1].where")
            && err.contains("no_such_column"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn preview_shows_the_bodies_the_connector_sends_for_the_same_rows() {
    // Employee 3 is left out: the stream stops on a contact id that is
    // NULL (preview flags it); its sale then finds no contact either way.
    let w = fixture_world("preview_stream", &[], false).await;
    let config = w.config(TABLES, "  batch_size: 1\n");
    let conn = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec(&format!(
        "INSERT INTO employees (id, email, first_name, team, tags, hired, nickname, rating) VALUES {};",
        EMPLOYEES
            .iter()
            .filter(|(id, _)| *id != 3)
            .map(|(_, row)| format!("({row})"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .await;
    w.db.exec(SALES_SQL).await;
    let written = w.db.wal_lsn().await;

    let (status, out, err) = preview(&config, &[]);
    assert!(status.success(), "{err}");
    let mut previewed: Vec<String> = Vec::new();
    for line in out.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        for r in v["requests"].as_array().into_iter().flatten() {
            previewed.push(format!("{} {}", r["endpoint"].as_str().unwrap(), r["body"]));
        }
    }
    previewed.sort();
    assert_eq!(previewed.len(), 11, "{out}");

    // Everything acknowledged: nothing more will come.
    w.wait_confirmed(written, Duration::from_secs(60)).await;
    let mut sent: Vec<String> =
        w.rx.requests()
            .iter()
            .filter(|r| r.accepted)
            .map(|r| format!("{} {}", r.endpoint, r.body))
            .collect();
    sent.sort();
    assert_eq!(sent, previewed);
    conn.sigterm();
    assert!(
        conn.wait(Duration::from_secs(60)).await.success(),
        "{}",
        conn.log()
    );
}

#[test]
fn preview_help_documents_the_output_and_the_default_limit() {
    let (status, out, _) = run_cli(&["preview", "--help"], "", &[]);
    assert!(status.success());
    for needle in [
        "Usage: conveyour-cdc preview",
        "JSON Lines",
        "READ ONLY",
        "--table <TABLE>",
        "[default: 10]",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
}
