//! The HTTP client that delivers requests to ConveYour and retries until
//! each is acknowledged or definitely rejected.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER};

use super::concurrency::{Limiter, Permit, Signal};
use super::error::{SinkError, UNTRUSTED_CERTIFICATE};
use super::request::Request;
use super::retry::{backoff, classify, retry_wait, Verdict};
use super::throttle::Throttle;
use super::Endpoint;
use crate::config::{ConfigError, SinkSettings};

/// Delivers requests to one ConveYour account.
pub(crate) struct Sink {
    http: reqwest::Client,
    /// The identify and track URLs, parsed once rather than per request.
    urls: [reqwest::Url; 2],
    settings: SinkSettings,
    throttle: Throttle,
    /// How many attempts may be on the wire at once.
    limiter: Arc<Limiter>,
    /// What ConveYour has acknowledged, across all requests, and whether
    /// it is in an outage.
    health: Mutex<Health>,
}

/// ConveYour's health as all requests saw it together.
#[derive(Debug, Default)]
struct Health {
    /// When the latest acknowledged request was sent (its last attempt):
    /// a witness for [`super::blame::Trial`].
    last_ack_sent: Option<Instant>,
    /// The contacts of the last few acknowledged identify entries, newest
    /// first and distinct: ones ConveYour has, for probes. More than one,
    /// so a probe need not use the very contact whose entries are refused.
    contacts: std::collections::VecDeque<String>,
    /// Since when every request has been refused without a witness.
    outage_since: Option<Instant>,
    /// When the outage was last logged.
    reported: Option<Instant>,
}

/// How many acknowledged contacts are kept for probes: enough that one
/// is not in the refused request (whose own contact may be the refused
/// part), few enough to cost nothing.
const PROBE_CONTACTS: usize = 4;

/// How often a lasting outage is logged again.
const OUTAGE_REPORT_EVERY: Duration = Duration::from_secs(60);

