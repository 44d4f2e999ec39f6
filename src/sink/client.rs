//! The HTTP client that delivers requests to ConveYour and retries until
//! each is acknowledged or definitely rejected.

use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER};

use super::batch::Request;
use super::retry::{backoff, classify, Verdict};
use super::throttle::Throttle;
use super::Endpoint;
use crate::config::SinkSettings;

/// A request ConveYour will not accept as it is. The position does not
/// move past it.
#[derive(Debug, Clone)]
pub struct SinkError {
    endpoint: Endpoint,
    count: usize,
    first: Option<(String, String, crate::lsn::Lsn)>,
    /// The HTTP status; 2xx when the body did not say ok.
    status: u16,
    /// ConveYour's message.
    message: String,
    attempts: u32,
}

impl SinkError {
    /// What the operator should do.
    pub fn hint(&self) -> &'static str {
        if self.is_content_rejection() {
            "fix the row or the mapping named above (or what ConveYour's message says), then restart; the position was not advanced, so nothing is lost"
        } else {
            "check conveyour.url, conveyour.appkey and conveyour.token; the position was not advanced, so nothing is lost"
        }
    }

    /// Whether ConveYour refused what the request says (a bad entry), as
    /// opposed to who sent it or where (credentials, URL), which no entry
    /// can be blamed for.
    pub fn is_content_rejection(&self) -> bool {
        matches!(self.status, 200..=299 | 400..=499)
            && !matches!(self.status, 401 | 403 | 404 | 405 | 407)
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.endpoint {
            Endpoint::Identify => "identify entries",
            Endpoint::Track => "track events",
        };
        write!(f, "ConveYour rejected a request of {} {what}", self.count)?;
        if let Some((table, contact, lsn)) = &self.first {
            let lead = if self.count > 1 { "first: " } else { "" };
            write!(f, " ({lead}table {table}, id {contact}, LSN {lsn})")?;
        }
        write!(
            f,
            " after {} attempt(s): HTTP {}: {}",
            self.attempts, self.status, self.message
        )
    }
}

impl std::error::Error for SinkError {}

/// Delivers requests to one ConveYour account.
pub(crate) struct Sink {
    http: reqwest::Client,
    /// The identify and track URLs, parsed once rather than per request.
    urls: [reqwest::Url; 2],
    settings: SinkSettings,
    throttle: Throttle,
}

