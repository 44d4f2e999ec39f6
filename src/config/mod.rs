//! The connector's configuration: a YAML file, parsed into typed structs and
//! validated before anything connects.
//!
//! Every default is a named constant with the reason for its value. Every
//! validation error names the config key it is about, so an operator can go
//! straight to the line to fix.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use crate::sql::quote_ident;

mod ca_file;
mod conn_params;
mod settings;
mod tables;

pub use ca_file::CaFile;
pub use conn_params::{ConnParams, Host, SslMode, TargetSessionAttrs};
pub use settings::{load, Settings, SinkSettings};
pub use tables::{
    ColumnRole, ColumnUse, ContactSource, EventName, FieldMapping, FieldSource, IncrementBy,
    Lookup, MappingKind, NullPolicy, OnDelete, Operations, SnapshotPolicy, TableConfig,
    TableMapping, TimeFormat,
};

/// ConveYour refuses to store an event with more than this many key/value
/// pairs in its properties (the API contract's "15 key/value pairs").
pub const MAX_EVENT_PROPERTIES: usize = 15;

/// Slot name when none is given: one connector per database is the common
/// case, and a fixed name lets a restarted connector find its slot.
pub const DEFAULT_SLOT: &str = "conveyour_cdc";
/// Publication name when none is given, for the same reason as the slot.
pub const DEFAULT_PUBLICATION: &str = "conveyour_cdc";
/// Identify entries per request. ConveYour accepts arrays; 500 keeps a
/// request well under a megabyte for typical rosters while amortising the
/// round trip.
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// How long a change may wait for its batch to fill. 200 ms keeps
/// commit-to-ConveYour latency well inside the one-second promise.
pub const DEFAULT_BATCH_WAIT_MS: u64 = 200;
/// Longest a single HTTP request may take before it counts as failed and is
/// retried. ConveYour normally answers in well under a second.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// First retry delay after a transient failure.
pub const DEFAULT_MIN_BACKOFF_MS: u64 = 250;
/// Cap on the retry delay: long enough not to hammer a ConveYour outage,
/// short enough that recovery is noticed within half a minute.
pub const DEFAULT_MAX_BACKOFF_MS: u64 = 30_000;
/// How many times a 2xx reply whose body is not `"status":"ok"` is retried
/// before it counts as a rejection. Such replies are usually transient on
/// ConveYour's side, but a permanent one must not be retried forever.
pub const DEFAULT_BODY_ERROR_RETRIES: u32 = 3;
/// Time allowed on SIGTERM to finish in-flight requests. 25 s stays under
/// Kubernetes' default 30 s termination grace period.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 25_000;
/// Standby status updates are sent at least this often. Postgres drops a
/// walsender that is silent for `wal_sender_timeout` (60 s by default).
pub const DEFAULT_STATUS_INTERVAL_MS: u64 = 10_000;
/// Ceiling of requests in flight at once (adaptive concurrency finds the
/// limit below it). Sales spread over many reps need about one track
/// request per sale; at ConveYour's 50-150 ms round trip, 64 in flight is
/// 400-1,300 requests/s, more than an account's rate limit is likely to
/// allow, so the limit is found by ConveYour's answers rather than capped
/// here; and 64 connections is little for either end. It also bounds what
/// repeats after a crash: `max_in_flight × batch_size` actions.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Largest `conveyour.max_in_flight` accepted.
pub const MAX_IN_FLIGHT_CEILING: usize = 256;
/// Warn when the slot holds more WAL than this (MiB): 1 GiB is well past a
/// healthy backlog and well before a typical disk fills.
pub const DEFAULT_RETAINED_WAL_WARN_MB: u64 = 1024;
/// Environment variable that overrides `conveyour.appkey`.
pub const APPKEY_ENV: &str = "CONVEYOUR_APPKEY";
/// Environment variable that overrides `conveyour.token`.
pub const TOKEN_ENV: &str = "CONVEYOUR_TOKEN";
/// Environment variable that supplies the database password when the URL
/// has none, as libpq does.
pub const PGPASSWORD_ENV: &str = "PGPASSWORD";

