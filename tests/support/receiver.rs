//! The strict test ConveYour: a real HTTP/1.1 server on 127.0.0.1 that
//! enforces the identify/track contract, records everything it sees, merges
//! accepted traits into per-contact state like ConveYour would, and can inject
//! faults at runtime. [`Receiver::start_tls`] serves the same over HTTPS
//! with a certificate of its own test CA, offering HTTP/2 and HTTP/1.1 by
//! ALPN, as ConveYour does.
//!
//! It runs on its own runtime thread, so it keeps serving while a test blocks
//! (for example in [`super::connector::run_cli`] or [`super::pg::Cluster::restart`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

/// Path of the identify endpoint.
pub const IDENTIFY_PATH: &str = "/api/analytics/identify";
/// Path of the track endpoint.
pub const TRACK_PATH: &str = "/api/analytics/track";
/// ConveYour blocks event objects with more key/value pairs than this.
pub const MAX_EVENT_PROPERTIES: usize = 15;

/// A fault applied to every request while it is set.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer this status with `{"status":"error","message":"injected"}`.
    Status(u16),
    /// Like `Status` for the next `n` requests, then back to normal.
    StatusTimes(u16, usize),
    /// 429 with a `Retry-After: <secs>` header.
    TooManyRequests { retry_after_secs: u64 },
    /// HTTP 200 with `{"status":"error","message":"injected"}`: not a success.
    BodyError,
    /// Read the request head, then close the connection with SO_LINGER 0 so
    /// the client sees a connection reset and no response.
    Reset,
    /// Delay the reply by this long, then handle the request normally.
    Slow(Duration),
    /// Stop listening and drop open connections: connections are refused
    /// until the fault is cleared, when the same port is bound again.
    Outage,
    /// 400 for any request that carries this contact id (poisoned rows).
    RejectId(String),
    /// 400 for any request with an identify trait or event property whose
    /// value is this string (a value ConveYour will not store).
    RejectValue(String),
    /// A real rate limit: a request is let through (and handled normally)
    /// when fewer than `per_second` requests were let through in the last
    /// second (a sliding window); otherwise it is answered 429 with
    /// `Retry-After: <retry_after_secs>` and an error body. Setting the
    /// fault starts with an empty window.
    RateLimit {
        per_second: u32,
        retry_after_secs: u64,
    },
    /// Each request on its own, by a generator seeded with `seed` when the
    /// fault is set: answered 500 with probability `p_500`, 503 with
    /// `p_503`, 429 (`Retry-After: 1`) with `p_429`, reset as by
    /// [`Fault::Reset`] with `p_reset`, and otherwise handled normally. One
    /// draw per request, so the same seed and the same request order give
    /// the same answers. Over HTTP/2 a reset tears down every stream on the
    /// connection, as a real one would.
    Chaos {
        seed: u64,
        p_500: f64,
        p_503: f64,
        p_429: f64,
        p_reset: f64,
    },
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The request path, e.g. `/api/analytics/identify`.
    pub endpoint: String,
    /// HTTP method.
    pub method: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The parsed JSON body; a JSON string holding the raw text if the body
    /// was not valid JSON; `Null` for requests reset before the body was read.
    pub body: Value,
    /// Status answered; 0 when the connection was reset instead.
    pub response_status: u16,
    /// True only for requests that fully succeeded (200 `{"status":"ok"}`).
    pub accepted: bool,
    /// The `Idempotency-Key` header, if sent.
    pub idempotency_key: Option<String>,
    /// Why it was rejected or faulted (the error message sent back).
    pub error: Option<String>,
    /// The HTTP version it came in, as `http` prints it: `HTTP/1.1`,
    /// `HTTP/2.0`.
    pub version: String,
    /// Which TCP connection it came on: 1 for the first the receiver
    /// accepted, counting on across [`Receiver::reset_records`].
    pub connection: usize,
}

