//! The mapping language end to end: the real binary, a real Postgres
//! and the strict receiver, asserting the exact JSON ConveYour receives
//! for contact ids through foreign keys, list traits, `$inc` counters,
//! skipped no-op updates, shaping options, load-time errors and schema
//! changes while streaming, and values of extension and optional types.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::connector::{run_cli, Connector, CONFIG_PLACEHOLDER as CONFIG};
use crate::support::setup::{world, World};

const WAIT: Duration = Duration::from_secs(60);

/// Starts the connector on `tables` and waits until it streams.
async fn start(w: &World, tables: &str) -> Connector {
    let conn = Connector::run(&w.config(tables, ""), &[]);
    w.wait_streaming(WAIT).await;
    conn
}

/// SIGTERM, and a clean exit.
/// Waits until everything written so far is confirmed, i.e. acknowledged
/// or known to send nothing.
async fn settle(w: &World) {
    let end = w.db.wal_lsn().await;
    w.wait_confirmed(end, WAIT).await;
}

/// Every accepted request as a flat sequence in arrival order: identify
/// entries as `{"identify": entry}`, track events as
/// `{"track": {"id": .., "event": ..}}`.
fn sequence(w: &World) -> Vec<Value> {
    let mut out = Vec::new();
    for r in w.rx.requests().into_iter().filter(|r| r.accepted) {
        if r.endpoint.ends_with("/identify") {
            let entries = match r.body {
                Value::Array(items) => items,
                one => vec![one],
            };
            out.extend(entries.into_iter().map(|e| json!({ "identify": e })));
        } else {
            for e in r.body["events"].as_array().cloned().unwrap_or_default() {
                out.push(json!({"track": {"id": r.body["id"].clone(), "event": e}}));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------
// 1. Contact ids through a foreign key.
// ---------------------------------------------------------------------

const LOOKUP_SQL: &str = "
    CREATE TABLE employees (id int PRIMARY KEY, email text, first_name text);
    -- No foreign key constraint: a sale may name an employee that is not there.
    CREATE TABLE sales (id serial PRIMARY KEY, employee_id int, amount numeric);
";

const LOOKUP_TABLES: &str = "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {first_name: first_name}
  - table: public.sales
    track:
      id: {from: public.employees, key: employee_id, column: email}
      event: made_sale
      properties: {amount: amount}
";

fn sale(email: &str, amount: Value) -> (String, Value) {
    (
        email.to_owned(),
        json!({"event": "made_sale", "properties": {"amount": amount}}),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sale_is_tracked_on_its_reps_email_found_through_the_foreign_key() {
    let w = world("lookup", LOOKUP_SQL).await;
    // Before the slot exists: the connector never sees this row, so the
    // first sale for it can only be resolved by querying the table.
    w.db.exec("INSERT INTO employees VALUES (1, 'before@x.test', 'Bea');")
        .await;
    let conn = start(&w, LOOKUP_TABLES).await;
    w.db.exec(
        "INSERT INTO sales (employee_id, amount) VALUES (1, 10);
         INSERT INTO sales (employee_id, amount) VALUES (NULL, 11);
         INSERT INTO sales (employee_id, amount) VALUES (999, 12);
         INSERT INTO sales (employee_id, amount) VALUES (1, 13);",
    )
    .await;
    settle(&w).await;
    // The NULL and unknown employees are skipped; the stream goes on.
    assert_eq!(
        w.rx.tracks(),
        vec![
            sale("before@x.test", json!(10)),
            sale("before@x.test", json!(13))
        ]
    );
    let log = conn.log();
    assert!(
        log.contains("row not sent") && log.contains("the foreign key is NULL"),
        "{log}"
    );
    assert!(
        log.contains("no row of public.employees has id = 999"),
        "{log}"
    );
    assert!(conn.is_running());
    conn.stop().await;

    // While the connector is down: an employee and their sale in one
    // transaction, then the employee's email changes and they sell again.
    // A query made now would answer the new email for both sales; the
    // first must come from the cache the stream filled as of its commit.
    w.db.exec(
        "BEGIN;
         INSERT INTO employees VALUES (2, 'new@x.test', 'Nia');
         INSERT INTO sales (employee_id, amount) VALUES (2, 20);
         COMMIT;
         UPDATE employees SET email = 'renamed@x.test' WHERE id = 2;
         INSERT INTO sales (employee_id, amount) VALUES (2, 21);",
    )
    .await;
    let conn = start(&w, LOOKUP_TABLES).await;
    settle(&w).await;
    let mut later = w.rx.tracks().split_off(2);
    later.sort_by_key(|(_, e)| e["properties"]["amount"].to_string());
    assert_eq!(
        later,
        vec![
            sale("new@x.test", json!(20)),
            sale("renamed@x.test", json!(21))
        ]
    );
    // The employee that predates the connector was identified by the
    // first run's initial sync, before any sale streamed.
    assert_eq!(
        w.rx.identifies(),
        vec![
            json!({"id": "before@x.test", "traits": {"first_name": "Bea"}}),
            json!({"id": "new@x.test", "traits": {"first_name": "Nia"}}),
            json!({"id": "renamed@x.test", "traits": {"first_name": "Nia"}}),
        ]
    );
    let track =
        w.rx.requests()
            .into_iter()
            .find(|r| r.endpoint.ends_with("/track") && r.body["id"] == "new@x.test")
            .expect("the track request for sale 20");
    assert_eq!(
        track.body,
        json!({"id": "new@x.test", "events": [{"event": "made_sale", "properties": {"amount": 20}}]})
    );
    // Every sale's contact was identified before it.
    assert!(
        w.rx.orphan_tracks().is_empty(),
        "{:?}",
        w.rx.orphan_tracks()
    );
    conn.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sale_carries_the_email_its_rep_had_at_commit_while_the_email_keeps_changing() {
    let w = world("lookup_race", LOOKUP_SQL).await;
    let conn = start(&w, LOOKUP_TABLES).await;
    w.db.exec(
        "INSERT INTO employees VALUES (1, 'rep-0@x.test', 'Rep'), (2, 'steady@x.test', 'Sid');",
    )
    .await;

    // A writer alternates changing rep 1's email and recording sales for
    // them while the connector streams: separate transactions, the change
    // then the sale in one transaction, and the sale then the change.
    const ROUNDS: i64 = 60;
    let url = w.db.url();
    let writer = tokio::spawn(async move {
        let client = crate::support::pg::connect(&url).await.unwrap();
        let mut expected: BTreeMap<i64, String> = BTreeMap::new();
        let mut email = "rep-0@x.test".to_owned();
        for k in 1..=ROUNDS {
            let next = format!("rep-{k}@x.test");
            let change = format!("UPDATE employees SET email = '{next}' WHERE id = 1;");
            let sale = format!("INSERT INTO sales (employee_id, amount) VALUES (1, {k});");
            let sql = match k % 3 {
                0 => format!("{change} {sale}"),
                1 => format!("BEGIN; {change} {sale} COMMIT;"),
                _ => format!("BEGIN; {sale} {change} COMMIT;"),
            };
            if k % 3 == 2 {
                expected.insert(k, email.clone());
            } else {
                expected.insert(k, next.clone());
            }
            email = next;
            client
                .batch_execute(&format!(
                    "{sql} INSERT INTO sales (employee_id, amount) VALUES (2, {});",
                    1000 + k
                ))
                .await
                .unwrap();
            expected.insert(1000 + k, "steady@x.test".to_owned());
        }
        expected
    });
    let expected = writer.await.unwrap();
    w.rx.wait_until("every sale", WAIT, |r| r.track_count() >= expected.len())
        .await;
    settle(&w).await;

    let got: BTreeMap<i64, String> =
        w.rx.tracks()
            .into_iter()
            .map(|(id, e)| (e["properties"]["amount"].as_i64().unwrap(), id))
            .collect();
    assert_eq!(w.rx.track_count(), expected.len(), "a sale arrived twice");
    for (amount, email) in &expected {
        assert_eq!(
            got.get(amount),
            Some(email),
            "sale {amount} was tracked on the wrong contact"
        );
    }
    assert!(
        w.rx.orphan_tracks().is_empty(),
        "tracks on contacts never identified: {:?}",
        w.rx.orphan_tracks()
    );
    assert_eq!(
        w.rx.contact(&format!("rep-{ROUNDS}@x.test")),
        Some(json!({"first_name": "Rep"}).as_object().unwrap().clone())
    );
    conn.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lookup_into_an_identify_table_must_read_its_identify_id() {
    let w = world("lookup_rule", LOOKUP_SQL).await;
    let tables = LOOKUP_TABLES.replace("column: email}", "column: first_name}");
    let (status, out, err) = run_cli(
        &["check", "--config", CONFIG, "--config-only"],
        &w.config(&tables, ""),
        &[],
    );
    assert_eq!(status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("tables[1].track.id.column")
            && err.contains("`first_name`")
            && err.contains("public.employees")
            && err.contains("tables[0].identify.id is `email`"),
        "{err}"
    );
}

// ---------------------------------------------------------------------
// 2. List traits.
// ---------------------------------------------------------------------

const LIST_SQL: &str = "
    CREATE TABLE employees (
        id serial PRIMARY KEY, email text NOT NULL, first_name text,
        tags text[], skills text, updated_at timestamptz
    );
    ALTER TABLE employees REPLICA IDENTITY FULL;
";

const LIST_TABLES: &str = "
tables:
  - table: public.employees
    identify:
      id: email
      traits:
        first_name: first_name
        tags: {list: tags}
        skills: {list: skills, delimiter: \",\"}
";

#[tokio::test(flavor = "multi_thread")]
async fn list_traits_send_what_was_added_and_removed() {
    let w = world("lists", LIST_SQL).await;
    let conn = start(&w, LIST_TABLES).await;
    w.db.exec(
        "INSERT INTO employees (email, first_name, tags, skills) VALUES ('l@x.test', 'Lee', '{a,b}', 'rust, go');
         UPDATE employees SET tags = '{a,b,c}';
         UPDATE employees SET tags = '{a,c}';
         UPDATE employees SET tags = '{c,d}', skills = 'go,python';
         UPDATE employees SET first_name = 'Lou';
         UPDATE employees SET updated_at = now();",
    )
    .await;
    settle(&w).await;
    let id = "l@x.test";
    let mut expected = vec![
        json!({"id": id, "traits": {"first_name": "Lee", "tags": {"add": ["a", "b"]}, "skills": {"add": ["rust", "go"]}}}),
        json!({"id": id, "traits": {"first_name": "Lee", "tags": {"add": ["c"]}}}),
        json!({"id": id, "traits": {"first_name": "Lee", "tags": {"remove": ["b"]}}}),
        json!({"id": id, "traits": {"first_name": "Lee", "tags": {"add": ["d"], "remove": ["a"]}, "skills": {"add": ["python"], "remove": ["rust"]}}}),
        json!({"id": id, "traits": {"first_name": "Lou"}}),
    ];
    assert_eq!(w.rx.identifies(), expected);

    // Without the old row, an update can only add what the row holds now.
    w.db.exec(
        "ALTER TABLE employees REPLICA IDENTITY DEFAULT;
         UPDATE employees SET tags = '{c,d,e}';",
    )
    .await;
    settle(&w).await;
    expected.push(json!({"id": id, "traits": {"first_name": "Lou", "tags": {"add": ["c", "d", "e"]}, "skills": {"add": ["go", "python"]}}}));
    assert_eq!(w.rx.identifies(), expected);
    assert_eq!(
        w.rx.contact(id).unwrap(),
        *json!({"first_name": "Lou", "tags": ["c", "d", "e"], "skills": ["go", "python"]})
            .as_object()
            .unwrap()
    );
    conn.stop().await;
}

// ---------------------------------------------------------------------
// 3. $inc counters.
// ---------------------------------------------------------------------

const COUNTER_SQL: &str = "
    CREATE TABLE employees (id serial PRIMARY KEY, email text NOT NULL, first_name text);
    CREATE TABLE sales (id serial PRIMARY KEY, employee_email text NOT NULL, amount numeric);
";

const COUNTER_TABLES: &str = "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {first_name: first_name}
  - table: public.sales
    track:
      id: employee_email
      event: made_sale
      properties: {amount: amount}
      increment: {sales_count: 1, career_sales: amount}
";

#[tokio::test(flavor = "multi_thread")]
async fn a_sale_bumps_its_reps_counters_before_the_event() {
    let w = world("inc", COUNTER_SQL).await;
    let conn = start(&w, COUNTER_TABLES).await;
    w.db.exec(
        "INSERT INTO employees (email, first_name) VALUES ('j@x.test', 'Jo');
         INSERT INTO sales (employee_email, amount) VALUES ('j@x.test', 1000);
         INSERT INTO sales (employee_email, amount) VALUES ('j@x.test', 250.5);
         INSERT INTO sales (employee_email, amount) VALUES ('j@x.test', NULL);
         UPDATE sales SET amount = 1 WHERE amount = 1000;",
    )
    .await;
    settle(&w).await;
    let inc = |amount: Option<Value>| {
        let mut traits = json!({"sales_count": {"$inc": 1}});
        if let Some(a) = amount {
            traits["career_sales"] = json!({ "$inc": a });
        }
        json!({"identify": {"id": "j@x.test", "traits": traits}})
    };
    let track = |amount: Value| json!({"track": {"id": "j@x.test", "event": {"event": "made_sale", "properties": {"amount": amount}}}});
    let expected = vec![
        json!({"identify": {"id": "j@x.test", "traits": {"first_name": "Jo"}}}),
        inc(Some(json!(1000))),
        track(json!(1000)),
        inc(Some(json!(250.5))),
        track(json!(250.5)),
        // A NULL amount adds nothing to career_sales, but it is a sale.
        inc(None),
        track(Value::Null),
    ];
    assert_eq!(sequence(&w), expected);
    // In the request itself (maybe batched with other entries), the counter
    // entry is exactly this.
    let first =
        w.rx.requests()
            .into_iter()
            .find(|r| r.endpoint.ends_with("/identify") && r.body.to_string().contains("$inc"))
            .unwrap();
    let entries = match &first.body {
        Value::Array(items) => items.clone(),
        one => vec![one.clone()],
    };
    assert!(
        entries.contains(&json!({"id": "j@x.test", "traits": {"career_sales": {"$inc": 1000}, "sales_count": {"$inc": 1}}})),
        "{}",
        first.body
    );
    assert_eq!(
        w.rx.contact("j@x.test").unwrap(),
        *json!({"first_name": "Jo", "sales_count": 3, "career_sales": 1250.5})
            .as_object()
            .unwrap()
    );
    assert!(w.rx.orphan_tracks().is_empty());
    conn.stop().await;
}

// ---------------------------------------------------------------------
// 4. Skipped no-op updates.
// ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn touching_only_updated_at_sends_nothing_when_the_old_row_is_known() {
    let w = world("noop_updated_at", LIST_SQL).await;
    let tables = "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {first_name: first_name}
";
    let conn = start(&w, tables).await;
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('u@x.test', 'Uma');")
        .await;
    settle(&w).await;
    assert_eq!(w.rx.request_count(), 1);

    w.db.exec("UPDATE employees SET updated_at = now();").await;
    settle(&w).await;
    // A real change after it: if the no-op had been sent, it would arrive
    // before this one.
    w.db.exec("UPDATE employees SET first_name = 'Una';").await;
    w.rx.wait_until("the real change", WAIT, |r| r.identify_count() >= 2)
        .await;
    settle(&w).await;
    assert_eq!(w.rx.request_count(), 2, "{}", w.rx.summary());
    assert_eq!(
        w.rx.identifies(),
        vec![
            json!({"id": "u@x.test", "traits": {"first_name": "Uma"}}),
            json!({"id": "u@x.test", "traits": {"first_name": "Una"}}),
        ]
    );

    // Without the old row the connector cannot tell, and sends it.
    w.db.exec(
        "ALTER TABLE employees REPLICA IDENTITY DEFAULT;
         UPDATE employees SET updated_at = now();",
    )
    .await;
    w.rx.wait_until("the update without an old row", WAIT, |r| {
        r.identify_count() >= 3
    })
    .await;
    assert_eq!(
        w.rx.identifies()[2],
        json!({"id": "u@x.test", "traits": {"first_name": "Una"}})
    );
    conn.stop().await;
}

// ---------------------------------------------------------------------
// 5. Shaping.
// ---------------------------------------------------------------------

const SHAPING_SQL: &str = "
    CREATE TABLE employees (
        id serial PRIMARY KEY, email text NOT NULL, first_name text, last_name text,
        hired_on date, updated_at timestamptz
    );
    CREATE TABLE sales (
        id serial PRIMARY KEY, employee_email text NOT NULL, kind text,
        amount numeric, customer text, sold_at timestamp
    );
    CREATE TABLE promotions (id serial PRIMARY KEY, employee_email text NOT NULL, title text);
";

const SHAPING_TABLES: &str = "
tables:
  - table: public.employees
    identify:
      id: email
      traits:
        first_name: first_name
        last_name: last_name
        source: {value: payroll}
        hired_on: hired_on
        hired_ms: {column: hired_on, format: unix_ms}
        updated: updated_at
    nulls: omit
    date_format: unix
    timestamp_format: \"%Y-%m-%d\"
  - table: public.sales
    track:
      id: employee_email
      event: {column: kind}
      properties: {amount: amount, customer: customer, channel: {value: web}, sold_at: sold_at}
    operations: [insert]
  - table: public.promotions
    track:
      id: employee_email
      event: promoted
      properties: {title: title, level: {value: 2}}
    operations: [update]
";

#[tokio::test(flavor = "multi_thread")]
async fn constants_event_columns_operations_nulls_and_formats_shape_the_bodies() {
    let w = world("shaping", SHAPING_SQL).await;
    let conn = start(&w, SHAPING_TABLES).await;
    w.db.exec(
        "INSERT INTO employees (email, first_name, last_name, hired_on, updated_at)
              VALUES ('s@x.test', 'Sam', NULL, '2024-01-31', '2024-02-03 23:30:00-05');
         UPDATE employees SET last_name = 'Stone';
         INSERT INTO sales (employee_email, kind, amount, customer, sold_at)
              VALUES ('s@x.test', 'refund', 5, NULL, '2024-03-01 08:00:00');
         UPDATE sales SET amount = 6;
         INSERT INTO sales (employee_email, kind, amount) VALUES ('s@x.test', NULL, 8);
         INSERT INTO sales (employee_email, kind, amount, customer) VALUES ('s@x.test', 'sale', 7, 'Ann');
         INSERT INTO promotions (employee_email, title) VALUES ('s@x.test', 'Lead');
         UPDATE promotions SET title = 'Senior Lead';",
    )
    .await;
    settle(&w).await;
    let traits = json!({
        "first_name": "Sam", "source": "payroll",
        "hired_on": 1706659200, "hired_ms": 1706659200000i64,
        // 23:30 at -05:00 is the next day in UTC.
        "updated": "2024-02-04"
    });
    let mut updated = traits.clone();
    updated["last_name"] = json!("Stone");
    assert_eq!(
        w.rx.identifies(),
        vec![
            json!({"id": "s@x.test", "traits": traits}),
            json!({"id": "s@x.test", "traits": updated}),
        ]
    );
    assert_eq!(
        w.rx.tracks(),
        vec![
            (
                "s@x.test".to_owned(),
                json!({"event": "refund", "properties": {"amount": 5, "customer": null, "channel": "web", "sold_at": "2024-03-01T08:00:00"}})
            ),
            (
                "s@x.test".to_owned(),
                json!({"event": "sale", "properties": {"amount": 7, "customer": "Ann", "channel": "web", "sold_at": null}})
            ),
            (
                "s@x.test".to_owned(),
                json!({"event": "promoted", "properties": {"title": "Senior Lead", "level": 2}})
            ),
        ]
    );
    let log = conn.log();
    assert!(
        log.contains("row not sent") && log.contains("the event name is NULL or empty"),
        "{log}"
    );
    conn.stop().await;
}

const DELETE_SQL: &str = "
    CREATE TABLE employees (id int PRIMARY KEY, email text NOT NULL, first_name text);
    CREATE TABLE members (email text PRIMARY KEY, name text, plan text);
    CREATE TABLE contractors (id int PRIMARY KEY, email text NOT NULL, name text);
    ALTER TABLE employees REPLICA IDENTITY FULL;
    ALTER TABLE members REPLICA IDENTITY FULL;
    ALTER TABLE contractors REPLICA IDENTITY FULL;
";

const DELETE_TABLES: &str = "
tables:
  - table: public.employees
    identify: {id: email, traits: {first_name: first_name}}
    on_delete: {identify: {active: false}}
  - table: public.members
    identify: {id: email, traits: {name: name}}
    on_delete:
      track: {event: employee_left, properties: {name: name, plan: plan, reason: {value: resigned}}}
  - table: public.contractors
    identify: {id: email, traits: {name: name}}
    operations: [insert, delete]
    on_delete:
      track: {event: contract_ended, properties: {name: name}}
";

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_sends_what_on_delete_says_when_its_contact_is_known() {
    let w = world("deletes", DELETE_SQL).await;
    let conn = start(&w, DELETE_TABLES).await;
    w.db.exec(
        "INSERT INTO employees VALUES (1, 'e1@x.test', 'E1'), (2, 'e2@x.test', 'E2');
         INSERT INTO members VALUES ('m1@x.test', 'M1', 'gold'), ('m2@x.test', 'M2', 'silver');
         INSERT INTO contractors VALUES (1, 'c1@x.test', 'C1'), (2, 'c2@x.test', 'C2');
         UPDATE contractors SET name = 'C1b' WHERE id = 1;
         DELETE FROM employees WHERE id = 1;
         DELETE FROM members WHERE email = 'm1@x.test';
         DELETE FROM contractors WHERE id = 1;",
    )
    .await;
    settle(&w).await;
    let inserts = vec![
        json!({"id": "e1@x.test", "traits": {"first_name": "E1"}}),
        json!({"id": "e2@x.test", "traits": {"first_name": "E2"}}),
        json!({"id": "m1@x.test", "traits": {"name": "M1"}}),
        json!({"id": "m2@x.test", "traits": {"name": "M2"}}),
        json!({"id": "c1@x.test", "traits": {"name": "C1"}}),
        json!({"id": "c2@x.test", "traits": {"name": "C2"}}),
    ];
    let by_id = |entries: Vec<Value>| {
        let mut e = entries;
        e.sort_by_key(|v| v.to_string());
        e
    };
    let mut expected = inserts.clone();
    expected.push(json!({"id": "e1@x.test", "traits": {"active": false}}));
    assert_eq!(by_id(w.rx.identifies()), by_id(expected.clone()));
    let mut tracks = w.rx.tracks();
    tracks.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        tracks,
        vec![
            (
                "c1@x.test".to_owned(),
                json!({"event": "contract_ended", "properties": {"name": "C1b"}})
            ),
            (
                "m1@x.test".to_owned(),
                json!({"event": "employee_left", "properties": {"name": "M1", "plan": "gold", "reason": "resigned"}})
            ),
        ]
    );

    // Without the full old row: a delete carries only the primary key.
    // members' contact id is its key, so its event goes out with what is
    // known (the constant); the others have no contact id and are skipped.
    w.db.exec(
        "ALTER TABLE employees REPLICA IDENTITY DEFAULT;
         ALTER TABLE members REPLICA IDENTITY DEFAULT;
         ALTER TABLE contractors REPLICA IDENTITY DEFAULT;
         DELETE FROM employees WHERE id = 2;
         DELETE FROM members WHERE email = 'm2@x.test';
         DELETE FROM contractors WHERE id = 2;
         INSERT INTO employees VALUES (3, 'e3@x.test', 'E3');",
    )
    .await;
    w.rx.wait_until("the insert after the deletes", WAIT, |r| {
        r.contact("e3@x.test").is_some()
    })
    .await;
    settle(&w).await;
    expected.push(json!({"id": "e3@x.test", "traits": {"first_name": "E3"}}));
    assert_eq!(by_id(w.rx.identifies()), by_id(expected));
    let mut tracks = w.rx.tracks();
    tracks.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(tracks.len(), 3, "{tracks:?}");
    assert_eq!(
        tracks[2],
        (
            "m2@x.test".to_owned(),
            json!({"event": "employee_left", "properties": {"reason": "resigned"}})
        )
    );
    let log = conn.log();
    for table in ["public.employees", "public.contractors"] {
        assert!(
            log.lines().any(|l| l.contains("row not sent")
                && l.contains(table)
                && l.contains("REPLICA IDENTITY FULL")),
            "no warning for the skipped delete in {table}:\n{log}"
        );
    }
    assert!(w.rx.orphan_tracks().is_empty());
    conn.stop().await;
}

// ---------------------------------------------------------------------
// 6. Load-time errors.
// ---------------------------------------------------------------------

const ERRORS_SQL: &str = "
    CREATE TABLE employees (
        id serial PRIMARY KEY, email text NOT NULL, first_name text,
        photo bytea, tags text[]
    );
    CREATE TABLE sales (
        id serial PRIMARY KEY, employee_email text NOT NULL, amount numeric, customer text
    );
";

/// A config whose employees traits are `traits` and whose sales track
/// mapping ends with `sales_extra` (lines indented under `track:`).
fn errors_tables(traits: &str, sales_extra: &str) -> String {
    format!(
        "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {traits}
  - table: public.sales
    track:
      id: employee_email
      event: made_sale
      properties: {{amount: amount}}
{sales_extra}"
    )
}

/// Runs `check --config-only` and expects it to fail naming every needle.
fn config_only_fails(w: &World, tables: &str, needles: &[&str]) {
    let (status, out, err) = run_cli(
        &["check", "--config", CONFIG, "--config-only"],
        &w.config(tables, ""),
        &[],
    );
    assert_eq!(status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in:\n{err}");
    }
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mistakes_plain_from_the_config_fail_before_connecting() {
    let w = world("errors_config", ERRORS_SQL).await;
    // 14 columns and 2 constants: 16 properties.
    let mut props: Vec<String> = (1..=14).map(|i| format!("p{i}: amount")).collect();
    props.push("c1: {value: 1}".into());
    props.push("c2: {value: two}".into());
    let sixteen = errors_tables("{first_name: first_name}", "").replace(
        "properties: {amount: amount}",
        &format!("properties: {{{}}}", props.join(", ")),
    );
    config_only_fails(
        &w,
        &sixteen,
        &[
            "tables[1].track.properties",
            "public.sales",
            "16 properties (constants included)",
        ],
    );
    // Fifteen is fine.
    let fifteen = sixteen.replace(", c2: {value: two}", "");
    let (status, out, err) = run_cli(
        &["check", "--config", CONFIG, "--config-only"],
        &w.config(&fifteen, ""),
        &[],
    );
    assert!(status.success(), "{out}\n{err}");

    let no_delete = format!(
        "{}\n    operations: [insert, update]\n    on_delete: {{identify: {{active: false}}}}\n",
        errors_tables("{first_name: first_name}", "")
    );
    config_only_fails(
        &w,
        &no_delete,
        &[
            "tables[1].on_delete",
            "public.sales",
            "add delete to operations",
        ],
    );

    let both = errors_tables("{first_name: {column: first_name, value: Bob}}", "");
    config_only_fails(
        &w,
        &both,
        &[
            "tables[0].identify.traits.first_name",
            "public.employees",
            "first_name",
            "exactly one of column, list or value",
        ],
    );
}

/// `check` reports `message` as the failed tables check, and `run` exits
/// non-zero with it, sending nothing.
fn catalog_fails(w: &World, tables: &str, message: &str) {
    let config = w.config(tables, "");
    let (status, out, err) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert_eq!(status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains(&format!("FAIL tables and columns: {message}")),
        "{message:?} not in:\n{out}"
    );
    let (status, out, err) = run_cli(&["run", "--config", CONFIG], &config, &[]);
    assert_eq!(status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains(message), "{message:?} not in:\n{err}");
    // check's GET of conveyour.url is all that may arrive.
    let posts =
        w.rx.requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count();
    assert_eq!(posts, 0, "{}", w.rx.summary());
}

#[tokio::test(flavor = "multi_thread")]
async fn columns_that_are_missing_or_cannot_serve_their_use_fail_at_load() {
    let w = world("errors_catalog", ERRORS_SQL).await;
    catalog_fails(
        &w,
        &errors_tables("{first_name: first_name, nickname: nick_name}", ""),
        "tables[0].identify.traits.nickname: column `nick_name` does not exist in table public.employees",
    );
    catalog_fails(
        &w,
        &errors_tables("{first_name: first_name, photo: photo}", ""),
        "tables[0].identify.traits.photo: column `photo` of table public.employees is of type bytea",
    );
    catalog_fails(
        &w,
        &errors_tables("{names: {list: first_name}}", ""),
        "tables[0].identify.traits.names: column `first_name` of table public.employees is of type text: a list trait needs an array column",
    );
    catalog_fails(
        &w,
        &errors_tables(
            "{first_name: first_name}",
            "      increment: {career_sales: customer}\n",
        ),
        "tables[1].track.increment.career_sales: column `customer` of table public.sales is of type text: a $inc amount needs a numeric column",
    );
    // The same mapping with a list on the array column and $inc from the
    // numeric one passes.
    let good = errors_tables(
        "{first_name: first_name, tags: {list: tags}}",
        "      increment: {career_sales: amount}\n",
    );
    let (status, out, err) = run_cli(&["check", "--config", CONFIG], &w.config(&good, ""), &[]);
    assert!(
        out.contains("ok   tables and columns"),
        "{status:?}\n{out}\n{err}"
    );
}

// ---------------------------------------------------------------------
// 7. Schema changes while streaming.
// ---------------------------------------------------------------------

const ROSTER_SQL: &str = "
    CREATE TABLE employees (
        id serial PRIMARY KEY, email text NOT NULL, first_name text, last_name text
    );
";

const ROSTER_TABLES: &str = "
tables:
  - table: public.employees
    identify:
      id: email
      traits: {first_name: first_name, last_name: last_name}
";

/// Streams one row, applies `ddl`, inserts `row` and expects the connector
/// to stop naming `column`, without sending the row or confirming past it.
async fn a_change_to_a_mapped_column_stops(hint: &str, ddl: &str, row: &str, column: &str) {
    let w = world(hint, ROSTER_SQL).await;
    let conn = start(&w, ROSTER_TABLES).await;
    w.db.exec(
        "INSERT INTO employees (email, first_name, last_name) VALUES ('a@x.test', 'Al', 'Ames');",
    )
    .await;
    settle(&w).await;
    assert_eq!(w.rx.identify_count(), 1);

    w.db.exec(ddl).await;
    w.db.exec(row).await;
    let end = w.db.wal_lsn().await;
    let status = conn.wait(WAIT).await;
    assert!(!status.success(), "the connector kept running");
    let log = conn.log();
    let line = log
        .lines()
        .find(|l| l.contains("error:"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(
        line.contains("table public.employees")
            && line.contains(&format!("column {column}"))
            && line.contains("at LSN ")
            && line.contains("tables[0].identify.traits."),
        "{line}"
    );
    assert_eq!(
        w.rx.identifies(),
        vec![json!({"id": "a@x.test", "traits": {"first_name": "Al", "last_name": "Ames"}})],
        "nothing after the change may be sent"
    );
    assert!(w.confirmed().await < end, "the position moved past the row");
    // The row is still ahead of the slot: a fixed connector would get it.
    let pending = pending_inserts(&w).await;
    assert_eq!(
        pending, 1,
        "the row after the change must still be in the slot"
    );
}

/// Inserts the slot still holds for a consumer (peeked, not consumed).
async fn pending_inserts(w: &World) -> i64 {
    let deadline = std::time::Instant::now() + WAIT;
    while w.db.slot_active(&w.slot).await {
        assert!(std::time::Instant::now() < deadline, "the slot stayed busy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.db.query_i64(&format!(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('{slot}', NULL, NULL,
             'proto_version', '1', 'publication_names', 'pub_{slot}')
          WHERE get_byte(data, 0) = ascii('I')",
        slot = w.slot
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_a_mapped_column_stops_the_stream_before_anything_wrong_is_sent() {
    a_change_to_a_mapped_column_stops(
        "drop_mapped",
        "ALTER TABLE employees DROP COLUMN last_name;",
        "INSERT INTO employees (email, first_name) VALUES ('b@x.test', 'Bo');",
        "last_name",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retyping_a_mapped_column_stops_the_stream_before_anything_wrong_is_sent() {
    a_change_to_a_mapped_column_stops(
        "retype_mapped",
        "ALTER TABLE employees ALTER COLUMN first_name TYPE varchar(40);",
        "INSERT INTO employees (email, first_name, last_name) VALUES ('b@x.test', 'Bo', 'Bell');",
        "first_name",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn adding_or_renaming_an_unmapped_column_changes_nothing() {
    let w = world("unmapped_ddl", ROSTER_SQL).await;
    let conn = start(&w, ROSTER_TABLES).await;
    w.db.exec(
        "INSERT INTO employees (email, first_name, last_name) VALUES ('a@x.test', 'Al', 'Ames');
         ALTER TABLE employees ADD COLUMN note text;
         INSERT INTO employees (email, first_name, last_name, note) VALUES ('b@x.test', 'Bo', 'Bell', 'n');
         UPDATE employees SET note = 'm', first_name = 'Abe' WHERE email = 'a@x.test';
         ALTER TABLE employees RENAME COLUMN note TO memo;
         INSERT INTO employees (email, first_name, last_name, memo) VALUES ('c@x.test', 'Cy', 'Cole', 'k');",
    )
    .await;
    settle(&w).await;
    assert!(conn.is_running(), "{}", conn.log());
    let mut got = w.rx.identifies();
    got.sort_by_key(|v| v.to_string());
    assert_eq!(
        got,
        vec![
            json!({"id": "a@x.test", "traits": {"first_name": "Abe", "last_name": "Ames"}}),
            json!({"id": "a@x.test", "traits": {"first_name": "Al", "last_name": "Ames"}}),
            json!({"id": "b@x.test", "traits": {"first_name": "Bo", "last_name": "Bell"}}),
            json!({"id": "c@x.test", "traits": {"first_name": "Cy", "last_name": "Cole"}}),
        ]
    );
    conn.stop().await;
}

// ---------------------------------------------------------------------
// 8. Types from extensions and optional build parts.
// ---------------------------------------------------------------------

const CITEXT_SQL: &str = "
    CREATE EXTENSION citext;
    CREATE TABLE members (handle citext PRIMARY KEY, email citext NOT NULL, name text);
    CREATE TABLE visits (id serial PRIMARY KEY, member citext, page text);
";

/// Members identified by email; a visit's contact looked up by its member
/// key.
const MEMBER_VISITS_TABLES: &str = "
tables:
  - table: public.members
    identify: {id: email, traits: {name: name}}
  - table: public.visits
    track:
      id: {from: public.members, key: member, column: email}
      event: visited
      properties: {page: page}
";

/// A type from an extension (contrib's citext) has no fixed OID: the
/// connector learns it from the catalog. Its values are sent as their text,
/// as a contact id too, and a lookup compares keys as that type (a visit
/// naming `ANN` finds the member `Ann`), in the first copy and the stream.
#[tokio::test(flavor = "multi_thread")]
async fn citext_columns_serve_as_contact_ids_and_lookup_keys() {
    if crate::support::pg::skip_without_extension("citext") {
        return;
    }
    let w = world("citext", CITEXT_SQL).await;
    w.db.exec("INSERT INTO members VALUES ('Ann', 'Ann@Acme.test', 'Ann');")
        .await;
    let conn = start(&w, MEMBER_VISITS_TABLES).await;
    // Bob commits before his visit: `bob` misses the cache the stream keeps
    // (keyed by the text `Bob`), and the query on a miss may not yet see a
    // row of the very transaction being read.
    w.db.exec("INSERT INTO members VALUES ('Bob', 'Bob@Acme.test', 'Bob');")
        .await;
    w.db.exec(
        "INSERT INTO visits (member, page) VALUES ('ANN', '/home');
         INSERT INTO visits (member, page) VALUES ('bob', '/pricing');",
    )
    .await;
    settle(&w).await;
    assert!(conn.is_running(), "{}", conn.log());
    assert_eq!(
        w.rx.identifies(),
        vec![
            json!({"id": "Ann@Acme.test", "traits": {"name": "Ann"}}),
            json!({"id": "Bob@Acme.test", "traits": {"name": "Bob"}}),
        ]
    );
    let visit = |email: &str, page: &str| {
        (
            email.to_owned(),
            json!({"event": "visited", "properties": {"page": page}}),
        )
    };
    // Two contacts: their requests may arrive in either order.
    let mut tracks = w.rx.tracks();
    tracks.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        tracks,
        vec![
            visit("Ann@Acme.test", "/home"),
            visit("Bob@Acme.test", "/pricing")
        ],
        "{}",
        conn.log()
    );
    conn.stop().await;
}

/// An `xml` column (a build with libxml) is sent as its text, in the first
/// copy and the stream.
#[tokio::test(flavor = "multi_thread")]
async fn an_xml_column_is_sent_as_its_text() {
    if crate::support::pg::skip_without_xml() {
        return;
    }
    let w = world(
        "xml",
        "CREATE TABLE employees (id int PRIMARY KEY, email text NOT NULL, profile xml);
         INSERT INTO employees VALUES (1, 'ann@x.test', '<profile><team>North</team></profile>');",
    )
    .await;
    let conn = start(
        &w,
        "
tables:
  - table: public.employees
    identify: {id: email, traits: {profile: profile}}
",
    )
    .await;
    w.db.exec("INSERT INTO employees VALUES (2, 'bo@x.test', '<profile team=\"South\"/>');")
        .await;
    settle(&w).await;
    assert!(conn.is_running(), "{}", conn.log());
    assert_eq!(
        w.rx.identifies(),
        vec![
            json!({"id": "ann@x.test", "traits": {"profile": "<profile><team>North</team></profile>"}}),
            json!({"id": "bo@x.test", "traits": {"profile": "<profile team=\"South\"/>"}}),
        ]
    );
    conn.stop().await;
}

/// A visit and the member it names, written in one transaction whose
/// commit is streamed before it turns visible (a synchronous standby holds
/// it back). The visit names the member as `7`, the member's key reads
/// `7.0`: the cache the stream keeps (keyed by the text) misses, and the
/// lookup queries the table. That query must not answer before the
/// transaction is visible, or it finds no member and the visit is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_lookup_of_a_row_written_in_the_same_not_yet_visible_transaction_waits_for_it() {
    let cluster = tokio::task::spawn_blocking(crate::support::pg::private_cluster)
        .await
        .unwrap();
    let w = crate::support::setup::world_on(
        cluster,
        "lookup_invisible",
        "CREATE TABLE members (code numeric PRIMARY KEY, email text NOT NULL, name text);
         CREATE TABLE visits (id serial PRIMARY KEY, member numeric, page text);",
    )
    .await;
    let conn = start(&w, MEMBER_VISITS_TABLES).await;
    let writer = crate::support::setup::HeldCommit::start(
        cluster,
        &w.db.url(),
        "WITH m AS (INSERT INTO members VALUES (7.0, 'bo@x.test', 'Bo') RETURNING code)
         INSERT INTO visits (member, page) SELECT 7, '/pricing' FROM m",
    )
    .await;
    // Long enough for the reader to have looked the member up while the
    // commit is invisible.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(writer.release().await, 1);
    settle(&w).await;
    assert!(conn.is_running(), "{}", conn.log());
    assert_eq!(
        w.rx.tracks(),
        vec![(
            "bo@x.test".to_owned(),
            json!({"event": "visited", "properties": {"page": "/pricing"}})
        )],
        "{}",
        conn.log()
    );
    assert!(!conn.log().contains("row not sent"), "{}", conn.log());
    conn.stop().await;
}