/// A credential. Its `Debug` and `Display` never show the value, so it
/// cannot leak through logs, error messages or `{:?}` of a config struct.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The whole file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub conveyour: ConveyourConfig,
    pub tables: Vec<TableConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub dead_letters: DeadLettersConfig,
}

/// How often the running connector retries stored dead letters at first:
/// five minutes lets a fixed cause (a ConveYour field's type, a row's
/// missing email) heal without an operator, while an entry that keeps
/// failing costs one request per retry, and the wait doubles per failure
/// up to [`DEAD_LETTER_RETRY_MAX_MS`].
pub const DEFAULT_DEAD_LETTER_RETRY_EVERY_MS: u64 = 300_000;
/// The longest wait between automatic retries of one dead letter: an entry
/// failing for days is tried four times a day, not every few minutes.
pub const DEAD_LETTER_RETRY_MAX_MS: u64 = 6 * 3_600_000;

/// `dead_letters:` — automatic retries of stored dead letters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLettersConfig {
    /// First wait before an entry is retried (doubling per failed retry);
    /// 0 turns automatic retries off (`dead-letters retry` still works).
    #[serde(default = "default_dead_letter_retry_every_ms")]
    pub retry_every_ms: u64,
}

impl Default for DeadLettersConfig {
    fn default() -> Self {
        DeadLettersConfig {
            retry_every_ms: DEFAULT_DEAD_LETTER_RETRY_EVERY_MS,
        }
    }
}

fn default_dead_letter_retry_every_ms() -> u64 {
    DEFAULT_DEAD_LETTER_RETRY_EVERY_MS
}

/// Rows read per chunk of the initial sync or a resync. 2,000 rows make
/// four full identify requests at the default batch size, so the few
/// chunks in flight keep many requests busy, while a crash resends at most
/// this many rows per chunk in flight.
pub const DEFAULT_SYNC_CHUNK_ROWS: usize = 2_000;

/// `sync:` — how existing rows are copied.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    #[serde(default = "default_sync_chunk_rows")]
    pub chunk_rows: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            chunk_rows: DEFAULT_SYNC_CHUNK_ROWS,
        }
    }
}

fn default_sync_chunk_rows() -> usize {
    DEFAULT_SYNC_CHUNK_ROWS
}

/// Where Prometheus metrics and health checks are served. The default
/// listens on every interface so a scraper and kubelet probes reach it in
/// a pod.
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9187";

/// `metrics:` — the HTTP listener for `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_listen() -> String {
    DEFAULT_METRICS_LISTEN.to_owned()
}

/// `postgres:` — the source database.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user[:password]@host[:port]/dbname[?sslmode=...]`.
    pub url: Secret,
    #[serde(default = "default_slot")]
    pub slot: String,
    #[serde(default = "default_publication")]
    pub publication: String,
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    #[serde(default = "default_retained_wal_warn_mb")]
    pub retained_wal_warn_mb: u64,
    /// Whether the slot is a failover slot (PostgreSQL 17+), synchronized
    /// to physical standbys that have slot sync on. Unset: yes on 17 and
    /// later, since a slot that only the primary holds is lost, with its
    /// position, when a standby is promoted; `false` keeps the slot on the
    /// primary only (no standby carries it, and the primary does not wait
    /// for `synchronized_standby_slots` before sending changes).
    #[serde(default)]
    pub failover_slot: Option<bool>,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &"[redacted]")
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("status_interval_ms", &self.status_interval_ms)
            .field("retained_wal_warn_mb", &self.retained_wal_warn_mb)
            .field("failover_slot", &self.failover_slot)
            .finish()
    }
}

