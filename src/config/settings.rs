//! The validated configuration ([`Settings`]) the connector runs with,
//! and the checks between the file as written and it.

use super::{
    err, tables, CaFile, Concurrency, Config, ConfigError, ConfigErrorKind, ConnParams,
    ContactSource, MappingKind, OnReject, OnUnmappable, Secret, TableMapping, TableName,
    APPKEY_ENV, DEAD_LETTER_RETRY_MAX_MS, INSERT_PUBLICATION_SUFFIX, MAX_IN_FLIGHT_CEILING,
    PGPASSWORD_ENV, TOKEN_ENV,
};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// Everything the connector needs, validated: credentials resolved, names
/// parsed, limits checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub postgres: ConnParams,
    pub slot: String,
    pub publication: String,
    pub status_interval: Duration,
    pub retained_wal_warn_bytes: u64,
    /// `postgres.failover_slot`; None: a failover slot on PostgreSQL 17+.
    pub failover_slot: Option<bool>,
    pub conveyour: SinkSettings,
    pub tables: Vec<TableMapping>,
    /// `host:port` for the metrics and health listener.
    pub metrics_listen: String,
    /// Rows per chunk of the initial sync and resyncs.
    pub sync_chunk_rows: usize,
    /// First wait before the running connector retries a dead letter
    /// (doubling per failure); None when automatic retries are off.
    pub dead_letter_retry_every: Option<Duration>,
}

impl Settings {
    /// Every table the publication must hold: the mapped ones, then the
    /// related tables lookups read (their changes keep the lookup cache
    /// fresh), each once.
    pub fn published_tables(&self) -> Vec<&TableName> {
        let mut out: Vec<&TableName> = self.tables.iter().map(|t| &t.table).collect();
        for t in &self.tables {
            if let ContactSource::Lookup(l) = &t.contact {
                if !out.contains(&&l.from) {
                    out.push(&l.from);
                }
            }
        }
        out
    }
}

/// Validated `conveyour:` settings.
#[derive(Debug, Clone)]
pub struct SinkSettings {
    pub url: String,
    pub appkey: Secret,
    pub token: Secret,
    pub batch_size: usize,
    pub batch_wait: Duration,
    pub request_timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub body_error_retries: u32,
    pub shutdown_grace: Duration,
    pub max_in_flight: usize,
    pub concurrency: Concurrency,
    pub max_requests_per_second: Option<f64>,
    pub on_reject: OnReject,
    pub on_unmappable: OnUnmappable,
    pub coalesce: bool,
    /// Extra root certificates from `conveyour.ca_file`, already checked.
    pub ca_file: Option<CaFile>,
}