impl RecordedRequest {
    /// A header value by (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    requests: Vec<RecordedRequest>,
    identifies: Vec<Value>,
    identify_count: usize,
    /// When false, accepted bodies and identify entries are not kept.
    light: bool,
    tracks: Vec<(String, Value)>,
    orphan_tracks: Vec<(String, Value)>,
    contacts: HashMap<String, Map<String, Value>>,
    fault: Option<Fault>,
    /// Tasks serving open connections, aborted on `Outage`.
    connections: Vec<AbortHandle>,
    accept_task: Option<AbortHandle>,
    /// TCP connections accepted since the start or the last reset.
    connection_count: usize,
    /// TCP connections accepted ever: the last one's number.
    last_connection: usize,
    /// When `RateLimit` let requests through, oldest first, within the
    /// last second.
    admitted: VecDeque<Instant>,
    /// `Chaos`'s generator, seeded when the fault is set.
    chaos: Option<fastrand::Rng>,
    /// Added to every request's reply, whatever the fault.
    latency: Duration,
    /// Requests being handled now, and the most there were at once.
    active: usize,
    max_active: usize,
}

/// Counts a request as being handled until dropped (answered, or its
/// connection torn down).
struct Active(Arc<Inner>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.state().active -= 1;
    }
}

struct Inner {
    appkey: String,
    token: String,
    addr: SocketAddr,
    handle: tokio::runtime::Handle,
    state: Mutex<State>,
    /// Set for a receiver serving HTTPS.
    tls: Option<Tls>,
}

/// What an HTTPS receiver serves with, and the CA a client must trust.
struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    ca_pem: String,
    /// A scratch directory holding `ca.pem`, removed with the receiver.
    dir: PathBuf,
}

impl Tls {
    /// A fresh test CA and a server certificate it signed for `localhost`
    /// and `127.0.0.1`; ALPN offers h2, then http/1.1.
    fn new() -> Tls {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("test CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "conveyour-cdc test ConveYour CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("test CA certificate");
        let key = KeyPair::generate().expect("test server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .expect("test server certificate");
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone(), ca.der().clone()], key.into())
            .expect("test server TLS config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let dir = super::scratch_path("conveyour-cdc-receiver");
        std::fs::create_dir_all(&dir).expect("creating the receiver's scratch dir");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("writing the test CA");
        Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            ca_pem: ca.pem(),
            dir,
        }
    }
}

impl Drop for Tls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Stops the receiver's runtime (and with it every task) when the last
/// [`Receiver`] clone goes away. Server tasks hold only `Arc<Inner>`.
struct Guard {
    inner: Arc<Inner>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut st = self.inner.state();
        if let Some(t) = st.accept_task.take() {
            t.abort();
        }
        for c in st.connections.drain(..) {
            c.abort();
        }
        drop(st);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The running test receiver. Cheap to clone; the server stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Inner>,
    _guard: Arc<Guard>,
}

/// Starts a receiver that expects these credentials.
pub async fn start(appkey: &str, token: &str) -> Receiver {
    Receiver::start(appkey, token).await
}

impl Receiver {
    /// Starts a receiver that expects these credentials.
    pub async fn start(appkey: &str, token: &str) -> Receiver {
        Receiver::launch(appkey, token, None)
    }

    /// Starts a receiver that expects these credentials and serves HTTPS
    /// with a certificate of a test CA of its own (see
    /// [`Receiver::ca_file`]), for `localhost` and `127.0.0.1`. ALPN
    /// offers `h2` then `http/1.1`; each connection is served in the
    /// protocol it negotiated (HTTP/1.1 without ALPN). Contract, faults and
    /// records work as over plain HTTP.
    pub async fn start_tls(appkey: &str, token: &str) -> Receiver {
        Receiver::launch(appkey, token, Some(Tls::new()))
    }