impl Sink {
    /// The client for `settings`. Fails only on settings that config
    /// validation lets through (an unusable certificate, a TLS backend that
    /// cannot start), naming the key.
    pub(crate) fn new(settings: &SinkSettings) -> Result<Sink, ConfigError> {
        let mut headers = HeaderMap::new();
        let secret = |value: &str, what: &str| -> Result<HeaderValue, ConfigError> {
            let mut v = HeaderValue::from_str(value).map_err(|_| {
                ConfigError::key(
                    format!("conveyour.{what}"),
                    "holds characters that cannot go in an HTTP header",
                )
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
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(10)))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            // Connections are reused (HTTP/1.1 keep-alive, or one HTTP/2
            // connection multiplexing every request when ConveYour offers
            // h2 by ALPN); no more stay idle than requests can be in flight.
            .pool_max_idle_per_host(settings.max_in_flight)
            .user_agent(concat!("conveyour-cdc/", env!("CARGO_PKG_VERSION")))
            // A redirect would carry the app key and token to wherever it
            // points, and turn the POST into a GET: treat it as the wrong
            // URL instead.
            .redirect(reqwest::redirect::Policy::none());
        // Trusted besides the built-in roots, e.g. a TLS-inspecting proxy's CA.
        for der in settings.ca_file.iter().flat_map(|ca| ca.certificates()) {
            let cert = reqwest::Certificate::from_der(der).map_err(|e| {
                ConfigError::key("conveyour.ca_file", format!("unusable certificate: {e}"))
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| {
            ConfigError::key("conveyour", format!("cannot build the HTTP client: {e}"))
        })?;
        let url = |e: Endpoint| {
            reqwest::Url::parse(&format!("{}{}", settings.url, e.path())).map_err(|err| {
                ConfigError::key("conveyour.url", format!("not a usable URL ({err})"))
            })
        };
        Ok(Sink {
            http,
            urls: [url(Endpoint::Identify)?, url(Endpoint::Track)?],
            settings: settings.clone(),
            throttle: Throttle::new(settings.max_requests_per_second),
            limiter: Limiter::new(
                settings.max_in_flight,
                settings.concurrency == crate::config::Concurrency::Adaptive,
            ),
            health: Mutex::new(Health::default()),
        })
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the latest request ConveYour acknowledged was sent, whichever
    /// request it was (its acknowledged attempt).
    pub(crate) fn last_ack_sent(&self) -> Option<Instant> {
        self.health().last_ack_sent
    }

    /// The contacts of the last few identify entries ConveYour
    /// acknowledged, newest first.
    pub(crate) fn acknowledged_contacts(&self) -> Vec<String> {
        self.health().contacts.iter().cloned().collect()
    }

    /// Sends one identify of `contact` with empty traits, once, to see
    /// whether ConveYour acknowledges anything right now (a no-op for a
    /// contact it has). `Ok(true)` when acknowledged, `Ok(false)` when
    /// refused or unanswered; a refusal that stops the connector
    /// (credentials, URL) is an error. Its key is new each time, so a
    /// receiver that deduplicates cannot answer it from a cache.
    pub(crate) async fn probe(&self, contact: &str) -> Result<bool, SinkError> {
        let body = serde_json::to_vec(&serde_json::json!([{ "id": contact, "traits": {} }]))
            .unwrap_or_default();
        let req = Request::stored(Endpoint::Identify, bytes::Bytes::from(body));
        let key = format!(
            "probe-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        match self.exchange(&req, &key, true, None).await {
            Ok(()) => Ok(true),
            // Status 0: a transient failure, not retried for a probe.
            Err(e) if e.status == 0 || e.is_content_rejection() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether refused requests are being held for an outage.
    pub(crate) fn in_outage(&self) -> bool {
        self.health().outage_since.is_some()
    }

    /// A request is held after `refused` for lack of a witness: ConveYour
    /// refuses everything alike. Exported as the outage gauge; logged when the
    /// outage starts and then every [`OUTAGE_REPORT_EVERY`], not per
    /// request.
    pub(crate) fn hold(&self, refused: &SinkError) {
        let now = Instant::now();
        let mut h = self.health();
        match h.outage_since {
            None => {
                h.outage_since = Some(now);
                h.reported = Some(now);
                crate::telemetry::metrics().outage.set(1);
                tracing::warn!(
                    status = refused.status,
                    "ConveYour refuses requests and acknowledges none (HTTP {}: {}): an outage, not bad entries; holding the position and retrying until it acknowledges again",
                    refused.status,
                    refused.message
                );
            }
            Some(since) if h.reported.is_none_or(|r| now - r >= OUTAGE_REPORT_EVERY) => {
                h.reported = Some(now);
                tracing::warn!(
                    status = refused.status,
                    outage_seconds = (now - since).as_secs(),
                    "ConveYour still refuses requests and acknowledges none (HTTP {}: {}); holding the position",
                    refused.status,
                    refused.message
                );
            }
            Some(_) => {}
        }
    }

    /// Records an acknowledged attempt sent at `sent`; ends an outage.
    fn acknowledged(&self, req: &Request, sent: Instant) {
        // Two distinct contacts of the request, its last first: a probe
        // then has one besides whichever of them a later request is
        // refused for.
        let mut contacts: Vec<&String> = Vec::with_capacity(2);
        if req.endpoint == Endpoint::Identify {
            for (_, a) in req.items.iter().rev() {
                if !contacts.contains(&&a.contact) {
                    contacts.push(&a.contact);
                    if contacts.len() == 2 {
                        break;
                    }
                }
            }
        }
        let mut h = self.health();
        if h.last_ack_sent.is_none_or(|t| t < sent) {
            h.last_ack_sent = Some(sent);
        }
        for c in contacts.into_iter().rev() {
            if h.contacts.front() != Some(c) {
                h.contacts.retain(|known| known != c);
                h.contacts.push_front(c.clone());
                h.contacts.truncate(PROBE_CONTACTS);
            }
        }
        if let Some(since) = h.outage_since.take() {
            h.reported = None;
            crate::telemetry::metrics().outage.set(0);
            tracing::info!(
                outage_seconds = since.elapsed().as_secs(),
                "ConveYour acknowledges again after {} s of refusing everything; delivery resumes",
                since.elapsed().as_secs()
            );
        }
    }

    /// Sends one request until ConveYour acknowledges it. Transient failures
    /// (connection errors, timeouts, 408, 429, 5xx but 501) are retried
    /// forever with capped, jittered backoff, honouring Retry-After; a 2xx
    /// whose body is not ok is retried `body_error_retries` times (not at
    /// all during an outage); anything else is a [`SinkError`], which by
    /// itself blames nothing (see [`super::blame`]). Cancel by dropping the
    /// future.
    pub(crate) async fn deliver(&self, req: &Request) -> Result<(), SinkError> {
        self.exchange(req, &req.idempotency_key(), false, None)
            .await
    }

    /// [`Self::deliver`], its first attempt in a slot already taken.
    pub(crate) async fn deliver_in(&self, req: &Request, slot: Permit) -> Result<(), SinkError> {
        self.exchange(req, &req.idempotency_key(), false, Some(slot))
            .await
    }

    /// The concurrency limit every attempt goes through.
    pub(crate) fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// [`Self::deliver`] with a given Idempotency-Key; `once` makes every
    /// failure final after one attempt (a probe). `slot` is the first
    /// attempt's, when already taken.
    async fn exchange(
        &self,
        req: &Request,
        key: &str,
        once: bool,
        mut slot: Option<Permit>,
    ) -> Result<(), SinkError> {
        let mut attempts: u32 = 0;
        let mut not_ok: u32 = 0;
        let m = crate::telemetry::metrics();
        let endpoint = req.endpoint.name();
        let outcome = |o: &str| m.requests.with_label_values(&[endpoint, o]).inc();
        loop {
            attempts += 1;
            self.throttle.acquire().await;
            let mut permit = match slot.take() {
                Some(p) => p,
                None => self.limiter.acquire().await,
            };
            permit.start();
            m.in_flight.inc();
            let started = std::time::Instant::now();
            let verdict = self.post(req, key).await;
            m.in_flight.dec();
            permit.observe(match &verdict {
                Verdict::Ack => Signal::Ack(started.elapsed()),
                Verdict::Retry {
                    status: Some(429),
                    after,
                    ..
                } => Signal::Throttled {
                    retry_after: after.unwrap_or_default(),
                },
                Verdict::Retry { .. } => Signal::Failed,
                Verdict::NotOk { .. } | Verdict::Reject { .. } => Signal::Neutral,
            });
            drop(permit);
            m.request_duration
                .with_label_values(&[endpoint])
                .observe(started.elapsed().as_secs_f64());
            let (wait, reason) = match verdict {
                Verdict::Ack => {
                    outcome("ok");
                    m.backoff_seconds.set(0.0);
                    self.acknowledged(req, started);
                    match req.endpoint {
                        Endpoint::Identify => m.identify_acknowledged.inc_by(req.count() as u64),
                        Endpoint::Track => m.track_acknowledged.inc_by(req.count() as u64),
                    }
                    return Ok(());
                }
                Verdict::Retry { .. } if once => {
                    outcome("rejected");
                    return Err(self.rejected(req, 0, "no acknowledgement".to_owned(), attempts));
                }
                Verdict::Retry {
                    status,
                    reason,
                    after,
                } => {
                    let wait = retry_wait(after, self.backoff(attempts));
                    // ConveYour is throttling. The limit was cut (above);
                    // this request waits out Retry-After. Once the limit is
                    // as low as it goes (or fixed), every request waits.
                    if (after.is_some() || status == Some(429)) && self.limiter.at_floor() {
                        self.throttle.pause(wait);
                    }
                    (wait, reason)
                }
                Verdict::NotOk { status, message } => {
                    not_ok += 1;
                    // In an outage the held request's growing backoff
                    // paces the tries: retrying here only adds load.
                    if once || self.in_outage() || not_ok > self.settings.body_error_retries {
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
            if self.in_outage() {
                // Reported once per outage, not per attempt.
                tracing::debug!(
                    endpoint = req.endpoint.name(),
                    entries = req.count(),
                    attempt = attempts,
                    retry_in_ms = wait.as_millis() as u64,
                    "ConveYour request failed, will retry: {reason}"
                );
            } else {
                tracing::warn!(
                    endpoint = req.endpoint.name(),
                    entries = req.count(),
                    attempt = attempts,
                    retry_in_ms = wait.as_millis() as u64,
                    "ConveYour request failed, will retry: {reason}"
                );
            }
            outcome("retried");
            m.retries.with_label_values(&[endpoint]).inc();
            m.backoff_seconds.set(wait.as_secs_f64());
            tokio::time::sleep(wait).await;
        }
    }

    /// The wait before attempt `attempts + 1`: capped, jittered.
    pub(crate) fn backoff(&self, attempts: u32) -> Duration {
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
        self.post(req, &req.idempotency_key()).await
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

impl Sink {
    /// One POST of `req` with Idempotency-Key `key`, and the answer
    /// classified; a transport error (connect, TLS, timeout, a body cut
    /// off) is a [`Verdict::Retry`] whose reason names its cause. No
    /// retry, throttle or metrics: callers add those.
    async fn post(&self, req: &Request, key: &str) -> Verdict {
        let url = &self.urls[match req.endpoint {
            Endpoint::Identify => 0,
            Endpoint::Track => 1,
        }];
        let sent = self
            .http
            .post(url.clone())
            .header("Idempotency-Key", key)
            .body(req.body.clone())
            .send()
            .await;
        let resp = match sent {
            Ok(resp) => resp,
            // An untrusted certificate does not heal by waiting: stop
            // with what to do rather than retry forever.
            Err(e) if untrusted_certificate(&e) => {
                return Verdict::Reject {
                    status: UNTRUSTED_CERTIFICATE,
                    message: describe(&e),
                }
            }
            Err(e) => {
                return Verdict::Retry {
                    status: None,
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
                status: Some(status),
                reason: format!("HTTP {status}, reading the body failed: {}", describe(&e)),
                after: None,
            },
        }
    }
}

/// Whether the TLS handshake refused the server's certificate (unknown
/// issuer, expired, wrong name). rustls's error travels boxed inside
/// connector and I/O errors (an I/O error's `source` skips what it wraps),
/// so each cause is opened, and its text read as rustls writes it.
fn untrusted_certificate(e: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        for candidate in [Some(s), inner].into_iter().flatten() {
            if let Some(rustls::Error::InvalidCertificate(_)) =
                candidate.downcast_ref::<rustls::Error>()
            {
                return true;
            }
            if candidate.to_string().contains("invalid peer certificate") {
                return true;
            }
        }
        source = s.source();
    }
    false
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(status: u16) -> SinkError {
        SinkError {
            endpoint: Endpoint::Identify,
            count: 1,
            first: None,
            status,
            message: "m".into(),
            attempts: 1,
        }
    }

    #[test]
    fn only_refusals_of_content_can_blame_an_entry() {
        for s in [200, 201, 400, 409, 413, 422] {
            assert!(refused(s).is_content_rejection(), "{s}");
        }
        // Credentials, URL, redirects and 501 stop the connector.
        for s in [301, 401, 403, 404, 405, 407, 501] {
            assert!(!refused(s).is_content_rejection(), "{s}");
        }
        assert!(refused(501).hint().contains("conveyour.url"));
    }
}