/// `conveyour:` — where changes go and how they are batched and retried.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConveyourConfig {
    /// Base URL; `/api/analytics/identify` and `/api/analytics/track` are
    /// appended.
    pub url: String,
    #[serde(default)]
    pub appkey: Option<Secret>,
    #[serde(default)]
    pub token: Option<Secret>,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_batch_wait_ms")]
    pub batch_wait_ms: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_min_backoff_ms")]
    pub min_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    #[serde(default = "default_body_error_retries")]
    pub body_error_retries: u32,
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// `adaptive` (find the limit up to `max_in_flight`) or `fixed` (always
    /// `max_in_flight`, for an API contract that names a concurrency).
    #[serde(default)]
    pub concurrency: Concurrency,
    /// Requests per second toward ConveYour at most; unset means no ceiling.
    #[serde(default)]
    pub max_requests_per_second: Option<f64>,
    #[serde(default)]
    pub on_reject: OnReject,
    /// What to do with a row the mapping cannot turn into an entry.
    #[serde(default)]
    pub on_unmappable: OnUnmappable,
    /// Fold a contact's identifies within one batch into one entry.
    #[serde(default)]
    pub coalesce: bool,
    /// A PEM file of extra root certificates to trust for ConveYour (a
    /// TLS-inspecting proxy's CA, a private endpoint's), besides the
    /// built-in ones.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// How many requests go to ConveYour at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Concurrency {
    /// Start at one and find the limit from ConveYour's answers (AIMD),
    /// never above `max_in_flight`.
    #[default]
    Adaptive,
    /// Always `max_in_flight`.
    Fixed,
}

/// What to do with entries ConveYour rejects for good.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnReject {
    /// Store them in the dead-letter table and go on.
    #[default]
    DeadLetter,
    /// Stop the connector without advancing past them.
    Stop,
}

/// What to do with a row the mapping cannot send: its contact id is NULL
/// or empty, or a value does not convert. A table whose shape no longer
/// fits the mapping (a mapped column dropped or retyped) stops the
/// connector whatever this says: that is no row's fault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnmappable {
    /// Store the row's key as a dead letter (reason `unmappable`) and go
    /// on; a retry reads the row again.
    #[default]
    DeadLetter,
    /// Stop the connector at the row without advancing past it.
    Stop,
}

fn default_slot() -> String {
    DEFAULT_SLOT.to_owned()
}
fn default_publication() -> String {
    DEFAULT_PUBLICATION.to_owned()
}
fn default_status_interval_ms() -> u64 {
    DEFAULT_STATUS_INTERVAL_MS
}
fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}
fn default_batch_wait_ms() -> u64 {
    DEFAULT_BATCH_WAIT_MS
}
fn default_request_timeout_ms() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_MS
}
fn default_min_backoff_ms() -> u64 {
    DEFAULT_MIN_BACKOFF_MS
}
fn default_max_backoff_ms() -> u64 {
    DEFAULT_MAX_BACKOFF_MS
}
fn default_body_error_retries() -> u32 {
    DEFAULT_BODY_ERROR_RETRIES
}
fn default_shutdown_grace_ms() -> u64 {
    DEFAULT_SHUTDOWN_GRACE_MS
}
fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT
}
fn default_retained_wal_warn_mb() -> u64 {
    DEFAULT_RETAINED_WAL_WARN_MB
}

/// A config that cannot be used, with the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key, e.g. `tables[1].track.properties`, or the file for errors
    /// that are not about one key.
    pub field: String,
    pub problem: String,
    pub kind: ConfigErrorKind,
}

/// What is wrong with the config, which decides the operator's hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// A key's value (or a key itself) is wrong; `field` names it.
    Key,
    /// The file is not there or cannot be read; `field` is its path.
    File,
    /// The file is not valid YAML; `problem` names the line and column.
    Syntax,
}

impl ConfigError {
    /// A wrong value at `field`, found outside config loading (by the
    /// layer that uses the value).
    pub(crate) fn key(field: impl Into<String>, problem: impl Into<String>) -> Self {
        err(field, problem)
    }

