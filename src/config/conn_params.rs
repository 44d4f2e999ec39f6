//! Connection parameters for the source database, parsed from a
//! `postgres://` URL and shared by the SQL and the replication connections.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::Secret;

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

/// Which server of a multi-host URL will do, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    /// The first host that accepts the connection.
    Any,
    /// The first host whose sessions may write (`transaction_read_only` is
    /// off): the primary, never a standby in recovery.
    ReadWrite,
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
    /// The first (or only) host.
    pub host: Host,
    pub port: u16,
    /// The further hosts of a multi-host URL (`host1:5432,host2:5432`),
    /// tried in order after `host`.
    pub more_hosts: Vec<(Host, u16)>,
    /// Which host will do; `ReadWrite` skips standbys.
    pub target_session_attrs: TargetSessionAttrs,
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

/// Shows the URL without its password, for logs and errors; every host of
/// a multi-host URL.
impl fmt::Display for ConnParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |host: &Host, port: u16| match host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{port}"),
            Host::Tcp(h) => format!("{h}:{port}"),
            Host::Socket(p) => format!("{}:{port}", p.display()),
        };
        let mut hosts = show(&self.host, self.port);
        for (host, port) in &self.more_hosts {
            hosts.push(',');
            hosts.push_str(&show(host, *port));
        }
        write!(f, "postgres://{}@{}/{}", self.user, hosts, self.dbname)
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
    /// Parses `postgres://user[:password]@host[:port][,host[:port]…]/dbname[?param=value]`.
    /// The password falls back to `pgpassword` (PGPASSWORD). Accepted
    /// parameters: sslmode, sslrootcert, application_name, connect_timeout,
    /// host (a socket directory, or comma-separated hosts), port (one, or
    /// one per host), target_session_attrs (any, read-write). The error
    /// text never holds the password.
    pub fn from_url(text: &str, pgpassword: Option<String>) -> Result<ConnParams, String> {
        // Several hosts are libpq's, not a URL's: the url crate parses the
        // rest with a placeholder host, and the list is read here.
        let (text, listed) = split_host_list(text)?;
        let text = text.as_str();
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
            more_hosts: Vec::new(),
            target_session_attrs: TargetSessionAttrs::Any,
            user,
            password,
            dbname,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            application_name: DEFAULT_APPLICATION_NAME.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        };
        let mut host_param: Option<Vec<Host>> = None;
        let mut port_param: Option<Vec<u16>> = None;
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
                "host" if value.contains(',') => {
                    host_param = Some(value.split(',').map(host_of).collect())
                }
                "host" => host = Some(host_of(&value)),
                "port" if value.contains(',') => {
                    let mut ports = Vec::new();
                    for p in value.split(',') {
                        ports.push(
                            p.parse()
                                .map_err(|_| format!("port `{p}` is not a port number"))?,
                        );
                    }
                    port_param = Some(ports);
                }
                "port" => {
                    params.port = value
                        .parse()
                        .map_err(|_| format!("port `{value}` is not a port number"))?;
                    port_param = Some(vec![params.port]);
                }
                "target_session_attrs" => {
                    params.target_session_attrs = match value.as_ref() {
                        "any" => TargetSessionAttrs::Any,
                        "read-write" => TargetSessionAttrs::ReadWrite,
                        _ => return Err(format!(
                            "target_session_attrs `{value}` is not accepted: use read-write (only the primary, the server that accepts writes) or any"
                        )),
                    }
                }
                other => {
                    return Err(format!(
                        "unknown parameter `{other}` (accepted: sslmode, sslrootcert, application_name, connect_timeout, host, port, target_session_attrs)"
                    ))
                }
            }
        }
        if let Some(host) = host {
            params.host = host;
        }
        // Several hosts, from the URL's host list or the `host` parameter,
        // each with its own port, the `port` parameter's, or the URL's.
        let hosts: Option<Vec<(Option<Host>, Option<u16>)>> = match (host_param, listed) {
            (Some(names), _) => Some(names.into_iter().map(|h| (Some(h), None)).collect()),
            (None, Some(listed)) => Some(listed),
            (None, None) => None,
        };
        if let Some(hosts) = hosts {
            let ports = port_param.unwrap_or_default();
            if ports.len() > 1 && ports.len() != hosts.len() {
                return Err(format!(
                    "port lists {} ports for {} hosts: give one port, or one per host",
                    ports.len(),
                    hosts.len()
                ));
            }
            let mut all = Vec::with_capacity(hosts.len());
            for (i, (host, port)) in hosts.into_iter().enumerate() {
                let port = match ports.len() {
                    0 => port.unwrap_or(params.port),
                    1 => port.unwrap_or(ports[0]),
                    _ => ports[i],
                };
                all.push((host.unwrap_or_else(|| params.host.clone()), port));
            }
            let mut all = all.into_iter();
            if let Some((host, port)) = all.next() {
                params.host = host;
                params.port = port;
            }
            params.more_hosts = all.collect();
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

    /// One set of parameters per host, in the URL's order, each naming
    /// only that host.
    pub(crate) fn each_host(&self) -> Vec<ConnParams> {
        let mut out = Vec::with_capacity(1 + self.more_hosts.len());
        let mut one = self.clone();
        one.more_hosts = Vec::new();
        out.push(one.clone());
        for (host, port) in &self.more_hosts {
            let mut other = one.clone();
            other.host = host.clone();
            other.port = *port;
            out.push(other);
        }
        out
    }

    /// Whether the URL names more than one host.
    pub fn is_multi_host(&self) -> bool {
        !self.more_hosts.is_empty()
    }

    /// `host:port` (or the socket's path) of the first host, for messages.
    pub fn address(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{}", self.port),
            Host::Tcp(h) => format!("{h}:{}", self.port),
            Host::Socket(dir) => format!("{}/.s.PGSQL.{}", dir.display(), self.port),
        }
    }
}