    fn launch(appkey: &str, token: &str, tls: Option<Tls>) -> Receiver {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("test-receiver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("test-receiver-rt")
                    .enable_all()
                    .build()
                    .expect("receiver runtime");
                handle_tx.send(rt.handle().clone()).unwrap();
                rt.block_on(async move {
                    let _ = shutdown_rx.await;
                });
                rt.shutdown_background();
            })
            .expect("spawning the receiver thread");
        let handle = handle_rx.recv().expect("receiver runtime handle");
        let listener = {
            let _guard = handle.enter();
            let std_listener =
                std::net::TcpListener::bind("127.0.0.1:0").expect("binding the test receiver");
            std_listener.set_nonblocking(true).unwrap();
            tokio::net::TcpListener::from_std(std_listener).unwrap()
        };
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            appkey: appkey.to_string(),
            token: token.to_string(),
            addr,
            handle,
            state: Mutex::new(State::default()),
            tls,
        });
        serve(&inner, listener);
        Receiver {
            _guard: Arc::new(Guard {
                inner: inner.clone(),
                shutdown: Some(shutdown_tx),
            }),
            inner,
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` from [`Receiver::start_tls`]);
    /// the connector appends the endpoint paths.
    pub fn url(&self) -> String {
        let scheme = if self.inner.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.inner.addr)
    }

    /// The PEM certificate of the CA that signed an HTTPS receiver's
    /// certificate (what `conveyour.ca_file` must hold); `None` over HTTP.
    pub fn ca_pem(&self) -> Option<&str> {
        self.inner.tls.as_ref().map(|t| t.ca_pem.as_str())
    }

    /// A file holding [`Receiver::ca_pem`], there as long as the receiver
    /// is; `None` over HTTP.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.inner.tls.as_ref().map(|t| t.dir.join("ca.pem"))
    }

    pub fn port(&self) -> u16 {
        self.inner.addr.port()
    }

    pub fn appkey(&self) -> &str {
        &self.inner.appkey
    }

    pub fn token(&self) -> &str {
        &self.inner.token
    }

    /// Sets a fault; it applies to every request until cleared (or, for
    /// `StatusTimes`, until used up).
    pub fn set_fault(&self, fault: Fault) {
        let mut st = self.state();
        let was_outage = st.fault == Some(Fault::Outage);
        let mut stopping = Vec::new();
        if fault == Fault::Outage {
            stopping.extend(st.accept_task.take());
            stopping.append(&mut st.connections);
            for task in &stopping {
                task.abort();
            }
        }
        st.admitted.clear();
        st.chaos = match fault {
            Fault::Chaos { seed, .. } => Some(fastrand::Rng::with_seed(seed)),
            _ => None,
        };
        st.fault = Some(fault.clone());
        drop(st);
        // Aborting is asynchronous: wait until the listener is really gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while stopping.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if was_outage && fault != Fault::Outage {
            self.rebind();
        }
    }

    /// Back to normal service (re-binds the same port after an `Outage`).
    pub fn clear_fault(&self) {
        let was_outage = {
            let mut st = self.state();
            let was = st.fault == Some(Fault::Outage);
            st.fault = None;
            was
        };
        if was_outage {
            self.rebind();
        }
    }

    pub fn fault(&self) -> Option<Fault> {
        self.state().fault.clone()
    }

    /// Every request so far, in arrival order (including rejected and faulted).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.state().requests.len()
    }

    /// Requests answered with anything but success.
    pub fn rejected_count(&self) -> usize {
        self.state().requests.iter().filter(|r| !r.accepted).count()
    }

    /// Requests answered 429 Too Many Requests (by any fault).
    pub fn throttled_count(&self) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|r| r.response_status == 429)
            .count()
    }

    /// Delays every reply by `latency` from now on, on top of any fault
    /// (a remote API's round trip).
    pub fn set_latency(&self, latency: Duration) {
        self.state().latency = latency;
    }

    /// The most requests the receiver was handling at one time since the
    /// start or the last [`Receiver::reset_records`].
    pub fn max_concurrent(&self) -> usize {
        self.state().max_active
    }

    /// TCP connections accepted since the start or the last
    /// [`Receiver::reset_records`] (TLS handshakes that failed included).
    pub fn connection_count(&self) -> usize {
        self.state().connection_count
    }

    /// Accepted identify entries (`{id, traits}`), in arrival order.
    ///
    /// Empty for entries accepted while [`Receiver::set_keep_bodies`] is off.
    pub fn identifies(&self) -> Vec<Value> {
        self.state().identifies.clone()
    }

    pub fn identify_count(&self) -> usize {
        self.state().identify_count
    }

    /// Accepted track events as `(contact id as string, event object)`.
    pub fn tracks(&self) -> Vec<(String, Value)> {
        self.state().tracks.clone()
    }

    pub fn track_count(&self) -> usize {
        self.state().tracks.len()
    }

    /// Track events whose contact had not been identified before them.
    pub fn orphan_tracks(&self) -> Vec<(String, Value)> {
        self.state().orphan_tracks.clone()
    }

    /// Merged contact state (id as string → traits), as ConveYour would hold it.
    pub fn contacts(&self) -> HashMap<String, Map<String, Value>> {
        self.state().contacts.clone()
    }

    pub fn contact(&self, id: &str) -> Option<Map<String, Value>> {
        self.state().contacts.get(id).cloned()
    }

    pub fn contact_count(&self) -> usize {
        self.state().contacts.len()
    }

    /// Runs `f` on the recorded state without cloning it (for big tests).
    pub fn with_contacts<T>(&self, f: impl FnOnce(&HashMap<String, Map<String, Value>>) -> T) -> T {
        f(&self.state().contacts)
    }

    /// For very large tests (default on): when off, accepted requests are
    /// recorded with a `Null` body and identify entries are only counted
    /// (contacts, tracks and rejected bodies are still kept).
    pub fn set_keep_bodies(&self, keep: bool) {
        self.state().light = !keep;
    }

    /// Forgets everything recorded so far, connections counted included
    /// (the fault stays as it is).
    pub fn reset_records(&self) {
        let mut st = self.state();
        st.connection_count = 0;
        st.max_active = st.active;
        st.requests.clear();
        st.identifies.clear();
        st.identify_count = 0;
        st.tracks.clear();
        st.orphan_tracks.clear();
        st.contacts.clear();
    }

    /// Request counts by endpoint and status, for failure messages.
    pub fn summary(&self) -> String {
        let st = self.state();
        let mut by: BTreeMap<(String, u16), usize> = BTreeMap::new();
        for r in &st.requests {
            *by.entry((r.endpoint.clone(), r.response_status))
                .or_default() += 1;
        }
        let mut out = format!(
            "{} requests ({} accepted), {} identifies, {} tracks, {} contacts, fault {:?}",
            st.requests.len(),
            st.requests.iter().filter(|r| r.accepted).count(),
            st.identify_count,
            st.tracks.len(),
            st.contacts.len(),
            st.fault
        );
        for ((endpoint, status), n) in by {
            out.push_str(&format!("\n  {endpoint} -> {status}: {n}"));
        }
        if let Some(last) = st.requests.iter().rev().find(|r| !r.accepted) {
            out.push_str(&format!(
                "\n  last rejection: {} {} -> {} {:?}",
                last.method, last.endpoint, last.response_status, last.error
            ));
        }
        out
    }

    /// Polls `pred` every 50 ms; panics with `what` and a summary on timeout.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Receiver) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(self) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\nreceiver: {}",
                    self.summary()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state()
    }

    fn rebind(&self) {
        let _guard = self.inner.handle.enter();
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match std::net::TcpListener::bind(self.inner.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => {
                    panic!("receiver could not re-bind {}: {e}", self.inner.addr)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        serve(&self.inner, listener);
    }
}

fn serve(inner: &Arc<Inner>, listener: tokio::net::TcpListener) {
    let task = inner.handle.spawn({
        let inner = inner.clone();
        async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let mut st = inner.state();
                st.connection_count += 1;
                st.last_connection += 1;
                let number = st.last_connection;
                let conn = inner
                    .handle
                    .spawn(serve_connection(inner.clone(), stream, number));
                st.connections.retain(|h| !h.is_finished());
                st.connections.push(conn.abort_handle());
            }
        }
    });
    inner.state().accept_task = Some(task.abort_handle());
}

type Reply = Response<Full<Bytes>>;

async fn serve_connection(receiver: Arc<Inner>, stream: tokio::net::TcpStream, number: usize) {
    // A second handle on the socket, so a `Reset` can set SO_LINGER 0 and be
    // the last one to close it.
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    let Ok(control) = std_stream.try_clone() else {
        return;
    };
    let Ok(stream) = tokio::net::TcpStream::from_std(std_stream) else {
        return;
    };
    let reset = Arc::new(Notify::new());
    let service = {
        let reset = reset.clone();
        let receiver = receiver.clone();
        service_fn(move |req: Request<Incoming>| {
            let receiver = receiver.clone();
            let reset = reset.clone();
            async move { Ok::<_, Infallible>(handle(receiver, req, reset, number).await) }
        })
    };
    let conn = async {
        let Some(tls) = &receiver.tls else {
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            return;
        };
        // A client that does not trust the certificate gives up here.
        let Ok(stream) = tls.acceptor.accept(stream).await else {
            return;
        };
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        } else {
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    };
    tokio::select! {
        _ = conn => {}
        _ = reset.notified() => {
            if let Ok(control) = tokio::net::TcpStream::from_std(control) {
                #[allow(deprecated)]
                let _ = control.set_linger(Some(Duration::ZERO));
                // `conn` (the other handle) is dropped when select! returns,
                // then `control` here: the last close sends RST.
                drop(control);
            }
        }
    }
}

fn reply(status: u16, body: &Value) -> Reply {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn error_body(message: &str) -> Value {
    json!({"status": "error", "message": message})
}

/// What the fault (if any) does to this request.
enum FaultAction {
    None,
    Answer(u16, Option<u64>),
    BodyError,
    Reset,
    Delay(Duration),
    RejectId(String),
    RejectValue(String),
    /// 429 from `RateLimit`: its `Retry-After` and the rate.
    RateLimited(u64, u32),
}

fn take_fault_action(st: &mut State) -> FaultAction {
    match st.fault.clone() {
        None => FaultAction::None,
        Some(Fault::Status(s)) => FaultAction::Answer(s, None),
        Some(Fault::StatusTimes(s, n)) => {
            if n <= 1 {
                st.fault = None;
            } else {
                st.fault = Some(Fault::StatusTimes(s, n - 1));
            }
            if n == 0 {
                FaultAction::None
            } else {
                FaultAction::Answer(s, None)
            }
        }
        Some(Fault::TooManyRequests { retry_after_secs }) => {
            FaultAction::Answer(429, Some(retry_after_secs))
        }
        Some(Fault::BodyError) => FaultAction::BodyError,
        Some(Fault::Reset) | Some(Fault::Outage) => FaultAction::Reset,
        Some(Fault::Slow(d)) => FaultAction::Delay(d),
        Some(Fault::RejectId(id)) => FaultAction::RejectId(id),
        Some(Fault::RejectValue(v)) => FaultAction::RejectValue(v),
        Some(Fault::RateLimit {
            per_second,
            retry_after_secs,
        }) => {
            let now = Instant::now();
            while st
                .admitted
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                st.admitted.pop_front();
            }
            if st.admitted.len() < per_second as usize {
                st.admitted.push_back(now);
                FaultAction::None
            } else {
                FaultAction::RateLimited(retry_after_secs, per_second)
            }
        }
        Some(Fault::Chaos {
            seed,
            p_500,
            p_503,
            p_429,
            p_reset,
        }) => {
            let draw = st
                .chaos
                .get_or_insert_with(|| fastrand::Rng::with_seed(seed))
                .f64();
            let mut edge = 0.0;
            let mut below = |p: f64| {
                edge += p;
                draw < edge
            };
            if below(p_500) {
                FaultAction::Answer(500, None)
            } else if below(p_503) {
                FaultAction::Answer(503, None)
            } else if below(p_429) {
                FaultAction::Answer(429, Some(1))
            } else if below(p_reset) {
                FaultAction::Reset
            } else {
                FaultAction::None
            }
        }
    }
}

async fn handle(
    receiver: Arc<Inner>,
    req: Request<Incoming>,
    reset: Arc<Notify>,
    connection: usize,
) -> Reply {
    let endpoint = req.uri().path().to_string();
    let version = format!("{:?}", req.version());
    let method = req.method().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut record = RecordedRequest {
        idempotency_key: headers
            .iter()
            .find(|(k, _)| k == "idempotency-key")
            .map(|(_, v)| v.clone()),
        endpoint,
        method,
        headers,
        body: Value::Null,
        response_status: 0,
        accepted: false,
        error: None,
        version,
        connection,
    };

    let latency = {
        let mut st = receiver.state();
        st.active += 1;
        st.max_active = st.max_active.max(st.active);
        st.latency
    };
    let _active = Active(receiver.clone());
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let action = take_fault_action(&mut receiver.state());
    match action {
        FaultAction::Reset => {
            record.error = Some("injected connection reset".into());
            receiver.state().requests.push(record);
            reset.notify_one();
            // Never answer: the connection is torn down under us.
            return std::future::pending::<Reply>().await;
        }
        FaultAction::Delay(d) => tokio::time::sleep(d).await,
        _ => {}
    }

    // Read the body (even for faulted requests, so the recording is complete).
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            record.error = Some(format!("reading the body failed: {e}"));
            receiver.state().requests.push(record);
            return reply(400, &error_body("could not read the request body"));
        }
    };
    let parsed: Result<Value, String> = serde_json::from_slice(&bytes).map_err(|e| e.to_string());
    let raw_body = || match &parsed {
        Ok(v) => v.clone(),
        Err(_) => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
    };

    let finish = |mut record: RecordedRequest, status: u16, message: &str| -> Reply {
        record.body = raw_body();
        record.response_status = status;
        record.error = Some(message.to_string());
        receiver.state().requests.push(record);
        reply(status, &error_body(message))
    };

    match action {
        FaultAction::Answer(status, retry_after) => {
            let mut resp = finish(record, status, "injected");
            if let Some(secs) = retry_after {
                resp.headers_mut()
                    .insert("retry-after", secs.to_string().parse().unwrap());
            }
            return resp;
        }
        FaultAction::BodyError => {
            return finish(record, 200, "injected");
        }
        FaultAction::RateLimited(retry_after, per_second) => {
            let message = format!("rate limit: more than {per_second} requests in a second");
            let mut resp = finish(record, 429, &message);
            resp.headers_mut()
                .insert("retry-after", retry_after.to_string().parse().unwrap());
            return resp;
        }
        _ => {}
    }

    // The contract, strictly.
    let kind = match (record.method.as_str(), record.endpoint.as_str()) {
        ("POST", IDENTIFY_PATH) => Endpoint::Identify,
        ("POST", TRACK_PATH) => Endpoint::Track,
        (m, p) => {
            let msg = format!("no route for {m} {p}");
            return finish(record, 404, &msg);
        }
    };
    if record.header("x-conveyour-appkey") != Some(receiver.appkey.as_str()) {
        return finish(record, 401, "missing or wrong x-conveyour-appkey");
    }
    if record.header("x-conveyour-token") != Some(receiver.token.as_str()) {
        return finish(record, 401, "missing or wrong x-conveyour-token");
    }
    if record
        .header("content-type")
        .is_none_or(|v| media_type(v) != "application/json")
    {
        return finish(record, 415, "Content-Type must be application/json");
    }
    if !record.header("accept").is_some_and(|v| {
        v.split(',')
            .any(|part| media_type(part) == "application/json")
    }) {
        return finish(record, 406, "Accept must include application/json");
    }
    let body = match &parsed {
        Ok(v) => v,
        Err(e) => return finish(record, 400, &format!("body is not valid JSON: {e}")),
    };
    let checked = match kind {
        Endpoint::Identify => check_identify(body),
        Endpoint::Track => check_track(body),
    };
    if let Err(msg) = checked {
        return finish(record, 400, &msg);
    }
    if let FaultAction::RejectId(bad) = &action {
        if ids_of(kind, body).iter().any(|id| id == bad) {
            return finish(record, 400, &format!("injected rejection of contact {bad}"));
        }
    }

    if let FaultAction::RejectValue(bad) = &action {
        if field_values(body).any(|v| v.as_str() == Some(bad)) {
            return finish(
                record,
                400,
                &format!("injected rejection of the value {bad}"),
            );
        }
    }

    // Accepted: apply it.
    let body = parsed.unwrap_or_default();
    record.response_status = 200;
    record.accepted = true;
    let mut guard = receiver.state();
    let st = &mut *guard;
    match kind {
        Endpoint::Identify => {
            let entries: Vec<&Value> = match &body {
                Value::Array(items) => items.iter().collect(),
                one => vec![one],
            };
            for entry in entries {
                let id = id_string(&entry["id"]);
                let contact = st.contacts.entry(id).or_default();
                if let Some(traits) = entry["traits"].as_object() {
                    for (k, v) in traits {
                        apply_trait(contact, k, v);
                    }
                }
                st.identify_count += 1;
                if !st.light {
                    st.identifies.push(entry.clone());
                }
            }
        }
        Endpoint::Track => {
            let id = id_string(&body["id"]);
            let known = st.contacts.contains_key(&id);
            if let Some(events) = body["events"].as_array() {
                for event in events {
                    if !known {
                        st.orphan_tracks.push((id.clone(), event.clone()));
                    }
                    st.tracks.push((id.clone(), event.clone()));
                }
            }
        }
    }
    if !st.light {
        record.body = body;
    }
    st.requests.push(record);
    drop(guard);
    reply(200, &json!({"status": "ok"}))
}

#[derive(Clone, Copy)]
enum Endpoint {
    Identify,
    Track,
}

fn media_type(v: &str) -> String {
    v.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// A contact id as ConveYour matches it: strings as-is, numbers as printed.
pub fn id_string(id: &Value) -> String {
    match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn ids_of(kind: Endpoint, body: &Value) -> HashSet<String> {
    match (kind, body) {
        (Endpoint::Identify, Value::Array(items)) => {
            items.iter().map(|e| id_string(&e["id"])).collect()
        }
        _ => std::iter::once(id_string(&body["id"])).collect(),
    }
}

/// Every identify trait and event property value in a body.
fn field_values(body: &Value) -> impl Iterator<Item = &Value> {
    let entries: Vec<&Value> = match body {
        Value::Array(items) => items.iter().collect(),
        Value::Object(o) => match o.get("events").and_then(Value::as_array) {
            Some(events) => events.iter().collect(),
            None => vec![body],
        },
        _ => Vec::new(),
    };
    entries.into_iter().flat_map(|e| {
        ["traits", "properties"]
            .into_iter()
            .filter_map(move |k| e.get(k).and_then(Value::as_object))
            .flat_map(|m| m.values())
    })
}

fn check_id(v: Option<&Value>, at: &str) -> Result<(), String> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => Ok(()),
        Some(Value::Number(_)) => Ok(()),
        Some(Value::String(_)) => Err(format!("{at}: id must not be empty")),
        Some(other) => Err(format!("{at}: id must be a string or number, got {other}")),
        None => Err(format!("{at}: id is required")),
    }
}

fn is_scalar(v: &Value) -> bool {
    !matches!(v, Value::Array(_) | Value::Object(_))
}

fn check_identify(body: &Value) -> Result<(), String> {
    match body {
        Value::Array(items) if items.is_empty() => {
            Err("identify array must not be empty".to_string())
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_identify_entry(item, &format!("[{i}]"))?;
            }
            Ok(())
        }
        Value::Object(_) => check_identify_entry(body, "body"),
        _ => Err("identify body must be an object or an array of objects".to_string()),
    }
}

fn check_identify_entry(entry: &Value, at: &str) -> Result<(), String> {
    let Some(obj) = entry.as_object() else {
        return Err(format!("{at}: identify entries must be objects"));
    };
    if let Some(k) = obj.keys().find(|k| *k != "id" && *k != "traits") {
        return Err(format!("{at}: unknown key {k:?} (only id and traits)"));
    }
    check_id(obj.get("id"), at)?;
    let Some(traits) = obj.get("traits").and_then(Value::as_object) else {
        return Err(format!("{at}: traits must be an object"));
    };
    for (k, v) in traits {
        check_trait(v).map_err(|m| format!("{at}: trait {k:?}: {m}"))?;
    }
    Ok(())
}

fn check_trait(v: &Value) -> Result<(), String> {
    match v {
        Value::Array(items) => {
            if items.iter().all(is_scalar) {
                Ok(())
            } else {
                Err("list values must be scalars".into())
            }
        }
        Value::Object(op) => {
            if op.len() == 1 {
                if let Some(n) = op.get("$inc") {
                    return if n.is_number() {
                        Ok(())
                    } else {
                        Err("$inc needs a number".into())
                    };
                }
            }
            if op.is_empty() || op.keys().any(|k| k != "add" && k != "remove") {
                return Err(
                    "object values must be a list operation {add, remove} or {\"$inc\": n}".into(),
                );
            }
            for (k, list) in op {
                match list.as_array() {
                    Some(items) if items.iter().all(is_scalar) => {}
                    _ => return Err(format!("{k} must be an array of scalars")),
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_track(body: &Value) -> Result<(), String> {
    let Some(obj) = body.as_object() else {
        return Err("track body must be an object".into());
    };
    if let Some(k) = obj.keys().find(|k| *k != "id" && *k != "events") {
        return Err(format!("unknown key {k:?} (only id and events)"));
    }
    check_id(obj.get("id"), "body")?;
    let events = match obj.get("events").and_then(Value::as_array) {
        Some(e) if !e.is_empty() => e,
        _ => return Err("events must be a non-empty array".into()),
    };
    for (i, event) in events.iter().enumerate() {
        let Some(ev) = event.as_object() else {
            return Err(format!("events[{i}] must be an object"));
        };
        if let Some(k) = ev.keys().find(|k| *k != "event" && *k != "properties") {
            return Err(format!(
                "events[{i}]: unknown key {k:?} (only event and properties)"
            ));
        }
        match ev.get("event") {
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => return Err(format!("events[{i}]: event must be a non-empty string")),
        }
        match ev.get("properties") {
            None => {}
            Some(Value::Object(p)) if p.len() > MAX_EVENT_PROPERTIES => {
                return Err(
                    "event objects with more than 15 key/value pairs are blocked".to_string(),
                )
            }
            Some(Value::Object(_)) => {}
            Some(_) => return Err(format!("events[{i}]: properties must be an object")),
        }
    }
    Ok(())
}

/// Merges one trait into a contact: plain values overwrite, `{add, remove}`
/// edits a list (remove first, then add values not already present), and
/// `{"$inc": n}` adds to a number (missing counts as 0).
pub fn apply_trait(contact: &mut Map<String, Value>, key: &str, value: &Value) {
    match value {
        Value::Object(op) if op.contains_key("$inc") => {
            let by = &op["$inc"];
            let current = contact.get(key).cloned().unwrap_or(json!(0));
            let sum = match (current.as_i64(), by.as_i64()) {
                (Some(a), Some(b)) => json!(a.saturating_add(b)),
                _ => json!(current.as_f64().unwrap_or(0.0) + by.as_f64().unwrap_or(0.0)),
            };
            contact.insert(key.to_string(), sum);
        }
        Value::Object(op) => {
            let mut list = match contact.get(key) {
                Some(Value::Array(items)) => items.clone(),
                _ => Vec::new(),
            };
            if let Some(Value::Array(remove)) = op.get("remove") {
                list.retain(|v| !remove.contains(v));
            }
            if let Some(Value::Array(add)) = op.get("add") {
                for v in add {
                    if !list.contains(v) {
                        list.push(v.clone());
                    }
                }
            }
            contact.insert(key.to_string(), Value::Array(list));
        }
        other => {
            contact.insert(key.to_string(), other.clone());
        }
    }
}
