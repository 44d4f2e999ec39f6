//! What every Postgres session of the connector runs with.

use crate::config::{ConnParams, Host, SslMode};

/// Settings every session runs with (replication and SQL alike), so that
/// values in text form are in one known format whatever the server's
/// defaults are: ISO dates, UTC timestamps, floats that round-trip, ISO
/// 8601 intervals. The initial sync and `preview` read rows as text in the
/// same format the stream carries them.
pub(crate) const SESSION_OPTIONS: &str =
    "-c datestyle=ISO,MDY -c timezone=UTC -c extra_float_digits=3 -c intervalstyle=iso_8601";

/// Whether the server takes writes: `(transaction_read_only, in recovery)`,
/// asked of every host before using it.
pub(crate) const READ_ONLY_PROBE: &str =
    "SELECT current_setting('transaction_read_only') = 'on', pg_is_in_recovery()";

/// The tokio-postgres configuration for an ordinary SQL session with
/// the first host (see [`ConnParams::each_host`]).
/// TLS is negotiated by the connector passed alongside.
pub(crate) fn sql_config(params: &ConnParams) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    match &params.host {
        Host::Tcp(h) => c.host(h),
        Host::Socket(p) => c.host_path(p),
    };
    c.port(params.port)
        .user(&params.user)
        .dbname(&params.dbname)
        .application_name(&params.application_name)
        .options(SESSION_OPTIONS)
        .connect_timeout(params.connect_timeout)
        .ssl_mode(match params.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
    if let Some(p) = &params.password {
        c.password(p.expose());
    }
    c
}
