//! `sql/setup.sql` and `sql/teardown.sql` against the real server: both run
//! twice without harm, the role they make can do what the connector needs
//! (log in, create and stream its slot, read the mapped tables, keep state in
//! its own schema) and nothing more, and teardown leaves nothing behind.
//!
//! Roles are cluster-wide and tests run in parallel, so every test names its
//! roles after its own database.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use crate::support::connector::{run_cli, Connector, CONFIG_PLACEHOLDER as CONFIG};
use crate::support::pg::{cluster, connect, percent_encode, TestDb};
use crate::support::setup::{world, ROSTER_SQL, ROSTER_TABLES};

const PASSWORD: &str = "pw with 'quote' and spaces";

fn sql_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("sql")
        .join(name)
}

/// Runs one of the sql/ files through psql as the superuser, with `vars` as
/// `-v NAME=VALUE`.
fn psql(db: &TestDb, file: &str, vars: &[(&str, &str)]) -> Output {
    let c = cluster();
    let mut cmd = Command::new(c.bin("psql"));
    cmd.args(["-X", "-v", "ON_ERROR_STOP=1", "-h", c.host()])
        .args([
            "-p",
            &c.port().to_string(),
            "-U",
            "postgres",
            "-d",
            db.name(),
        ])
        .stdin(Stdio::null());
    for (name, value) in vars {
        cmd.arg("-v").arg(format!("{name}={value}"));
    }
    cmd.arg("-f").arg(sql_file(file));
    cmd.output()
        .unwrap_or_else(|e| panic!("running psql for {file}: {e}"))
}

fn psql_ok(db: &TestDb, file: &str, vars: &[(&str, &str)]) -> String {
    let out = psql(db, file, vars);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "psql -f sql/{file} {vars:?} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    stdout + &stderr
}

fn psql_fails(db: &TestDb, file: &str, vars: &[(&str, &str)]) -> String {
    let out = psql(db, file, vars);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "psql -f sql/{file} {vars:?} should have failed:\n{text}"
    );
    text
}

fn role_url(db: &TestDb, role: &str) -> String {
    format!(
        "postgres://{}:{}@127.0.0.1:{}/{}",
        percent_encode(role),
        percent_encode(PASSWORD),
        db.cluster().port(),
        db.name()
    )
}

/// Asserts that `sql`, run as the role, is refused for lack of privilege.
async fn refused(client: &tokio_postgres::Client, sql: &str) {
    match client.batch_execute(sql).await {
        Ok(()) => panic!("the connector role could run: {sql}"),
        Err(e) => assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: expected a privilege error, got {e:?}"
        ),
    }
}

async fn exists(db: &TestDb, sql: &str) -> bool {
    db.query_i64(&format!("SELECT count(*) FROM ({sql}) AS x"))
        .await
        > 0
}

/// Roles, publication, schema and slot names for one test. The schema is
/// always the connector's own, `conveyour_cdc` (schemas belong to one
/// database, so tests in their own databases do not share it).
struct Names {
    role: String,
    publication: String,
    schema: String,
    slot: String,
}

impl Names {
    fn for_db(db: &TestDb) -> Names {
        let base = db.name().to_string();
        Names {
            role: format!("r_{base}"),
            publication: format!("pub_{base}"),
            schema: "conveyour_cdc".to_owned(),
            slot: format!("slot_{base}"),
        }
    }

