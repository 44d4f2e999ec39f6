//! Connection parameters for the source database, parsed from a
//! `postgres://` URL and shared by the SQL and the replication connections.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::Secret;

/// How hard to insist on TLS and how much of the server's certificate to
/// check, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, without checking the certificate.
    Prefer,
    /// TLS or fail, without checking the certificate.
    Require,
    /// TLS or fail; the certificate must chain to `sslrootcert`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    /// A directory holding the server's Unix socket.
    Socket(PathBuf),
}

/// Everything needed to open a connection. `Debug` never shows the
/// password.
#[derive(Clone)]
pub struct ConnParams {
    pub host: Host,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub application_name: String,
    pub connect_timeout: Duration,
}

impl fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self)
    }
}

/// Shows the URL without its password, for logs and errors.
impl fmt::Display for ConnParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            Host::Tcp(h) => h.clone(),
            Host::Socket(p) => p.display().to_string(),
        };
        write!(
            f,
            "postgres://{}@{}:{}/{}",
            self.user, host, self.port, self.dbname
        )
    }
}

/// libpq's default port.
const DEFAULT_PORT: u16 = 5432;
/// Connection attempts give up after this long, so an unreachable host is
/// reported instead of hanging.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Shown in `pg_stat_activity` and `pg_stat_replication`.
const DEFAULT_APPLICATION_NAME: &str = "conveyour-cdc";

impl ConnParams {
    /// Parses `postgres://user[:password]@host[:port]/dbname[?param=value]`.
    /// The password falls back to `pgpassword` (PGPASSWORD). Accepted
    /// parameters: sslmode, sslrootcert, application_name, connect_timeout,
    /// host (a socket directory). The error text never holds the password.
    pub fn from_url(text: &str, pgpassword: Option<String>) -> Result<ConnParams, String> {
        // libpq accepts an empty host (`postgres://user@/db?host=/run/pg`);
        // the url crate does not, so give it a placeholder the `host`
        // parameter or the default replaces.
        let url = match url::Url::parse(text) {
            Err(url::ParseError::EmptyHost) => url::Url::parse(&with_placeholder_host(text)),
            other => other,
        }
        .map_err(|e| format!("not a postgres:// URL ({e})"))?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(format!(
                "scheme `{}` is not postgres:// or postgresql://",
                url.scheme()
            ));
        }
        let decode = |s: &str| -> Result<String, String> {
            percent_decode(s).ok_or_else(|| "bad percent-encoding".to_owned())
        };
        let user = decode(url.username())?;
        if user.is_empty() {
            return Err("give the user name, as in postgres://cdc@host/app".to_owned());
        }
        let password = match url.password() {
            Some(p) => Some(Secret::new(decode(p)?)),
            None => pgpassword.map(Secret::new),
        };
        let mut host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .map(|h| Host::Tcp(h.trim_start_matches('[').trim_end_matches(']').to_owned()));
        let port = url.port().unwrap_or(DEFAULT_PORT);
        let dbname = decode(url.path().trim_start_matches('/'))?;
        let dbname = if dbname.is_empty() {
            user.clone()
        } else {
            dbname
        };
        let mut params = ConnParams {
            host: Host::Tcp("localhost".to_owned()),
            port,
            user,
            password,
            dbname,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            application_name: DEFAULT_APPLICATION_NAME.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        };
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "sslmode" => {
                    params.sslmode = SslMode::parse(&value).ok_or_else(|| {
                        format!("sslmode `{value}` is not one of disable, prefer, require, verify-ca, verify-full")
                    })?
                }
                "sslrootcert" => params.sslrootcert = Some(PathBuf::from(value.as_ref())),
                "application_name" => params.application_name = value.into_owned(),
                "connect_timeout" => {
                    let secs: u64 = value
                        .parse()
                        .map_err(|_| format!("connect_timeout `{value}` is not whole seconds"))?;
                    params.connect_timeout = Duration::from_secs(secs.max(1));
                }
                "host" if value.starts_with('/') => {
                    host = Some(Host::Socket(PathBuf::from(value.as_ref())))
                }
                "host" => host = Some(Host::Tcp(value.into_owned())),
                "port" => {
                    params.port = value
                        .parse()
                        .map_err(|_| format!("port `{value}` is not a port number"))?
                }
                other => {
                    return Err(format!(
                        "unknown parameter `{other}` (accepted: sslmode, sslrootcert, application_name, connect_timeout, host, port)"
                    ))
                }
            }
        }
        if let Some(host) = host {
            params.host = host;
        }
        if matches!(params.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
            && params.sslrootcert.is_none()
        {
            return Err(
                "sslmode verify-ca and verify-full need sslrootcert=/path/to/ca.pem".to_owned(),
            );
        }
        Ok(params)
    }

    /// The tokio-postgres configuration for an ordinary SQL session.
    /// TLS is negotiated by the connector passed alongside.
    pub(crate) fn sql_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        match &self.host {
            Host::Tcp(h) => c.host(h),
            Host::Socket(p) => c.host_path(p),
        };
        c.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .options(super::replication::SESSION_OPTIONS)
            .connect_timeout(self.connect_timeout)
            .ssl_mode(match self.sslmode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
        if let Some(p) = &self.password {
            c.password(p.expose());
        }
        c
    }
}

fn with_placeholder_host(text: &str) -> String {
    let Some(start) = text.find("://").map(|i| i + 3) else {
        return text.to_owned();
    };
    let end = text[start..]
        .find(['/', '?'])
        .map(|i| start + i)
        .unwrap_or(text.len());
    let mut out = text.to_owned();
    if text[start..end].is_empty() || text[start..end].ends_with('@') {
        out.insert_str(end, "localhost");
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_url() {
        let p = ConnParams::from_url(
            "postgres://cdc:p%40ss@db.example:6543/app?sslmode=verify-full&sslrootcert=/ca.pem",
            None,
        )
        .unwrap();
        assert_eq!(p.host, Host::Tcp("db.example".into()));
        assert_eq!(p.port, 6543);
        assert_eq!(p.user, "cdc");
        assert_eq!(p.password.as_ref().unwrap().expose(), "p@ss");
        assert_eq!(p.dbname, "app");
        assert_eq!(p.sslmode, SslMode::VerifyFull);
        assert!(!format!("{p:?} {p}").contains("p@ss"));
    }

    #[test]
    fn password_falls_back_to_pgpassword() {
        let p = ConnParams::from_url("postgres://cdc@h/app", Some("envpw".into())).unwrap();
        assert_eq!(p.password.unwrap().expose(), "envpw");
        let p = ConnParams::from_url("postgres://cdc:urlpw@h/app", Some("envpw".into())).unwrap();
        assert_eq!(p.password.unwrap().expose(), "urlpw");
    }

    #[test]
    fn socket_directory_host() {
        let p = ConnParams::from_url("postgres://cdc@/app?host=/run/postgresql", None).unwrap();
        assert_eq!(p.host, Host::Socket("/run/postgresql".into()));
    }

    #[test]
    fn rejects_bad_urls_without_echoing_the_password() {
        for bad in [
            "mysql://u@h/db",
            "postgres://h/db",
            "postgres://u:secretpw@h/db?sslmode=maybe",
            "postgres://u:secretpw@h/db?sslmode=verify-ca",
            "postgres://u:secretpw@h/db?bogus=1",
        ] {
            let e = ConnParams::from_url(bad, None).unwrap_err();
            assert!(!e.contains("secretpw"), "{e}");
        }
    }
}