/// A `host` value: a socket directory when it starts with `/`.
fn host_of(text: &str) -> Host {
    if text.starts_with('/') {
        Host::Socket(PathBuf::from(text))
    } else {
        Host::Tcp(text.to_owned())
    }
}

/// Takes a comma-separated host list (`h1:5432,h2:5433`) out of the URL,
/// leaving its first host in place for the url crate, and returns the list
/// (each host with its port, if given). None for one host.
#[allow(clippy::type_complexity)]
fn split_host_list(
    text: &str,
) -> Result<(String, Option<Vec<(Option<Host>, Option<u16>)>>), String> {
    let Some(start) = text.find("://").map(|i| i + 3) else {
        return Ok((text.to_owned(), None));
    };
    let end = text[start..]
        .find(['/', '?', '#'])
        .map(|i| start + i)
        .unwrap_or(text.len());
    let hosts_start = text[start..end]
        .rfind('@')
        .map(|i| start + i + 1)
        .unwrap_or(start);
    let list = &text[hosts_start..end];
    if !list.contains(',') {
        return Ok((text.to_owned(), None));
    }
    let mut hosts = Vec::new();
    for entry in list.split(',') {
        let (name, port) = match entry.strip_prefix('[') {
            Some(v6) => {
                let (name, rest) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("host `{entry}` lacks its closing `]`"))?;
                (name, rest.strip_prefix(':'))
            }
            None => match entry.rsplit_once(':') {
                Some((name, port)) => (name, Some(port)),
                None => (entry, None),
            },
        };
        let port = match port.filter(|p| !p.is_empty()) {
            Some(p) => Some(
                p.parse::<u16>()
                    .map_err(|_| format!("port `{p}` of host `{name}` is not a port number"))?,
            ),
            None => None,
        };
        let name = percent_decode(name).ok_or_else(|| "bad percent-encoding".to_owned())?;
        hosts.push(((!name.is_empty()).then_some(Host::Tcp(name)), port));
    }
    let mut out = text.to_owned();
    out.replace_range(hosts_start..end, "localhost");
    Ok((out, Some(hosts)))
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
    fn several_hosts_each_with_a_port() {
        let p = ConnParams::from_url(
            "postgres://cdc:s3cret@db1:5432,db2:5433,[::1]/app?target_session_attrs=read-write",
            None,
        )
        .unwrap();
        assert_eq!(p.host, Host::Tcp("db1".into()));
        assert_eq!(p.port, 5432);
        assert_eq!(
            p.more_hosts,
            vec![
                (Host::Tcp("db2".into()), 5433),
                (Host::Tcp("::1".into()), 5432)
            ]
        );
        assert_eq!(p.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert_eq!(p.dbname, "app");
        assert_eq!(p.password.as_ref().unwrap().expose(), "s3cret");
        let shown = format!("{p} {p:?}");
        assert_eq!(
            p.to_string(),
            "postgres://cdc@db1:5432,db2:5433,[::1]:5432/app"
        );
        assert!(!shown.contains("s3cret"), "{shown}");
        let each: Vec<String> = p.each_host().iter().map(|h| h.to_string()).collect();
        assert_eq!(
            each,
            [
                "postgres://cdc@db1:5432/app",
                "postgres://cdc@db2:5433/app",
                "postgres://cdc@[::1]:5432/app"
            ]
        );
        assert!(p.each_host().iter().all(|h| !h.is_multi_host()));
    }

    #[test]
    fn several_hosts_as_parameters() {
        let p = ConnParams::from_url("postgres://cdc@/app?host=a,b&port=1,2", None).unwrap();
        assert_eq!(p.address(), "a:1");
        assert_eq!(p.more_hosts, vec![(Host::Tcp("b".into()), 2)]);
        let p = ConnParams::from_url("postgres://cdc@a,b/app?port=7", None).unwrap();
        assert_eq!(p.to_string(), "postgres://cdc@a:7,b:7/app");
        assert_eq!(p.target_session_attrs, TargetSessionAttrs::Any);
        for bad in [
            "postgres://cdc:secretpw@a,b/app?port=1,2,3",
            "postgres://cdc:secretpw@a:x,b/app",
            "postgres://cdc:secretpw@a/app?target_session_attrs=standby",
        ] {
            let e = ConnParams::from_url(bad, None).unwrap_err();
            assert!(!e.contains("secretpw"), "{e}");
        }
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