    /// What the operator should do.
    pub fn hint(&self) -> &'static str {
        match self.kind {
            ConfigErrorKind::Key => "fix the config key named above; nothing was connected",
            ConfigErrorKind::File => "pass the config file's path with --config; nothing was connected",
            ConfigErrorKind::Syntax => "fix the YAML at the line and column named above (indentation, a missing colon, an unclosed quote or bracket); nothing was connected",
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            // The problem names the file itself.
            ConfigErrorKind::File => f.write_str(&self.problem),
            _ => write!(f, "config {}: {}", self.field, self.problem),
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        problem: problem.into(),
        kind: ConfigErrorKind::Key,
    }
}

/// A table's schema-qualified name, as the catalog spells it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` or `table` (schema `public`). Names are taken
    /// literally, as stored in the catalog (no quote folding).
    pub fn parse(text: &str) -> Option<TableName> {
        let valid = |s: &str| !s.is_empty() && !s.contains('"') && s.trim() == s;
        match text.split_once('.') {
            Some((schema, name)) if valid(schema) && valid(name) && !name.contains('.') => {
                Some(TableName {
                    schema: schema.to_owned(),
                    name: name.to_owned(),
                })
            }
            None if valid(text) => Some(TableName {
                schema: "public".to_owned(),
                name: text.to_owned(),
            }),
            _ => None,
        }
    }

    /// The name quoted for use in SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// What the name of the insert-only publication (for insert-only tables
/// without a usable replica identity) adds to `postgres.publication`.
pub const INSERT_PUBLICATION_SUFFIX: &str = "_inserts";

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    const GOOD: &str = r#"
postgres:
  url: postgres://cdc:hunter2@127.0.0.1:5432/app
  slot: conveyour_cdc
  publication: conveyour_cdc
conveyour:
  url: https://acme.conveyour.com
  appkey: file-appkey
  token: file-token
  batch_size: 500
  batch_wait_ms: 200