impl Config {
    /// Reads and parses a config file; unknown keys and type errors name the
    /// key and the line.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            field: path.display().to_string(),
            problem: match e.kind() {
                std::io::ErrorKind::NotFound => match std::env::current_dir() {
                    Ok(dir) if path.is_relative() => format!(
                        "no config file at {} (relative to {})",
                        path.display(),
                        dir.display()
                    ),
                    _ => format!("no config file at {}", path.display()),
                },
                _ => format!("cannot read config file {}: {e}", path.display()),
            },
            kind: ConfigErrorKind::File,
        })?;
        Config::from_yaml(&text).map_err(|mut e| {
            if e.field.is_empty() {
                e.field = path.display().to_string();
            }
            e
        })
    }

    /// Parses YAML text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        // Text that is not YAML at all fails here, before any key is
        // looked at, so its error is not mistaken for a key's.
        if let Err(e) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
            let at = e
                .location()
                .map(|l| format!("line {}, column {}: ", l.line(), l.column()))
                .unwrap_or_default();
            return Err(ConfigError {
                field: String::new(),
                problem: format!("{at}not valid YAML ({e})"),
                kind: ConfigErrorKind::Syntax,
            });
        }
        serde_yaml_ng::from_str(text).map_err(|e| {
            // serde_yaml_ng puts the key path first ("tables[0].track: ...").
            let message = e.to_string();
            match message.split_once(": ") {
                Some((path, rest)) if !path.contains(' ') => err(path, rest),
                _ => err("", message),
            }
        })
    }

    /// Checks everything that can be checked without connecting and
    /// resolves credentials from the environment (env wins over the file).
    pub fn validate(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let pg = &self.postgres;
        let postgres = ConnParams::from_url(pg.url.expose(), env(PGPASSWORD_ENV))
            .map_err(|problem| err("postgres.url", problem))?;
        check_name("postgres.slot", &pg.slot, true)?;
        check_name("postgres.publication", &pg.publication, false)?;
        if pg.publication.len() + INSERT_PUBLICATION_SUFFIX.len() > 63 {
            return Err(err(
                "postgres.publication",
                format!(
                    "must be at most {} characters: the insert-only publication beside it is named `{}{INSERT_PUBLICATION_SUFFIX}`",
                    63 - INSERT_PUBLICATION_SUFFIX.len(),
                    pg.publication
                ),
            ));
        }
        if pg.status_interval_ms == 0 || pg.status_interval_ms > 30_000 {
            return Err(err(
                "postgres.status_interval_ms",
                "must be between 1 and 30000 (Postgres drops a silent client after wal_sender_timeout)",
            ));
        }

        let cy = &self.conveyour;
        let url = cy.url.trim_end_matches('/').to_owned();
        match url::Url::parse(&url) {
            Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {
                if u.query().is_some() || !u.username().is_empty() || u.password().is_some() {
                    return Err(err(
                        "conveyour.url",
                        "give only the base URL (scheme, host, port, path); credentials go in appkey and token",
                    ));
                }
                if let Some(base) = without_api_path(&u) {
                    return Err(err(
                        "conveyour.url",
                        format!("`{url}` ends in ConveYour's API path, which the connector appends itself (requests would go to {url}/api/analytics/identify); set it to the account's base URL: {base}"),
                    ));
                }
            }
            _ => {
                return Err(err(
                    "conveyour.url",
                    format!("`{url}` is not an http(s) URL such as https://acme.conveyour.com"),
                ))
            }
        }
        let appkey = credential(env(APPKEY_ENV), &cy.appkey, "conveyour.appkey", APPKEY_ENV)?;
        let token = credential(env(TOKEN_ENV), &cy.token, "conveyour.token", TOKEN_ENV)?;
        if cy.batch_size == 0 || cy.batch_size > 10_000 {
            return Err(err("conveyour.batch_size", "must be between 1 and 10000"));
        }
        if cy.batch_wait_ms > 60_000 {
            return Err(err("conveyour.batch_wait_ms", "must be at most 60000"));
        }
        if cy.request_timeout_ms == 0 {
            return Err(err(
                "conveyour.request_timeout_ms",
                "must be greater than 0",
            ));
        }
        if cy.min_backoff_ms == 0 {
            return Err(err("conveyour.min_backoff_ms", "must be greater than 0"));
        }
        if cy.max_backoff_ms > 3_600_000 {
            return Err(err(
                "conveyour.max_backoff_ms",
                "must be at most 3600000 (an hour)",
            ));
        }
        if cy.max_backoff_ms < cy.min_backoff_ms {
            return Err(err(
                "conveyour.max_backoff_ms",
                "must be at least conveyour.min_backoff_ms",
            ));
        }

        if cy.max_in_flight == 0 || cy.max_in_flight > MAX_IN_FLIGHT_CEILING {
            return Err(err(
                "conveyour.max_in_flight",
                format!("must be between 1 and {MAX_IN_FLIGHT_CEILING}"),
            ));
        }
        if let Some(r) = cy.max_requests_per_second {
            if !(r > 0.0 && r.is_finite()) {
                return Err(err(
                    "conveyour.max_requests_per_second",
                    "must be a positive number",
                ));
            }
        }
        let ca_file = match &cy.ca_file {
            Some(path) => {
                Some(CaFile::read(path).map_err(|problem| err("conveyour.ca_file", problem))?)
            }
            None => None,
        };
        if self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(err(
                "metrics.listen",
                format!(
                    "`{}` is not an address such as 0.0.0.0:9187",
                    self.metrics.listen
                ),
            ));
        }
        if self.sync.chunk_rows == 0 || self.sync.chunk_rows > 100_000 {
            return Err(err("sync.chunk_rows", "must be between 1 and 100000"));
        }
        if self.dead_letters.retry_every_ms > DEAD_LETTER_RETRY_MAX_MS {
            return Err(err(
                "dead_letters.retry_every_ms",
                "must be at most 21600000 (six hours); 0 turns automatic retries off",
            ));
        }
        if self.tables.is_empty() {
            return Err(err("tables", "map at least one table"));
        }
        let mut seen: HashMap<TableName, String> = HashMap::new();
        let mut tables = Vec::with_capacity(self.tables.len());
        for (i, t) in self.tables.iter().enumerate() {
            let key = format!("tables[{i}]");
            let mapping = tables::validate_table(&key, t)?;
            if let Some(first) = seen.get(&mapping.table) {
                return Err(err(
                    format!("{key}.table"),
                    format!(
                        "{} is already mapped at {first}; map each table once",
                        mapping.table
                    ),
                ));
            }
            seen.insert(mapping.table.clone(), key.clone());
            tables.push(mapping);
        }
        check_lookups(&tables)?;

        Ok(Settings {
            postgres,
            slot: pg.slot.clone(),
            publication: pg.publication.clone(),
            status_interval: Duration::from_millis(pg.status_interval_ms),
            retained_wal_warn_bytes: pg.retained_wal_warn_mb.saturating_mul(1024 * 1024),
            failover_slot: pg.failover_slot,
            conveyour: SinkSettings {
                url,
                appkey,
                token,
                batch_size: cy.batch_size,
                batch_wait: Duration::from_millis(cy.batch_wait_ms),
                request_timeout: Duration::from_millis(cy.request_timeout_ms),
                min_backoff: Duration::from_millis(cy.min_backoff_ms),
                max_backoff: Duration::from_millis(cy.max_backoff_ms),
                body_error_retries: cy.body_error_retries,
                shutdown_grace: Duration::from_millis(cy.shutdown_grace_ms),
                max_in_flight: cy.max_in_flight,
                concurrency: cy.concurrency,
                max_requests_per_second: cy.max_requests_per_second,
                on_reject: cy.on_reject,
                on_unmappable: cy.on_unmappable,
                coalesce: cy.coalesce,
                ca_file,
            },
            tables,
            metrics_listen: self.metrics.listen.clone(),
            sync_chunk_rows: self.sync.chunk_rows,
            dead_letter_retry_every: (self.dead_letters.retry_every_ms > 0)
                .then(|| Duration::from_millis(self.dead_letters.retry_every_ms)),
        })
    }
}

