//! Tests of the test harness itself, against the real Postgres and the real
//! receiver, so a broken harness fails loudly instead of passing everything.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::pg::{self, cluster, fresh_db, password_for};
use crate::support::receiver::{self, Fault, Receiver, IDENTIFY_PATH, TRACK_PATH};

const APPKEY: &str = "test-appkey";
const TOKEN: &str = "test-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_runs_with_logical_wal_and_tls() {
    let admin = cluster().admin().await;
    let row = admin.query_one("SHOW wal_level", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "logical");
    // TLS is on unless the build has no TLS library at all.
    let library = admin.query_one("SHOW ssl_library", &[]).await.unwrap();
    let built_with_tls = !library.get::<_, String>(0).is_empty();
    assert_eq!(cluster().has_tls(), built_with_tls);
    let row = admin.query_one("SHOW ssl", &[]).await.unwrap();
    let expected = if built_with_tls { "on" } else { "off" };
    assert_eq!(row.get::<_, String>(0), expected);
    let ca = std::fs::read_to_string(cluster().ca_path()).unwrap();
    assert!(ca.contains("BEGIN CERTIFICATE"));
    assert!(cluster().bin("pg_recvlogical").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_dbs_are_distinct_empty_and_cleaned_up() {
    let a = fresh_db("harness a").await;
    let b = fresh_db("harness a").await;
    assert_ne!(a.name(), b.name());
    let tables = "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'";
    assert_eq!(a.query_i64(tables).await, 0);
    a.exec("CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1), (2);")
        .await;
    assert_eq!(a.query_i64("SELECT count(*) FROM t").await, 2);
    assert_eq!(b.query_i64(tables).await, 0);
    assert_eq!(
        a.query_opt_string("SELECT current_database()::text")
            .await
            .as_deref(),
        Some(a.name())
    );
    assert_eq!(a.query_opt_string("SELECT NULL::text").await, None);

    let slot = format!("slot_{}", a.name());
    a.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    ))
    .await;
    let before = a.wal_lsn().await;
    assert!(before > 0);
    let flushed = a.confirmed_flush(&slot).await.expect("slot has a position");
    assert!(flushed > 0 && flushed <= before);
    assert!(!a.slot_active(&slot).await);
    assert_eq!(a.confirmed_flush("no_such_slot").await, None);
    a.exec("INSERT INTO t VALUES (3)").await;
    assert!(a.wal_lsn().await > before);

    // Dropping the database value drops its slots and the database itself.
    let name = a.name().to_string();
    drop(a);
    let admin = cluster().admin().await;
    let left = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_database WHERE datname = $1) \
                  + (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $2)",
            &[&name, &slot],
        )
        .await
        .unwrap();
    assert_eq!(left.get::<_, i64>(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_roles_use_their_methods() {
    let db = fresh_db("harness_auth").await;
    for role in ["md5_user", "scram_user", "password_user"] {
        let client = pg::connect(&db.url_as(role))
            .await
            .unwrap_or_else(|e| panic!("{role} could not log in: {e}"));
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), role);
        let wrong = db.url_as(role).replace(&password_for(role), "wrong");
        assert!(
            pg::connect(&wrong).await.is_err(),
            "{role} logged in with a wrong password"
        );
    }
    let admin = cluster().admin().await;
    let hash = |role: &'static str| {
        let admin = &admin;
        async move {
            admin
                .query_one(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                    &[&role],
                )
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert!(hash("md5_user").await.starts_with("md5"));
    assert!(hash("scram_user").await.starts_with("SCRAM-SHA-256$"));
    let row = admin
        .query_one(
            "SELECT bool_and(rolreplication AND rolcanlogin) FROM pg_roles \
             WHERE rolname IN ('md5_user', 'scram_user', 'password_user', 'tls_user')",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_user_needs_tls_and_the_certificate_names_only_localhost() {
    if pg::skip_without_tls() {
        return;
    }
    let db = fresh_db("harness_tls").await;
    // tls_user may only come in over TLS.
    let err = pg::connect(&format!("{}?sslmode=disable", db.url_as("tls_user")))
        .await
        .expect_err("tls_user must be rejected without TLS");
    assert!(
        err.to_string().contains("pg_hba.conf") || err.as_db_error().is_some(),
        "unexpected error: {err}"
    );

    // With TLS: verify-ca passes; verify-full fails for 127.0.0.1 (the server
    // certificate names only localhost) and passes for localhost.
    let psql = cluster().bin("psql");
    if psql.is_file() {
        let run = |host: &str, mode: &str| {
            std::process::Command::new(&psql)
                .arg(format!(
                    "host={host} port={} dbname={} user=tls_user sslmode={mode} sslrootcert={}",
                    cluster().port(),
                    db.name(),
                    cluster().ca_path().display()
                ))
                .args([
                    "-XAtc",
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                ])
                .env("PGPASSWORD", password_for("tls_user"))
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        };
        let ok = run("127.0.0.1", "verify-ca");
        assert!(
            ok.status.success(),
            "verify-ca failed: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "t");
        let bad = run("127.0.0.1", "verify-full");
        assert!(!bad.status.success(), "verify-full on 127.0.0.1 must fail");
        let named = run("localhost", "verify-full");
        assert!(
            named.status.success(),
            "verify-full on localhost failed: {}",
            String::from_utf8_lossy(&named.stderr)
        );
    }
}

/// Whether an error chain contains an ECONNRESET.
fn is_reset(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionReset {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_cluster_restarts_and_stops() {
    let pg = pg::private_cluster();
    assert_ne!(pg.port(), cluster().port());
    let db = pg.fresh_db("harness_restart").await;
    db.exec("CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
        .await;
    let old = db.client().await;
    old.simple_query("SELECT 1").await.unwrap();
    pg.restart();
    assert!(
        old.simple_query("SELECT 1").await.is_err(),
        "connections must not survive a restart"
    );
    assert_eq!(db.query_i64("SELECT count(*) FROM t").await, 1);
    pg.stop_server();
    assert!(pg::connect(&db.url()).await.is_err());
    pg.start_server();
    assert_eq!(db.query_i64("SELECT count(*) FROM t").await, 1);
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// POSTs `body` with the contract's headers, minus `drop`, plus `extra`.
async fn post_with(
    rx: &Receiver,
    path: &str,
    body: &str,
    drop: &[&str],
    extra: &[(&str, &str)],
) -> Result<(u16, reqwest::header::HeaderMap, Value), reqwest::Error> {
    let mut headers = vec![
        ("x-conveyour-appkey", APPKEY),
        ("x-conveyour-token", TOKEN),
        ("content-type", "application/json"),
        ("accept", "application/json"),
    ];
    headers.retain(|(k, _)| !drop.contains(k));
    headers.extend_from_slice(extra);
    let mut req = http()
        .post(format!("{}{path}", rx.url()))
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, headers, json))
}

async fn post(rx: &Receiver, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, json) = post_with(rx, path, &body.to_string(), &[], &[])
        .await
        .expect("request failed");
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_accepts_the_contract_and_merges_traits() {
    let rx = receiver::start(APPKEY, TOKEN).await;
    let identify = json!([
        {"id": "20432766", "traits": {"first_name": "Jackie", "career_sales": 125000,
            "tags": {"add": ["a", "b"]}, "counter": {"$inc": 2}}},
        {"id": 20432721, "traits": {"first_name": "Charlie", "langs": ["en", "fr"], "gone": null}}
    ]);
    let (status, _, body) = post_with(
        &rx,
        IDENTIFY_PATH,
        &identify.to_string(),
        &[],
        &[("idempotency-key", "batch-1")],
    )
    .await
    .unwrap();
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let single = json!({"id": "20432766", "traits": {"first_name": "Jackie B",
        "tags": {"remove": ["a"], "add": ["c"]}, "counter": {"$inc": 3}}});
    assert_eq!(post(&rx, IDENTIFY_PATH, &single).await.0, 200);
    let track = json!({"id": "20432766", "events": [
        {"event": "purchased_item", "properties": {"amt": 39}},
        {"event": "logged_in"}
    ]});
    assert_eq!(
        post(&rx, TRACK_PATH, &track).await,
        (200, json!({"status": "ok"}))
    );
    let orphan = json!({"id": "nobody", "events": [{"event": "x", "properties": {}}]});
    assert_eq!(post(&rx, TRACK_PATH, &orphan).await.0, 200);

    let requests = rx.requests();
    assert_eq!(requests.len(), 4);
    assert!(requests
        .iter()
        .all(|r| r.accepted && r.response_status == 200));
    assert_eq!(requests[0].endpoint, IDENTIFY_PATH);
    assert_eq!(requests[0].body, identify);
    assert_eq!(requests[0].idempotency_key.as_deref(), Some("batch-1"));
    assert_eq!(requests[0].header("X-ConveYour-AppKey"), Some(APPKEY));
    assert_eq!(requests[1].idempotency_key, None);
    assert_eq!(rx.identifies().len(), 3);
    assert_eq!(rx.identifies()[1], identify[1]);

    let contacts = rx.contacts();
    assert_eq!(contacts.len(), 2);
    let jackie = Value::Object(contacts["20432766"].clone());
    assert_eq!(
        jackie,
        json!({"first_name": "Jackie B", "career_sales": 125000, "tags": ["b", "c"], "counter": 5})
    );
    let charlie = Value::Object(contacts["20432721"].clone());
    assert_eq!(
        charlie,
        json!({"first_name": "Charlie", "langs": ["en", "fr"], "gone": null})
    );
    assert_eq!(
        rx.tracks(),
        vec![
            ("20432766".to_string(), track["events"][0].clone()),
            ("20432766".to_string(), track["events"][1].clone()),
            ("nobody".to_string(), orphan["events"][0].clone()),
        ]
    );
    assert_eq!(
        rx.orphan_tracks(),
        vec![("nobody".to_string(), orphan["events"][0].clone())]
    );
    rx.wait_until("four requests", Duration::from_secs(1), |r| {
        r.request_count() == 4
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_rejects_contract_violations() {
    let rx = receiver::start(APPKEY, TOKEN).await;
    let good = json!({"id": "1", "traits": {"a": 1}}).to_string();
    let props: serde_json::Map<String, Value> =
        (0..16).map(|i| (format!("p{i}"), json!(i))).collect();
    let fifteen: serde_json::Map<String, Value> =
        (0..15).map(|i| (format!("p{i}"), json!(i))).collect();
    let too_many = json!({"id": "1", "events": [{"event": "e", "properties": props}]}).to_string();

    type Case<'a> = (
        &'a str,
        &'a str,
        String,
        Vec<&'a str>,
        Vec<(&'a str, &'a str)>,
        u16,
    );
    let cases: Vec<Case> = vec![
        (
            "no appkey",
            IDENTIFY_PATH,
            good.clone(),
            vec!["x-conveyour-appkey"],
            vec![],
            401,
        ),
        (
            "wrong appkey",
            IDENTIFY_PATH,
            good.clone(),
            vec!["x-conveyour-appkey"],
            vec![("x-conveyour-appkey", "nope")],
            401,
        ),
        (
            "wrong token",
            IDENTIFY_PATH,
            good.clone(),
            vec!["x-conveyour-token"],
            vec![("x-conveyour-token", "nope")],
            401,
        ),
        (
            "text/plain",
            IDENTIFY_PATH,
            good.clone(),
            vec!["content-type"],
            vec![("content-type", "text/plain")],
            415,
        ),
        (
            "no accept",
            IDENTIFY_PATH,
            good.clone(),
            vec!["accept"],
            vec![],
            406,
        ),
        (
            "wrong path",
            "/api/analytics/identify/",
            good.clone(),
            vec![],
            vec![],
            404,
        ),
        (
            "invalid json",
            IDENTIFY_PATH,
            "{\"id\": ".to_string(),
            vec![],
            vec![],
            400,
        ),
        ("16 properties", TRACK_PATH, too_many, vec![], vec![], 400),
        (
            "object trait",
            IDENTIFY_PATH,
            json!({"id": "1", "traits": {"addr": {"city": "X"}}}).to_string(),
            vec![],
            vec![],
            400,
        ),
        (
            "add+inc",
            IDENTIFY_PATH,
            json!({"id": "1", "traits": {"t": {"add": ["x"], "$inc": 1}}}).to_string(),
            vec![],
            vec![],
            400,
        ),
        (
            "unknown top-level key",
            IDENTIFY_PATH,
            json!({"id": "1", "traits": {}, "userId": "1"}).to_string(),
            vec![],
            vec![],
            400,
        ),
        (
            "unknown track key",
            TRACK_PATH,
            json!({"id": "1", "events": [{"event": "e"}], "ts": 1}).to_string(),
            vec![],
            vec![],
            400,
        ),
        (
            "empty array",
            IDENTIFY_PATH,
            "[]".to_string(),
            vec![],
            vec![],
            400,
        ),
        (
            "empty id",
            IDENTIFY_PATH,
            json!({"id": "", "traits": {}}).to_string(),
            vec![],
            vec![],
            400,
        ),
        (
            "missing traits",
            IDENTIFY_PATH,
            json!([{"id": "1"}]).to_string(),
            vec![],
            vec![],
            400,
        ),
        (
            "nested list",
            IDENTIFY_PATH,
            json!({"id": "1", "traits": {"l": [[1]]}}).to_string(),
            vec![],
            vec![],
            400,
        ),
        (
            "empty events",
            TRACK_PATH,
            json!({"id": "1", "events": []}).to_string(),
            vec![],
            vec![],
            400,
        ),
        (
            "empty event name",
            TRACK_PATH,
            json!({"id": "1", "events": [{"event": ""}]}).to_string(),
            vec![],
            vec![],
            400,
        ),
    ];
    for (what, path, body, drop, extra, expected) in &cases {
        let (status, _, reply) = post_with(&rx, path, body, drop, extra).await.unwrap();
        assert_eq!(status, *expected, "{what}: {reply}");
        assert_eq!(reply["status"], "error", "{what}: {reply}");
        assert!(reply["message"].is_string(), "{what}: {reply}");
    }
    let (status, _, reply) = post_with(
        &rx,
        TRACK_PATH,
        &json!({"id": "1", "events": [{"event": "e", "properties": props}]}).to_string(),
        &[],
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 400);
    assert_eq!(
        reply["message"],
        "event objects with more than 15 key/value pairs are blocked"
    );
    let wrong_method = http()
        .get(format!("{}{IDENTIFY_PATH}", rx.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status().as_u16(), 404);

    assert_eq!(
        rx.identify_count() + rx.track_count() + rx.contact_count(),
        0
    );
    assert_eq!(rx.rejected_count(), cases.len() + 2);
    assert!(rx.requests().iter().all(|r| !r.accepted));
    assert_eq!(
        rx.requests()[6].body,
        Value::String("{\"id\": ".to_string()),
        "invalid JSON is recorded raw"
    );

    // The limits are exactly at the boundary: 15 properties pass.
    let ok = json!({"id": "1", "events": [{"event": "e", "properties": fifteen}]});
    assert_eq!(post(&rx, TRACK_PATH, &ok).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_faults_behave() {
    let rx = receiver::start(APPKEY, TOKEN).await;
    let body = json!({"id": "f1", "traits": {"a": 1}});

    rx.set_fault(Fault::Status(503));
    for _ in 0..2 {
        assert_eq!(
            post(&rx, IDENTIFY_PATH, &body).await,
            (503, json!({"status": "error", "message": "injected"}))
        );
    }
    rx.clear_fault();
    assert_eq!(post(&rx, IDENTIFY_PATH, &body).await.0, 200);

    rx.set_fault(Fault::StatusTimes(500, 2));
    assert_eq!(post(&rx, IDENTIFY_PATH, &body).await.0, 500);
    assert_eq!(post(&rx, IDENTIFY_PATH, &body).await.0, 500);
    assert_eq!(post(&rx, IDENTIFY_PATH, &body).await.0, 200);
    assert_eq!(rx.fault(), None);

    rx.set_fault(Fault::TooManyRequests {
        retry_after_secs: 7,
    });
    let (status, headers, _) = post_with(&rx, IDENTIFY_PATH, &body.to_string(), &[], &[])
        .await
        .unwrap();
    assert_eq!(status, 429);
    assert_eq!(headers.get("retry-after").unwrap(), "7");

    rx.set_fault(Fault::BodyError);
    assert_eq!(
        post(&rx, IDENTIFY_PATH, &body).await,
        (200, json!({"status": "error", "message": "injected"}))
    );

    rx.set_fault(Fault::Slow(Duration::from_millis(400)));
    let started = Instant::now();
    assert_eq!(post(&rx, IDENTIFY_PATH, &body).await.0, 200);
    assert!(started.elapsed() >= Duration::from_millis(400));

    rx.set_fault(Fault::RejectId("bad".into()));
    let mixed = json!([{"id": "ok", "traits": {}}, {"id": "bad", "traits": {}}]);
    assert_eq!(post(&rx, IDENTIFY_PATH, &mixed).await.0, 400);
    let track_bad = json!({"id": "bad", "events": [{"event": "e"}]});
    assert_eq!(post(&rx, TRACK_PATH, &track_bad).await.0, 400);
    assert_eq!(post(&rx, IDENTIFY_PATH, &body).await.0, 200);

    rx.set_fault(Fault::Reset);
    let err = post_with(&rx, IDENTIFY_PATH, &body.to_string(), &[], &[])
        .await
        .expect_err("a reset connection must fail the request");
    assert!(is_reset(&err), "expected a connection reset, got {err:?}");

    // Outage: refused, then back on the same port.
    let port = rx.port();
    rx.set_fault(Fault::Outage);
    let err = post_with(&rx, IDENTIFY_PATH, &body.to_string(), &[], &[])
        .await
        .expect_err("an outage must refuse connections");
    assert!(err.is_connect(), "expected connection refused: {err:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    rx.clear_fault();
    assert_eq!(rx.port(), port);
    assert_eq!(post(&rx, IDENTIFY_PATH, &body).await.0, 200);

    // Faulted requests are recorded, never as accepted.
    let requests = rx.requests();
    let accepted: Vec<bool> = requests.iter().map(|r| r.accepted).collect();
    assert_eq!(
        accepted,
        vec![
            false, false, true, // Status
            false, false, true,  // StatusTimes
            false, // 429
            false, // body error
            true,  // slow
            false, false, true,  // reject id
            false, // reset
            true,  // after the outage
        ]
    );
    assert_eq!(requests[12].response_status, 0);
    assert_eq!(rx.identify_count(), 5);
}

/// POSTs `body` to `path` through `client`, with the contract's headers.
async fn post_via(
    client: &reqwest::Client,
    rx: &Receiver,
    path: &str,
    body: &Value,
) -> Result<reqwest::Response, reqwest::Error> {
    client
        .post(format!("{}{path}", rx.url()))
        .header("x-conveyour-appkey", APPKEY)
        .header("x-conveyour-token", TOKEN)
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(body.to_string())
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_rate_limit_answers_429_above_the_rate_and_accepts_after_the_window() {
    let rx = receiver::start(APPKEY, TOKEN).await;
    let body = json!({"id": "r1", "traits": {"a": 1}});
    // A burst of ten against five a second: five through, five refused.
    // Only a burst that fits in the one-second window says so; a machine
    // stalled past it gets another try.
    let mut tries = 0;
    loop {
        tries += 1;
        assert!(tries <= 5, "no burst of ten requests fit in a second");
        rx.set_fault(Fault::RateLimit {
            per_second: 5,
            retry_after_secs: 2,
        });
        rx.reset_records();
        let text = body.to_string();
        let started = Instant::now();
        let answers = futures_util::future::join_all(
            (0..10).map(|_| post_with(&rx, IDENTIFY_PATH, &text, &[], &[])),
        )
        .await;
        if started.elapsed() >= Duration::from_millis(900) {
            continue;
        }
        let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
        let refused: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 429).collect();
        assert_eq!(refused.len(), 5, "{}", rx.summary());
        assert_eq!(answers.iter().filter(|(s, _, _)| *s == 200).count(), 5);
        for (_, headers, json) in refused {
            assert_eq!(headers.get("retry-after").unwrap(), "2");
            assert_eq!(json["status"], "error");
            assert_eq!(
                json["message"],
                "rate limit: more than 5 requests in a second"
            );
        }
        assert_eq!(rx.throttled_count(), 5);
        assert_eq!(rx.identify_count(), 5, "a refused request is not applied");
        break;
    }
    // Once the window has passed, requests go through again, up to the rate.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post(&rx, IDENTIFY_PATH, &body).await.0, 200);
    assert_eq!(rx.throttled_count(), 5);
    assert_eq!(rx.identify_count(), 6);
}

/// What one request got: its status, `reset`, or another failure.
async fn outcome(rx: &Receiver, body: &Value) -> String {
    match post_with(rx, IDENTIFY_PATH, &body.to_string(), &[], &[]).await {
        Ok((429, headers, _)) => format!("429 retry-after {:?}", headers.get("retry-after")),
        Ok((status, _, _)) => status.to_string(),
        Err(e) if is_reset(&e) => "reset".to_string(),
        Err(e) => format!("failed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_chaos_is_deterministic_for_a_seed_and_injects_every_kind() {
    let rx = receiver::start(APPKEY, TOKEN).await;
    let body = json!({"id": "c1", "traits": {"a": 1}});
    let chaos = |seed| Fault::Chaos {
        seed,
        p_500: 0.15,
        p_503: 0.15,
        p_429: 0.15,
        p_reset: 0.15,
    };
    let mut runs = Vec::new();
    for seed in [7, 7, 8] {
        rx.set_fault(chaos(seed));
        let mut outcomes = Vec::new();
        for _ in 0..40 {
            outcomes.push(outcome(&rx, &body).await);
        }
        runs.push(outcomes);
    }
    assert_eq!(runs[0], runs[1], "the same seed, the same answers");
    assert_ne!(runs[0], runs[2], "another seed, other answers");
    for kind in ["200", "500", "503", "429 retry-after Some(\"1\")", "reset"] {
        assert!(
            runs[0].iter().any(|o| o == kind),
            "no {kind} in {:?}",
            runs[0]
        );
    }
    assert!(
        runs[0].iter().all(|o| !o.starts_with("failed")),
        "{:?}",
        runs[0]
    );
    // The receiver's records agree with what the client saw.
    let statuses: Vec<u16> = rx.requests()[..40]
        .iter()
        .map(|r| r.response_status)
        .collect();
    let seen: Vec<u16> = runs[0]
        .iter()
        .map(|o| match o.as_str() {
            "reset" => 0,
            o => o[..3].parse().unwrap(),
        })
        .collect();
    assert_eq!(statuses, seen);
    let ok = runs.iter().flatten().filter(|o| *o == "200").count();
    assert_eq!(rx.identify_count(), ok);
    assert_eq!(
        rx.throttled_count(),
        runs.iter()
            .flatten()
            .filter(|o| o.starts_with("429"))
            .count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_over_tls_speaks_http2_when_offered_and_http11_otherwise() {
    let rx = Receiver::start_tls(APPKEY, TOKEN).await;
    assert!(rx.url().starts_with("https://127.0.0.1:"), "{}", rx.url());
    let pem = rx.ca_pem().unwrap();
    assert_eq!(std::fs::read_to_string(rx.ca_file().unwrap()).unwrap(), pem);
    let ca = || reqwest::Certificate::from_pem(pem.as_bytes()).unwrap();
    let body = json!({"id": "t1", "traits": {"a": 1}});

    // Without the CA, the certificate is refused.
    let untrusting = reqwest::Client::new();
    let err = post_via(&untrusting, &rx, IDENTIFY_PATH, &body)
        .await
        .expect_err("a client without the test CA must refuse the certificate");
    assert!(
        format!("{err:?}").contains("UnknownIssuer"),
        "expected an unknown-issuer certificate error: {err:?}"
    );

    // Offering h2 (reqwest's default with ALPN): HTTP/2, several requests
    // at once on one connection.
    let h2 = reqwest::Client::builder()
        .add_root_certificate(ca())
        .build()
        .unwrap();
    let resp = post_via(&h2, &rx, IDENTIFY_PATH, &body).await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let answers =
        futures_util::future::join_all((0..20).map(|_| post_via(&h2, &rx, IDENTIFY_PATH, &body)))
            .await;
    for answer in answers {
        let answer = answer.unwrap();
        assert_eq!(
            (answer.version(), answer.status().as_u16()),
            (reqwest::Version::HTTP_2, 200)
        );
    }
    let requests = rx.requests();
    assert_eq!(requests.len(), 21, "{}", rx.summary());
    assert!(requests
        .iter()
        .all(|r| r.version == "HTTP/2.0" && r.accepted));
    let first = requests[0].connection;
    assert!(requests.iter().all(|r| r.connection == first));
    // The untrusting client's connection, and the h2 one.
    assert_eq!(rx.connection_count(), 2);

    // Offering only http/1.1: HTTP/1.1, kept alive.
    let h1 = reqwest::Client::builder()
        .add_root_certificate(ca())
        .http1_only()
        .build()
        .unwrap();
    rx.reset_records();
    for _ in 0..3 {
        let resp = post_via(&h1, &rx, IDENTIFY_PATH, &body).await.unwrap();
        assert_eq!(
            (resp.version(), resp.status().as_u16()),
            (reqwest::Version::HTTP_11, 200)
        );
        // Read to the end: only then does the connection go back to the
        // pool (a moment later, on another task).
        resp.bytes().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let requests = rx.requests();
    assert!(requests.iter().all(|r| r.version == "HTTP/1.1"));
    // Keep-alive: fewer connections than requests (a pooled connection
    // handed back late on a loaded machine may cost one more).
    assert!(
        rx.connection_count() < requests.len(),
        "keep-alive reuses the connection: {} connections for {} requests",
        rx.connection_count(),
        requests.len()
    );
    assert!(requests.iter().all(|r| r.connection > first));

    // The contract and the faults hold over TLS and HTTP/2 too.
    let wrong = h2
        .post(format!("{}{IDENTIFY_PATH}", rx.url()))
        .header("x-conveyour-appkey", APPKEY)
        .header("x-conveyour-token", "wrong")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    rx.set_fault(Fault::Status(503));
    let resp = post_via(&h2, &rx, IDENTIFY_PATH, &body).await.unwrap();
    assert_eq!(
        (resp.version(), resp.status().as_u16()),
        (reqwest::Version::HTTP_2, 503)
    );
    rx.set_fault(Fault::Reset);
    post_via(&h2, &rx, IDENTIFY_PATH, &body)
        .await
        .expect_err("a reset connection must fail the request");
    rx.clear_fault();
    let resp = post_via(&h2, &rx, IDENTIFY_PATH, &body).await.unwrap();
    assert_eq!(
        (resp.version(), resp.status().as_u16()),
        (reqwest::Version::HTTP_2, 200)
    );
    let last = rx.requests().last().cloned().unwrap();
    assert_eq!((last.version.as_str(), last.accepted), ("HTTP/2.0", true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_counts_connections_and_keep_alive_reuses_one() {
    let rx = receiver::start(APPKEY, TOKEN).await;
    let body = json!({"id": "k1", "traits": {"a": 1}});
    // A client keeping connections: ten requests in a row reuse them (a
    // pooled connection is sometimes returned a moment after its answer is
    // read, so the next request may open a second one).
    let keeping = reqwest::Client::new();
    for _ in 0..10 {
        let resp = post_via(&keeping, &rx, IDENTIFY_PATH, &body).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let kept = rx.connection_count();
    assert!(
        (1..=3).contains(&kept),
        "10 requests over {kept} connections"
    );
    // One that keeps none: a connection each.
    for _ in 0..3 {
        assert_eq!(post(&rx, IDENTIFY_PATH, &body).await.0, 200);
    }
    assert_eq!(rx.connection_count(), kept + 3);
    let connections: Vec<usize> = rx.requests().iter().map(|r| r.connection).collect();
    assert_eq!(connections.len(), 13);
    assert!(connections[..10].iter().all(|c| *c <= kept));
    assert_eq!(connections[10..], [kept + 1, kept + 2, kept + 3]);
    assert!(rx.requests().iter().all(|r| r.version == "HTTP/1.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_light_mode_still_counts_and_merges() {
    let rx = receiver::start(APPKEY, TOKEN).await;
    rx.set_keep_bodies(false);
    let batch: Vec<Value> = (0..500)
        .map(|i| json!({"id": i, "traits": {"n": i, "hits": {"$inc": 1}}}))
        .collect();
    for _ in 0..3 {
        assert_eq!(
            post(&rx, IDENTIFY_PATH, &Value::Array(batch.clone()))
                .await
                .0,
            200
        );
    }
    assert_eq!(rx.identify_count(), 1500);
    assert!(rx.identifies().is_empty());
    assert_eq!(rx.contact_count(), 500);
    assert_eq!(rx.contact("499").unwrap()["hits"], json!(3));
    assert!(rx.requests().iter().all(|r| r.accepted && r.body.is_null()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_runner_captures_and_kills() {
    use crate::support::connector::{run_cli, Connector};
    // Whatever the binary does with a nonsense config, it must end up dead
    // and its output must be readable.
    let c = Connector::spawn(&["run", "--config", "{config}"], "not: [yaml", &[]);
    assert!(c.pid() > 0);
    assert_eq!(
        std::fs::read_to_string(c.config_path()).unwrap(),
        "not: [yaml"
    );
    c.sigkill();
    let _status = c.wait(Duration::from_secs(10)).await;
    assert!(c.try_status().is_some());
    let _ = c.log();
    let (_status, _out, _err) = run_cli(&["check", "--config", "{config}"], "not: [yaml", &[]);
}