tables:
  - table: public.employees
    identify:
      id: email
      traits: {first_name: first_name, last_name: last_name, career_sales: career_sales}
  - table: public.sales
    track:
      id: employee_email
      event: made_sale
      properties: {amount: amount, customer: customer}
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn validate(yaml: &str) -> Result<Settings, ConfigError> {
        Config::from_yaml(yaml)?.validate(&no_env)
    }

    #[test]
    fn a_lookup_disagreeing_with_the_identify_id_names_both_keys_and_copies_neither() {
        let yaml = GOOD.replace("id: email", "id: e_mail").replace(
            "id: employee_email",
            "id: {from: public.employees, key: employee_id, column: email}",
        );
        let e = validate(&yaml).unwrap_err();
        assert_eq!(e.field, "tables[1].track.id.column");
        assert_eq!(
            e.problem,
            "is `email`, but tables[0].identify.id is `e_mail`; both must name the same column of public.employees (ConveYour files events under the contact whose identify id they carry): correct whichever of the two is not the column holding the contact id"
        );
        assert!(!e.problem.contains("use column: e_mail"), "{e}");
    }

    #[test]
    fn yaml_syntax_errors_are_not_key_errors() {
        let e = Config::from_yaml("postgres:\n  url: x\n  slot: [a\n").unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::Syntax);
        assert!(e.problem.starts_with("line "), "{e}");
        assert!(e.hint().contains("fix the YAML"), "{}", e.hint());
        // A wrong key is still a key error.
        let e = Config::from_yaml("postgres: {url: x, colour: blue}\n").unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::Key);
        assert!(e.hint().contains("config key"));
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let path = Path::new("/nonexistent-dir/conveyour.yaml");
        let e = Config::from_file(path).unwrap_err();
        assert_eq!(e.kind, ConfigErrorKind::File);
        assert_eq!(
            e.to_string(),
            "no config file at /nonexistent-dir/conveyour.yaml"
        );
        assert!(e.hint().contains("--config"));
    }

    #[test]
    fn the_documented_example_parses() {
        let s = validate(GOOD).unwrap();
        assert_eq!(s.slot, "conveyour_cdc");
        assert_eq!(s.conveyour.batch_size, 500);
        assert_eq!(s.conveyour.batch_wait, Duration::from_millis(200));
        assert_eq!(s.conveyour.url, "https://acme.conveyour.com");
        assert_eq!(s.tables.len(), 2);
        assert_eq!(s.tables[1].table.to_string(), "public.sales");
        match &s.tables[1].kind {
            MappingKind::Track { event, .. } => {
                assert_eq!(event, &EventName::Fixed("made_sale".into()));
                assert_eq!(s.tables[1].fields.len(), 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_apply() {
        let yaml = r#"
postgres: {url: "postgres://cdc@db/app"}
conveyour: {url: "https://acme.conveyour.com", appkey: k, token: t}
tables: [{table: employees, identify: {id: email}}]
"#;
        let s = validate(yaml).unwrap();
        assert_eq!(s.slot, DEFAULT_SLOT);
        assert_eq!(s.publication, DEFAULT_PUBLICATION);
        assert_eq!(s.conveyour.batch_size, DEFAULT_BATCH_SIZE);
        assert_eq!(
            s.conveyour.batch_wait,
            Duration::from_millis(DEFAULT_BATCH_WAIT_MS)
        );
        assert_eq!(
            s.conveyour.shutdown_grace,
            Duration::from_millis(DEFAULT_SHUTDOWN_GRACE_MS)
        );
        assert_eq!(s.tables[0].table.schema, "public");
    }

    #[test]
    fn environment_wins_over_the_file_for_credentials() {
        let env = |name: &str| match name {
            APPKEY_ENV => Some("env-appkey".to_owned()),
            TOKEN_ENV => Some("env-token".to_owned()),
            _ => None,
        };
        let s = Config::from_yaml(GOOD).unwrap().validate(&env).unwrap();
        assert_eq!(s.conveyour.appkey.expose(), "env-appkey");
        assert_eq!(s.conveyour.token.expose(), "env-token");
        let s = validate(GOOD).unwrap();
        assert_eq!(s.conveyour.appkey.expose(), "file-appkey");
    }

    #[test]
    fn a_credential_that_cannot_go_in_a_header_is_refused_without_showing_it() {
        let env = |name: &str| match name {
            APPKEY_ENV => Some("s3cr3t-key\n".to_owned()),
            _ => None,
        };
        let e = Config::from_yaml(GOOD)
            .unwrap()
            .validate(&env)
            .expect_err("a newline cannot go in a header");
        let text = e.to_string();
        assert_eq!(e.field, "conveyour.appkey");
        assert!(
            text.contains(&format!("(from {APPKEY_ENV})")) && text.contains("line break"),
            "{text}"
        );
        assert!(!text.contains("s3cr3t"), "the secret leaked: {text}");
        expect_error(
            &GOOD.replace("token: file-token", "token: café"),
            "conveyour.token",
            "outside ASCII",
        );
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let config = Config::from_yaml(GOOD).unwrap();
        let settings = config.validate(&no_env).unwrap();
        let text = format!("{config:?} {settings:?}");
        for secret in ["hunter2", "file-appkey", "file-token"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }

    fn expect_error(yaml: &str, field: &str, needle: &str) {
        let e = validate(yaml).expect_err("config should be refused");
        assert!(
            e.field.contains(field) && e.to_string().contains(needle),
            "expected field {field} and `{needle}`, got: {e}"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        expect_error(
            &GOOD.replace("batch_wait_ms: 200", "batch_wait_ms: 200\n  batch_wiat: 1"),
            "conveyour",
            "batch_wiat",
        );
        expect_error(
            &GOOD.replace("event: made_sale", "event: made_sale\n      evnt: x"),
            "tables[1].track",
            "evnt",
        );
        expect_error(&format!("{GOOD}\nextra: 1\n"), "", "extra");
    }

    #[test]
    fn missing_required_keys_are_named() {
        expect_error(
            &GOOD.replace("  url: https://acme.conveyour.com\n", ""),
            "conveyour",
            "url",
        );
        expect_error(
            &GOOD.replace("      id: email\n", ""),
            "tables[0].identify",
            "id",
        );
        expect_error(
            &GOOD.replace("      event: made_sale\n", ""),
            "tables[1].track",
            "event",
        );
        expect_error(
            &GOOD.replace("  appkey: file-appkey\n", ""),
            "conveyour.appkey",
            "CONVEYOUR_APPKEY",
        );
        expect_error(
            &GOOD.replace("  token: file-token\n", ""),
            "conveyour.token",
            "CONVEYOUR_TOKEN",
        );
    }

    #[test]
    fn a_publication_name_leaves_room_for_the_insert_only_one() {
        let long = "p".repeat(56);
        let yaml = GOOD.replace(
            "publication: conveyour_cdc",
            &format!("publication: {long}"),
        );
        expect_error(&yaml, "postgres.publication", "at most 55 characters");
        let yaml = GOOD.replace(
            "publication: conveyour_cdc",
            &format!("publication: {}", &long[1..]),
        );
        assert!(Config::from_yaml(&yaml)
            .unwrap()
            .validate(&|_| None)
            .is_ok());
    }

    #[test]
    fn a_table_mapped_twice_is_refused() {
        let yaml = GOOD.replace("table: public.sales", "table: employees");
        expect_error(&yaml, "tables[1].table", "already mapped at tables[0]");
    }

    #[test]
    fn more_than_fifteen_properties_is_refused() {
        let props: Vec<String> = (0..16).map(|i| format!("p{i}: c{i}")).collect();
        let yaml = GOOD.replace(
            "properties: {amount: amount, customer: customer}",
            &format!("properties: {{{}}}", props.join(", ")),
        );
        expect_error(&yaml, "tables[1].track.properties", "16 properties");
        let props: Vec<String> = (0..15).map(|i| format!("p{i}: c{i}")).collect();
        let yaml = GOOD.replace(
            "properties: {amount: amount, customer: customer}",
            &format!("properties: {{{}}}", props.join(", ")),
        );
        validate(&yaml).unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        expect_error(
            &GOOD.replace("batch_size: 500", "batch_size: 0"),
            "conveyour.batch_size",
            "between",
        );
        expect_error(
            &GOOD.replace("batch_size: 500", "batch_size: many"),
            "conveyour.batch_size",
            "invalid",
        );
        expect_error(
            &GOOD.replace("slot: conveyour_cdc", "slot: Bad-Slot"),
            "postgres.slot",
            "lower-case",
        );
        expect_error(
            &GOOD.replace("https://acme.conveyour.com", "acme.conveyour.com"),
            "conveyour.url",
            "not an http(s) URL",
        );
        expect_error(
            &GOOD.replace("postgres://", "mysql://"),
            "postgres.url",
            "scheme",
        );
        expect_error(
            &GOOD.replace("table: public.sales", "table: a.b.c"),
            "tables[1].table",
            "schema.table",
        );
        let both = GOOD.replace(
            "    track:\n      id: employee_email",
            "    identify: {id: x}\n    track:\n      id: employee_email",
        );
        expect_error(&both, "tables[1]", "either identify or track");
        expect_error(
            &GOOD.replace("    track:\n      id: employee_email\n      event: made_sale\n      properties: {amount: amount, customer: customer}\n", ""),
            "tables[1]",
            "missing identify or track",
        );
        expect_error("tables: [", "", "");
    }

    #[test]
    fn a_url_ending_in_the_api_path_is_refused_with_the_base_url() {
        for (given, base) in [
            (
                "https://acme.conveyour.com/api/analytics",
                "https://acme.conveyour.com",
            ),
            (
                "https://acme.conveyour.com/api/analytics/",
                "https://acme.conveyour.com",
            ),
            (
                "https://acme.conveyour.com/API/Analytics",
                "https://acme.conveyour.com",
            ),
            (
                "https://acme.conveyour.com/api/analytics/identify",
                "https://acme.conveyour.com",
            ),
            (
                "https://acme.conveyour.com/api/analytics/track/",
                "https://acme.conveyour.com",
            ),
            ("http://proxy:8080/cy/api/analytics", "http://proxy:8080/cy"),
        ] {
            expect_error(
                &GOOD.replace("https://acme.conveyour.com", given),
                "conveyour.url",
                &format!("set it to the account's base URL: {base}"),
            );
        }
        for fine in [
            "https://acme.conveyour.com/",
            "http://proxy:8080/cy",
            "https://acme.conveyour.com/api",
            "https://acme.conveyour.com/analytics",
            "https://acme.conveyour.com/api/analytics/v2",
        ] {
            let s = validate(&GOOD.replace("https://acme.conveyour.com", fine)).unwrap();
            assert_eq!(s.conveyour.url, fine.trim_end_matches('/'));
        }
    }

    /// A file of its own under the temporary directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> TempFile {
            let path = std::env::temp_dir().join(format!(
                "conveyour-cdc-config-{}-{name}",
                std::process::id()
            ));
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn with_ca_file(path: &Path) -> String {
        GOOD.replace(
            "  batch_wait_ms: 200\n",
            &format!("  batch_wait_ms: 200\n  ca_file: {}\n", path.display()),
        )
    }

    #[test]
    fn a_ca_file_is_read_at_load_and_its_certificates_kept() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let file = TempFile::new("good-ca.pem", ca.pem().as_bytes());
        let s = validate(&with_ca_file(&file.0)).unwrap();
        let ca_file = s.conveyour.ca_file.expect("ca_file kept");
        assert_eq!(ca_file.path(), file.0);
        assert_eq!(
            ca_file.certificates().collect::<Vec<_>>(),
            vec![ca.der().as_ref()]
        );
        assert!(
            format!("{ca_file:?}").ends_with("certificates: 1 }"),
            "{ca_file:?}"
        );
        assert!(validate(GOOD).unwrap().conveyour.ca_file.is_none());
    }

    #[test]
    fn a_bad_ca_file_is_refused_with_what_to_give_instead() {
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let missing = std::env::temp_dir().join("conveyour-cdc-no-such-ca.pem");
        let der = TempFile::new("ca.der", ca.der());
        let key_only = TempFile::new("key.pem", key.serialize_pem().as_bytes());
        let truncated = TempFile::new("truncated.pem", &ca.pem().as_bytes()[..ca.pem().len() - 30]);
        let not_x509 = TempFile::new(
            "not-x509.pem",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        );
        for (path, needle) in [
            (missing.as_path(), "cannot read"),
            (der.0.as_path(), "is not a PEM file"),
            (
                key_only.0.as_path(),
                "holds no certificate (only PrivateKey); give the CA's certificate",
            ),
            (truncated.0.as_path(), "is not valid PEM"),
            (
                not_x509.0.as_path(),
                "certificate 1 of 1 is not a usable X.509 certificate",
            ),
        ] {
            let e = validate(&with_ca_file(path)).unwrap_err();
            assert_eq!(e.field, "conveyour.ca_file", "{e}");
            assert_eq!(e.kind, ConfigErrorKind::Key, "{e}");
            assert!(e.problem.contains(needle), "expected `{needle}` in: {e}");
            assert!(
                e.problem.contains(&path.display().to_string()),
                "the file is named: {e}"
            );
        }
    }

    #[test]
    fn a_bad_postgres_url_does_not_echo_the_password() {
        let e = validate(&GOOD.replace("/app", "/app?sslmode=bogus")).unwrap_err();
        assert_eq!(e.field, "postgres.url");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