impl Sink {
    pub(crate) fn new(settings: &SinkSettings) -> Result<Sink, String> {
        let mut headers = HeaderMap::new();
        let secret = |value: &str, what: &str| -> Result<HeaderValue, String> {
            let mut v = HeaderValue::from_str(value).map_err(|_| {
                format!("conveyour.{what}: holds characters that cannot go in an HTTP header")
            })?;
            v.set_sensitive(true);
            Ok(v)
        };
        headers.insert(
            "x-conveyour-appkey",
            secret(settings.appkey.expose(), "appkey")?,
        );
        headers.insert(
            "x-conveyour-token",
            secret(settings.token.expose(), "token")?,
        );
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(10)))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("conveyour-cdc/", env!("CARGO_PKG_VERSION")))
            // A redirect would carry the app key and token to wherever it
            // points, and turn the POST into a GET: treat it as the wrong
            // URL instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("conveyour: cannot build the HTTP client: {e}"))?;
        let url = |e: Endpoint| {
            reqwest::Url::parse(&format!("{}{}", settings.url, e.path()))
                .map_err(|err| format!("conveyour.url: not a usable URL ({err})"))
        };
        Ok(Sink {
            http,
            urls: [url(Endpoint::Identify)?, url(Endpoint::Track)?],
            settings: settings.clone(),
            throttle: Throttle::new(settings.max_requests_per_second),
        })
    }

    /// Sends one request until ConveYour acknowledges it. Transient failures
    /// (connection errors, timeouts, 408, 429, 5xx) are retried forever with
    /// capped, jittered backoff, honouring Retry-After; a 2xx whose body is
    /// not ok is retried `body_error_retries` times; anything else is a
    /// [`SinkError`]. Cancel by dropping the future.
    pub(crate) async fn deliver(&self, req: &Request) -> Result<(), SinkError> {
        let url = &self.urls[match req.endpoint {
            Endpoint::Identify => 0,
            Endpoint::Track => 1,
        }];
        let key = req.idempotency_key();
        let mut attempts: u32 = 0;
        let mut not_ok: u32 = 0;
        let m = crate::telemetry::metrics();
        let endpoint = req.endpoint.name();
        let outcome = |o: &str| m.requests.with_label_values(&[endpoint, o]).inc();
        loop {
            attempts += 1;
            self.throttle.acquire().await;
            m.in_flight.inc();
            let started = std::time::Instant::now();
            let verdict = match self
                .http
                .post(url.clone())
                .header("Idempotency-Key", &key)
                .body(req.body.clone())
                .send()
                .await
            {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    match resp.bytes().await {
                        Ok(body) => classify(status, retry_after.as_deref(), &body),
                        Err(e) => Verdict::Retry {
                            reason: format!(
                                "HTTP {status}, reading the body failed: {}",
                                describe(&e)
                            ),
                            after: None,
                        },
                    }
                }
                Err(e) => Verdict::Retry {
                    reason: describe(&e),
                    after: None,
                },
            };
            m.in_flight.dec();
            m.request_duration
                .with_label_values(&[endpoint])
                .observe(started.elapsed().as_secs_f64());
            let (wait, reason) = match verdict {
                Verdict::Ack => {
                    outcome("ok");
                    m.backoff_seconds.set(0.0);
                    match req.endpoint {
                        Endpoint::Identify => m.identify_acknowledged.inc_by(req.count() as u64),
                        Endpoint::Track => m.track_acknowledged.inc_by(req.count() as u64),
                    }
                    return Ok(());
                }
                Verdict::Retry { reason, after } => {
                    let wait = after.unwrap_or_else(|| self.backoff(attempts));
                    if after.is_some() || reason.starts_with("HTTP 429") {
                        // ConveYour is throttling: every lane waits.
                        self.throttle.pause(wait);
                    }
                    (wait, reason)
                }
                Verdict::NotOk { status, message } => {
                    not_ok += 1;
                    if not_ok > self.settings.body_error_retries {
                        outcome("rejected");
                        return Err(self.rejected(req, status, message, attempts));
                    }
                    let reason = format!("HTTP {status}, not acknowledged: {message}");
                    (self.backoff(attempts), reason)
                }
                Verdict::Reject { status, message } => {
                    outcome("rejected");
                    return Err(self.rejected(req, status, message, attempts));
                }
            };
            tracing::warn!(
                endpoint = req.endpoint.name(),
                entries = req.count(),
                attempt = attempts,
                retry_in_ms = wait.as_millis() as u64,
                "ConveYour request failed, will retry: {reason}"
            );
            outcome("retried");
            m.retries.with_label_values(&[endpoint]).inc();
            m.backoff_seconds.set(wait.as_secs_f64());
            tokio::time::sleep(wait).await;
        }
    }

    fn backoff(&self, attempts: u32) -> Duration {
        backoff(
            attempts.saturating_sub(1),
            self.settings.min_backoff,
            self.settings.max_backoff,
        )
    }

    fn rejected(&self, req: &Request, status: u16, message: String, attempts: u32) -> SinkError {
        SinkError {
            endpoint: req.endpoint,
            count: req.count(),
            first: req
                .first()
                .map(|a| (a.table.to_string(), a.contact.clone(), a.lsn)),
            status,
            message,
            attempts,
        }
    }
}

/// Single exchanges for `check`: no retry, no throttle, no metrics.
impl Sink {
    /// Sends `req` once and classifies the answer as [`Sink::deliver`]
    /// does; a transport error (connect, TLS, timeout) is a
    /// [`Verdict::Retry`] whose reason names its cause.
    pub(crate) async fn send_once(&self, req: &Request) -> Verdict {
        let url = &self.urls[match req.endpoint {
            Endpoint::Identify => 0,
            Endpoint::Track => 1,
        }];
        let sent = self
            .http
            .post(url.clone())
            .header("Idempotency-Key", req.idempotency_key())
            .body(req.body.clone())
            .send()
            .await;
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                return Verdict::Retry {
                    reason: describe(&e),
                    after: None,
                }
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match resp.bytes().await {
            Ok(body) => classify(status, retry_after.as_deref(), &body),
            Err(e) => Verdict::Retry {
                reason: format!("HTTP {status}, reading the body failed: {}", describe(&e)),
                after: None,
            },
        }
    }

    /// Whether the base URL answers over HTTP(S) at all: the status of a
    /// GET of it (any status will do; nothing is posted), or the transport
    /// error with its cause.
    pub(crate) async fn reach(&self) -> Result<u16, String> {
        match self.http.get(&self.settings.url).send().await {
            Ok(resp) => Ok(resp.status().as_u16()),
            Err(e) => Err(describe(&e)),
        }
    }
}

/// A transport error in one line, with its causes, and never the URL's
/// query (there is none; credentials travel in headers).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut text = kind.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
