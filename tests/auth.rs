//! Authentication methods and TLS modes on the replication connection and
//! the SQL connection, against a server configured for each.

use std::time::Duration;

use crate::support::connector::{run_cli, Connector, CONFIG_PLACEHOLDER as CONFIG};
use crate::support::pg::percent_encode;
use crate::support::setup::{world, World, ROSTER_SQL, ROSTER_TABLES};

/// Lets auth test roles stream the roster: they read the tables, and the
/// superuser creates the publication they cannot.
async fn grant(w: &World, roles: &str) {
    w.db.exec(&format!(
        "GRANT SELECT ON employees, sales TO {roles}; GRANT CREATE ON DATABASE \"{}\" TO {roles};
         CREATE PUBLICATION pub_{} FOR TABLE employees, sales;",
        w.db.name(),
        w.slot
    ))
    .await;
}

fn check_ok(w: &World, url: &str) -> String {
    let (status, out, err) = run_cli(
        &["check", "--config", CONFIG],
        &w.config_with_url(url, ROSTER_TABLES, ""),
        &[],
    );
    assert!(status.success(), "check failed for {url}:\n{out}\n{err}");
    assert!(out.contains("ok   replication connection"), "{out}");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn cleartext_md5_and_scram_passwords_authenticate() {
    let w = world("auth", ROSTER_SQL).await;
    grant(&w, "password_user, md5_user, scram_user").await;
    for role in ["password_user", "md5_user", "scram_user"] {
        check_ok(&w, &format!("{}?sslmode=disable", w.db.url_as(role)));
    }
    // A wrong password is a clear error, and the password is not echoed.
    let url = w.db.url_as("scram_user").replace(
        &percent_encode(&crate::support::pg::password_for("scram_user")),
        "wrong-pw-9",
    );
    let (status, out, err) = run_cli(
        &["check", "--config", CONFIG],
        &w.config_with_url(&url, ROSTER_TABLES, ""),
        &[],
    );
    assert!(!status.success());
    assert!(
        out.contains("FAIL server reachable") && out.contains("password"),
        "{out}"
    );
    assert!(!out.contains("wrong-pw-9") && !err.contains("wrong-pw-9"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_password_can_come_from_pgpassword() {
    let w = world("pgpassword", ROSTER_SQL).await;
    grant(&w, "scram_user").await;
    let port = w.db.cluster().port();
    let url = format!(
        "postgres://scram_user@127.0.0.1:{port}/{}?sslmode=disable",
        w.db.name()
    );
    let pw = crate::support::pg::password_for("scram_user");
    let (status, out, err) = run_cli(
        &["check", "--config", CONFIG],
        &w.config_with_url(&url, ROSTER_TABLES, ""),
        &[("PGPASSWORD", pw.as_str())],
    );
    assert!(status.success(), "{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_modes_follow_libpq_rules() {
    if crate::support::pg::skip_without_tls() {
        return;
    }
    let w = world("tls", ROSTER_SQL).await;
    grant(&w, "tls_user").await;
    let ca = w.db.cluster().ca_path();
    let ca = ca.display();
    let base = w.db.url_as("tls_user");
    // The server requires TLS for tls_user; disable must fail.
    let (status, out, _) = run_cli(
        &["check", "--config", CONFIG],
        &w.config_with_url(&format!("{base}?sslmode=disable"), ROSTER_TABLES, ""),
        &[],
    );
    assert!(!status.success(), "{out}");
    check_ok(&w, &format!("{base}?sslmode=prefer"));
    check_ok(&w, &format!("{base}?sslmode=require"));
    check_ok(&w, &format!("{base}?sslmode=verify-ca&sslrootcert={ca}"));
    // The certificate names localhost, not 127.0.0.1.
    let (status, out, _) = run_cli(
        &["check", "--config", CONFIG],
        &w.config_with_url(
            &format!("{base}?sslmode=verify-full&sslrootcert={ca}"),
            ROSTER_TABLES,
            "",
        ),
        &[],
    );
    assert!(!status.success());
    assert!(out.contains("FAIL server reachable"), "{out}");
    let by_name = base.replace("127.0.0.1", "localhost");
    check_ok(
        &w,
        &format!("{by_name}?sslmode=verify-full&sslrootcert={ca}"),
    );

    // And the stream itself runs over verify-full TLS with SCRAM.
    let conn = Connector::run(
        &w.config_with_url(
            &format!("{by_name}?sslmode=verify-full&sslrootcert={ca}"),
            ROSTER_TABLES,
            "",
        ),
        &[],
    );
    w.wait_streaming(Duration::from_secs(60)).await;
    w.db.exec("INSERT INTO employees (email, first_name) VALUES ('tls@x.test', 'T');")
        .await;
    w.rx.wait_until("the identify over TLS", Duration::from_secs(60), |r| {
        r.identify_count() == 1
    })
    .await;
    let ssl: bool = w
        .db
        .query_opt_string("SELECT s.ssl::text FROM pg_stat_ssl s JOIN pg_stat_replication r ON r.pid = s.pid WHERE r.application_name = 'conveyour-cdc' LIMIT 1")
        .await
        .map(|v| v == "true")
        .unwrap_or(false);
    assert!(
        ssl,
        "the replication connection is not encrypted\n{}",
        conn.log()
    );
    drop(conn);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_password_says_where_to_put_it() {
    let w = world("no_password", ROSTER_SQL).await;
    let port = w.db.cluster().port();
    let url = format!(
        "postgres://scram_user@127.0.0.1:{port}/{}?sslmode=disable",
        w.db.name()
    );
    let (status, out, err) = run_cli(
        &["check", "--config", CONFIG],
        &w.config_with_url(&url, ROSTER_TABLES, ""),
        &[],
    );
    assert!(!status.success(), "{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL server reachable"))
        .unwrap_or_else(|| panic!("no FAIL server reachable line:\n{out}"));
    assert!(
        line.contains("the server asked for a password and none was given")
            && line.contains("put it in postgres.url")
            && line.contains("set PGPASSWORD"),
        "{line}"
    );
    assert!(!line.contains("invalid configuration"), "{line}");
}