    async fn gone(&self, db: &TestDb) {
        let Names {
            role,
            publication,
            schema,
            slot,
        } = self;
        assert!(
            !exists(
                db,
                &format!("SELECT 1 FROM pg_roles WHERE rolname = '{role}'")
            )
            .await
        );
        assert!(
            !exists(
                db,
                &format!("SELECT 1 FROM pg_publication WHERE pubname IN ('{publication}', '{publication}_inserts')")
            )
            .await
        );
        assert!(
            !exists(
                db,
                &format!("SELECT 1 FROM pg_namespace WHERE nspname = '{schema}'")
            )
            .await
        );
        assert!(
            !exists(
                db,
                &format!("SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}'")
            )
            .await
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn setup_grants_exactly_what_the_connector_needs_and_teardown_removes_it() {
    let db = crate::support::pg::fresh_db("sql_least_privilege").await;
    db.exec(&format!(
        "{ROSTER_SQL}
         CREATE TABLE payroll (id int PRIMARY KEY, salary numeric);
         INSERT INTO employees (email) VALUES ('a@example.com');"
    ))
    .await;
    let n = Names::for_db(&db);
    let vars = [
        ("role", n.role.as_str()),
        ("password", PASSWORD),
        ("tables", "public.employees, sales"),
        ("publication", n.publication.as_str()),
        ("full_identity_tables", "public.employees"),
    ];

    // Twice: the second run must find everything in place and change nothing.
    let first = psql_ok(&db, "setup.sql", &vars);
    assert!(first.contains("setup done"), "{first}");
    psql_ok(&db, "setup.sql", &vars);

    // The catalog says what was asked for.
    assert_eq!(
        db.query_opt_string(&format!(
            "SELECT string_agg(schemaname || '.' || tablename, ',' ORDER BY tablename)
               FROM pg_publication_tables WHERE pubname = '{}'",
            n.publication
        ))
        .await
        .as_deref(),
        Some("public.employees,public.sales")
    );
    assert_eq!(
        db.query_opt_string(
            "SELECT string_agg(relname || '=' || relreplident::text, ',' ORDER BY relname)
               FROM pg_class WHERE relname IN ('employees', 'sales')"
        )
        .await
        .as_deref(),
        Some("employees=f,sales=d")
    );
    assert_eq!(
        db.query_i64(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{}' AND rolcanlogin AND rolreplication
                AND NOT rolsuper AND NOT rolcreatedb AND NOT rolcreaterole AND NOT rolbypassrls",
            n.role
        ))
        .await,
        1
    );
    assert_eq!(
        db.query_i64(&format!(
            "SELECT count(*) FROM pg_authid WHERE rolname = '{}' AND rolpassword IS NOT NULL",
            n.role
        ))
        .await,
        1,
        "the password was not set"
    );
    assert_eq!(
        db.query_opt_string(&format!(
            "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = '{}'",
            n.schema
        ))
        .await,
        Some(n.role.clone()),
        "the connector's schema belongs to its role"
    );

    // What the connector needs: log in, read the mapped tables, create and
    // decode its slot through the publication, keep state in its schema.
    let role = connect(&role_url(&db, &n.role))
        .await
        .unwrap_or_else(|e| panic!("the connector role cannot log in: {e}"));
    assert_eq!(
        role.query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        n.role
    );
    for table in ["employees", "public.sales"] {
        role.query(&format!("SELECT * FROM {table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("the role cannot read {table}: {e:?}"));
    }
    role.query_one(
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&n.slot],
    )
    .await
    .unwrap_or_else(|e| panic!("the role cannot create a logical slot: {e:?}"));
    db.exec("INSERT INTO employees (email) VALUES ('b@example.com');")
        .await;
    let messages: i64 = role
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                 'proto_version', '1', 'publication_names', $2)",
            &[&n.slot, &n.publication],
        )
        .await
        .unwrap_or_else(|e| panic!("the role cannot decode its slot: {e:?}"))
        .get(0);
    assert!(
        messages >= 3,
        "begin, relation/insert and commit expected, got {messages}"
    );
    role.batch_execute(&format!(
        "CREATE TABLE {s}.state (k text PRIMARY KEY, v text);
         INSERT INTO {s}.state VALUES ('lsn', '0/0');
         UPDATE {s}.state SET v = '0/1';
         CREATE TABLE {s}.dead_letters (id bigserial PRIMARY KEY, body jsonb);
         DROP TABLE {s}.dead_letters;",
        s = n.schema
    ))
    .await
    .unwrap_or_else(|e| panic!("the role cannot keep state in its schema: {e:?}"));

    // And nothing more.
    refused(&role, "UPDATE employees SET first_name = 'x'").await;
    refused(
        &role,
        "INSERT INTO employees (email) VALUES ('c@example.com')",
    )
    .await;
    refused(&role, "DELETE FROM employees").await;
    refused(&role, "TRUNCATE sales").await;
    refused(&role, "SELECT * FROM payroll").await;
    refused(&role, "ALTER TABLE employees ADD COLUMN x int").await;
    refused(
        &role,
        &format!("ALTER PUBLICATION {} ADD TABLE payroll", n.publication),
    )
    .await;
    refused(&role, "CREATE SCHEMA elsewhere").await;
    // Before PostgreSQL 15 everyone may create in `public` unless the
    // database owner revoked it; that is the database's setting, not ours.
    let public_open = db
        .query_i64(
            "SELECT count(*) FROM pg_namespace, aclexplode(nspacl) a
              WHERE nspname = 'public' AND a.grantee = 0 AND a.privilege_type = 'CREATE'",
        )
        .await
        > 0;
    if !public_open {
        refused(&role, "CREATE TABLE public.sneaky (x int)").await;
    }
    drop(role);

    // A smaller table list on a later run takes the dropped table away.
    let mut narrowed = vars;
    narrowed[2] = ("tables", "public.employees");
    psql_ok(&db, "setup.sql", &narrowed);
    let role = connect(&role_url(&db, &n.role)).await.unwrap();
    refused(&role, "SELECT * FROM sales").await;
    role.query("SELECT * FROM employees", &[]).await.unwrap();
    assert_eq!(
        db.query_opt_string(&format!(
            "SELECT string_agg(tablename, ',') FROM pg_publication_tables WHERE pubname = '{}'",
            n.publication
        ))
        .await
        .as_deref(),
        Some("employees")
    );
    drop(role);

    // Teardown, twice; the slot is inactive, so it goes too.
    let teardown = [
        ("role", n.role.as_str()),
        ("slot", n.slot.as_str()),
        ("publication", n.publication.as_str()),
    ];
    psql_ok(&db, "teardown.sql", &teardown);
    n.gone(&db).await;
    psql_ok(&db, "teardown.sql", &teardown);
    n.gone(&db).await;
    assert!(
        connect(&role_url(&db, &n.role)).await.is_err(),
        "the dropped role can still log in"
    );
    // The mapped tables themselves are untouched.
    assert_eq!(db.query_i64("SELECT count(*) FROM employees").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn setup_refuses_bad_input_before_changing_anything() {
    let db = crate::support::pg::fresh_db("sql_bad_input").await;
    db.exec(ROSTER_SQL).await;
    let n = Names::for_db(&db);

    let out = psql_fails(&db, "setup.sql", &[("role", &n.role)]);
    assert!(out.contains("no tables given"), "{out}");
    let out = psql_fails(
        &db,
        "setup.sql",
        &[
            ("role", &n.role),
            ("tables", "public.employees, public.nope"),
        ],
    );
    assert!(out.contains("\"public.nope\" does not exist"), "{out}");
    // The connector keeps its state in `conveyour_cdc` only: another
    // schema would be made for nothing.
    let out = psql_fails(
        &db,
        "setup.sql",
        &[
            ("role", &n.role),
            ("tables", "employees"),
            ("schema", "elsewhere"),
        ],
    );
    assert!(
        out.contains("schema elsewhere cannot be used")
            && out.contains("conveyour_cdc")
            && out.contains("leave out -v schema"),
        "{out}"
    );
    assert!(
        !exists(
            &db,
            "SELECT 1 FROM pg_namespace WHERE nspname = 'elsewhere'"
        )
        .await,
        "a refused schema was created"
    );
    assert!(
        !exists(
            &db,
            &format!("SELECT 1 FROM pg_roles WHERE rolname = '{}'", n.role)
        )
        .await,
        "a failed setup left a role behind"
    );

    // An existing superuser is never turned into the connector's role.
    db.exec(&format!("CREATE ROLE {} SUPERUSER LOGIN", n.role))
        .await;
    let out = psql_fails(
        &db,
        "setup.sql",
        &[("role", &n.role), ("tables", "employees")],
    );
    assert!(out.contains("is a superuser"), "{out}");
    assert!(
        exists(
            &db,
            &format!(
                "SELECT 1 FROM pg_roles WHERE rolname = '{}' AND rolsuper",
                n.role
            )
        )
        .await
    );
    db.exec(&format!("DROP ROLE {}", n.role)).await;
}

/// The role from setup.sql is enough for the real connector: `check` passes
/// and a row reaches the receiver. Teardown refuses while it streams.
#[tokio::test(flavor = "multi_thread")]
async fn the_connector_runs_as_the_setup_role_and_teardown_waits_for_it_to_stop() {
    let w = world("sql_connector_role", ROSTER_SQL).await;
    let role = format!("r_{}", w.db.name());
    let publication = format!("pub_{}", w.slot);
    psql_ok(
        &w.db,
        "setup.sql",
        &[
            ("role", &role),
            ("password", PASSWORD),
            ("tables", "public.employees, public.sales"),
            ("publication", &publication),
        ],
    );
    let config = w.config_with_url(&role_url(&w.db, &role), ROSTER_TABLES, "");

    let (status, out, err) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert!(
        status.success(),
        "check as the setup role failed:\n{out}\n{err}"
    );

    let connector = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(30)).await;
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('ann@example.com', 'Ann');")
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.rx.contact("ann@example.com").is_none() {
        assert!(
            Instant::now() < deadline,
            "no identify for the new row; connector log:\n{}",
            connector.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // While it streams, teardown must not pull the slot from under it.
    let teardown = [
        ("role", role.as_str()),
        ("slot", w.slot.as_str()),
        ("publication", publication.as_str()),
    ];
    let out = psql_fails(&w.db, "teardown.sql", &teardown);
    assert!(out.contains("is in use"), "{out}");
    assert!(w.db.slot_active(&w.slot).await);

    connector.sigterm();
    assert!(connector.wait(Duration::from_secs(30)).await.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.db.slot_active(&w.slot).await {
        assert!(Instant::now() < deadline, "the slot stayed active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    psql_ok(&w.db, "teardown.sql", &teardown);
    assert!(w.db.confirmed_flush(&w.slot).await.is_none(), "slot left");
    assert!(
        !exists(
            &w.db,
            &format!("SELECT 1 FROM pg_roles WHERE rolname = '{role}'")
        )
        .await
    );
}

/// A table without a primary key whose mapping acts on inserts only goes
/// through the insert-only publication setup.sql makes beside the main one:
/// the connector, as the setup role (which may not create publications),
/// tracks its inserts while the application keeps updating and deleting its
/// rows. One that would be published with its updates is refused. Teardown
/// drops both publications.
#[tokio::test(flavor = "multi_thread")]
async fn setup_puts_keyless_insert_only_tables_in_the_insert_only_publication() {
    let w = world(
        "sql_insert_only",
        &format!(
            "{ROSTER_SQL} CREATE TABLE history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22));"
        ),
    )
    .await;
    let role = format!("r_{}", w.db.name());
    let publication = format!("pub_{}", w.slot);
    let inserts = format!("{publication}_inserts");
    let vars = |insert_only: &'static str| {
        vec![
            ("role", role.clone()),
            ("password", PASSWORD.to_owned()),
            (
                "tables",
                "public.employees, public.sales, public.history".to_owned(),
            ),
            ("publication", publication.clone()),
            ("insert_only_tables", insert_only.to_owned()),
        ]
    };

    // Not insert-only: refused, nothing created.
    let refused = vars("public.sales");
    let refused: Vec<(&str, &str)> = refused.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = psql_fails(&w.db, "setup.sql", &refused);
    assert!(
        out.contains("public.history has no primary key or replica identity")
            && out.contains("insert_only_tables"),
        "{out}"
    );
    assert!(
        !exists(&w.db, "SELECT 1 FROM pg_publication").await,
        "a refused setup created a publication"
    );

    let ok = vars("public.sales, history");
    let ok: Vec<(&str, &str)> = ok.iter().map(|(k, v)| (*k, v.as_str())).collect();
    psql_ok(&w.db, "setup.sql", &ok);
    psql_ok(&w.db, "setup.sql", &ok);
    let held = |name: String| {
        let db = &w.db;
        async move {
            db.query_opt_string(&format!(
                "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = '{name}'"
            ))
            .await
        }
    };
    assert_eq!(
        held(publication.clone()).await.as_deref(),
        Some("employees,sales")
    );
    assert_eq!(held(inserts.clone()).await.as_deref(), Some("history"));
    assert_eq!(
        w.db.query_i64(&format!(
            "SELECT count(*) FROM pg_publication WHERE pubname = '{inserts}' AND pubinsert AND NOT pubupdate AND NOT pubdelete AND NOT pubtruncate"
        ))
        .await,
        1
    );

    let tables = format!(
        "{ROSTER_TABLES}  - table: public.history\n    track:\n      id: aid\n      event: balance_changed\n      properties: {{delta: delta}}\n"
    );
    let config = w.config_with_url(&role_url(&w.db, &role), &tables, "");
    let (status, out, err) = run_cli(&["check", "--config", CONFIG], &config, &[]);
    assert!(
        status.success(),
        "check as the setup role failed:\n{out}\n{err}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok   replica identity public.history: ")
                && l.contains(&format!(
                    "goes through the insert-only publication {inserts}"
                ))),
        "{out}"
    );
    let connector = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(30)).await;
    w.db.exec(
        "INSERT INTO history VALUES (1, 1, 7, 5, now(), 'a');
         UPDATE history SET delta = 6;
         DELETE FROM history;
         INSERT INTO history VALUES (1, 1, 8, 2, now(), 'b');",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.rx.track_count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the history rows were not tracked; connector log:\n{}",
            connector.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    connector.sigterm();
    assert!(connector.wait(Duration::from_secs(30)).await.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.db.slot_active(&w.slot).await {
        assert!(Instant::now() < deadline, "the slot stayed active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let teardown = [
        ("role", role.as_str()),
        ("slot", w.slot.as_str()),
        ("publication", publication.as_str()),
    ];
    psql_ok(&w.db, "teardown.sql", &teardown);
    assert!(
        !exists(&w.db, "SELECT 1 FROM pg_publication").await,
        "teardown left a publication"
    );
}

/// A DEFERRABLE primary key is no replica identity to Postgres: setup
/// refuses to publish such a table with its updates, as for a keyless one,
/// and creates nothing.
#[tokio::test(flavor = "multi_thread")]
async fn setup_refuses_a_table_whose_only_key_is_deferrable() {
    let w = world(
        "sql_deferrable",
        "CREATE TABLE employees (id int PRIMARY KEY DEFERRABLE, email text);",
    )
    .await;
    let role = format!("r_{}", w.db.name());
    let publication = format!("pub_{}", w.slot);
    let out = psql_fails(
        &w.db,
        "setup.sql",
        &[
            ("role", role.as_str()),
            ("tables", "public.employees"),
            ("publication", publication.as_str()),
        ],
    );
    assert!(
        out.contains("public.employees has no primary key or replica identity"),
        "{out}"
    );
    assert!(
        !exists(&w.db, "SELECT 1 FROM pg_publication").await,
        "a refused setup created a publication"
    );
}

/// A partitioned table: setup refuses it before changing anything, since
/// REPLICA IDENTITY FULL on the parent does not reach its partitions and
/// publishing it would make Postgres refuse the application's UPDATEs and
/// DELETEs on them.
#[tokio::test(flavor = "multi_thread")]
async fn setup_refuses_a_partitioned_table() {
    let w = world(
        "sql_partitioned",
        "CREATE TABLE staff (email text, region text) PARTITION BY LIST (region);
         CREATE TABLE staff_eu PARTITION OF staff FOR VALUES IN ('eu');
         INSERT INTO staff VALUES ('ann@acme.test', 'eu');",
    )
    .await;
    let role = format!("r_{}", w.db.name());
    let publication = format!("pub_{}", w.slot);
    let out = psql_fails(
        &w.db,
        "setup.sql",
        &[
            ("role", role.as_str()),
            ("tables", "public.staff"),
            ("full_identity_tables", "public.staff"),
            ("publication", publication.as_str()),
        ],
    );
    assert!(out.contains("public.staff is a partitioned table"), "{out}");
    assert!(
        !exists(&w.db, "SELECT 1 FROM pg_publication").await,
        "a refused setup created a publication"
    );
    w.db.exec("UPDATE staff SET email = 'annie@acme.test'; DELETE FROM staff;")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_table_another_role_owns_stops_the_connector_naming_the_owner_change() {
    let w = world("sql_dl_owner", ROSTER_SQL).await;
    let role = format!("r_{}", w.db.name());
    let publication = format!("pub_{}", w.slot);
    psql_ok(
        &w.db,
        "setup.sql",
        &[
            ("role", &role),
            ("password", PASSWORD),
            ("tables", "public.employees, public.sales"),
            ("publication", &publication),
        ],
    );
    // The table as an earlier version made it, run as another role.
    w.db.exec(
        "CREATE TABLE conveyour_cdc.dead_letters (
             id bigserial PRIMARY KEY, slot text NOT NULL, endpoint text NOT NULL,
             source_table text NOT NULL, contact text NOT NULL, lsn pg_lsn NOT NULL,
             payload jsonb NOT NULL, status int NOT NULL, message text NOT NULL,
             attempts int NOT NULL, created_at timestamptz NOT NULL DEFAULT now());",
    )
    .await;
    let config = w.config_with_url(&role_url(&w.db, &role), ROSTER_TABLES, "");
    let connector = Connector::run(&config, &[]);
    let status = connector.wait(Duration::from_secs(60)).await;
    assert!(!status.success());
    let log = connector.log();
    let fix = format!("ALTER TABLE conveyour_cdc.dead_letters OWNER TO \"{role}\"");
    assert!(log.contains(&fix), "{log}");
    // The fix it names lets the next start upgrade the table and stream.
    w.db.exec(&fix).await;
    let connector = Connector::run(&config, &[]);
    w.wait_streaming(Duration::from_secs(60)).await;
    assert!(connector.is_running(), "{}", connector.log());
}