/// Reads, parses and validates a config file against the process
/// environment.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    Config::from_file(path)?.validate(&|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

pub(super) fn credential(
    from_env: Option<String>,
    from_file: &Option<Secret>,
    field: &str,
    env_name: &str,
) -> Result<Secret, ConfigError> {
    let (secret, from) = match (from_env, from_file) {
        (Some(v), _) => (Secret(v), format!(" (from {env_name})")),
        (None, Some(v)) if !v.0.is_empty() => (v.clone(), String::new()),
        _ => {
            return Err(err(
                field,
                format!(
                    "missing: set it in the config file or in the {env_name} environment variable"
                ),
            ))
        }
    };
    // It goes in an HTTP header, which takes visible ASCII, spaces and tabs.
    // The value itself is never shown.
    if let Some(bad) = secret
        .0
        .chars()
        .find(|c| !matches!(c, ' ' | '\t' | '!'..='~'))
    {
        let what = match bad {
            '\n' | '\r' => "a line break (a secret file's trailing newline?)".to_owned(),
            c if c.is_control() => "a control character".to_owned(),
            _ => "a character outside ASCII".to_owned(),
        };
        return Err(err(
            field,
            format!(
                "the value{from} holds {what}, which cannot go in an HTTP header; remove it (ConveYour's keys are plain ASCII)"
            ),
        ));
    }
    Ok(secret)
}

/// The base URL without a trailing `/api/analytics`,
/// `/api/analytics/identify` or `/api/analytics/track` (any case), when the
/// URL ends in one of them; `None` for a base URL.
pub(super) fn without_api_path(url: &url::Url) -> Option<String> {
    let segments: Vec<&str> = url.path_segments()?.filter(|s| !s.is_empty()).collect();
    let is = |s: &str, word: &str| s.eq_ignore_ascii_case(word);
    let api = |tail: &[&str]| match tail {
        [api, analytics] => is(api, "api") && is(analytics, "analytics"),
        [api, analytics, call] => {
            is(api, "api")
                && is(analytics, "analytics")
                && (is(call, "identify") || is(call, "track"))
        }
        _ => false,
    };
    let start =
        (segments.len().saturating_sub(3)..segments.len()).find(|&i| api(&segments[i..]))?;
    let mut base = url.clone();
    base.set_path(&segments[..start].join("/"));
    base.set_fragment(None);
    Some(base.as_str().trim_end_matches('/').to_owned())
}

/// Slot names are restricted by Postgres to lower-case letters, digits and
/// underscores, at most 63 bytes; publications are ordinary identifiers.
pub(super) fn check_name(field: &str, name: &str, slot: bool) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 63 {
        return Err(err(field, "must be 1 to 63 characters"));
    }
    if slot
        && !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(err(
            field,
            format!(
                "`{name}`: a slot name may hold only lower-case letters, digits and underscores"
            ),
        ));
    }
    Ok(())
}

/// A lookup into a table that is itself mapped as identify must read the
/// column that mapping sends as the contact id: ConveYour matches events to
/// contacts by that id, and any other column would file them under contacts
/// that do not exist.
pub(super) fn check_lookups(tables: &[TableMapping]) -> Result<(), ConfigError> {
    for t in tables {
        let ContactSource::Lookup(l) = &t.contact else {
            continue;
        };
        let field = format!("{}.{}.id", t.key, t.section());
        if l.from == t.table {
            return Err(err(
                format!("{field}.from"),
                "a lookup must name another table; use id: COLUMN for this table's own column",
            ));
        }
        let Some(target) = tables.iter().find(|o| o.table == l.from) else {
            continue;
        };
        match (&target.kind, &target.contact) {
            (MappingKind::Identify, ContactSource::Column(id)) if *id != l.column => {
                // Either name may be the misspelled one (this runs before
                // the catalog is read), so neither is offered as the fix.
                return Err(err(
                    format!("{field}.column"),
                    format!(
                        "is `{}`, but {}.{}.id is `{id}`; both must name the same column of {} (ConveYour files events under the contact whose identify id they carry): correct whichever of the two is not the column holding the contact id",
                        l.column, target.key, target.section(), target.table
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}
