//! Preflight of the ConveYour side: `conveyour.url` answers, and, when the
//! operator names a contact, one identify with the configured credentials
//! is accepted. Nothing is sent to the API unless a contact is named.

use super::result::{fail, pass, CheckResult};
use crate::config::{SinkSettings, APPKEY_ENV, TOKEN_ENV};
use crate::sink::{Endpoint, Request, Sink, Verdict};

const REACHABLE: &str = "conveyour reachable";
const PROBE: &str = "conveyour identify";

/// Checks that `conveyour.url` answers over HTTP(S), with a GET of it that
/// posts nothing. With `probe_id`, then sends ConveYour one identify with
/// empty traits for that contact (`{"id": ID, "traits": {}}`, which
/// creates the contact if the account lacks it), once, with the client,
/// headers, credentials and timeout `run` uses, and reports the answer.
/// The probe is left out when the URL does not answer. Credentials never
/// appear in the lines.
pub async fn conveyour_checks(settings: &SinkSettings, probe_id: Option<&str>) -> Vec<CheckResult> {
    let sink = match Sink::new(settings) {
        Ok(sink) => sink,
        Err(e) => return vec![fail(REACHABLE, e.to_string())],
    };
    let url = &settings.url;
    let reached = match sink.reach().await {
        Ok(status) => pass(
            REACHABLE,
            format!(
                "{url} answers (HTTP {status}); no data sent{}",
                if probe_id.is_none() {
                    "; --probe-id ID also tries the app key and token"
                } else {
                    ""
                }
            ),
        ),
        Err(cause) => {
            return vec![fail(
                REACHABLE,
                one_line(&format!("conveyour.url {url}: {cause}; check the URL, DNS, the network and any proxy or firewall")),
            )]
        }
    };
    let mut out = vec![reached];
    if let Some(id) = probe_id {
        out.push(probe(&sink, url, id).await);
    }
    out
}

/// One identify with empty traits for `id`, and what ConveYour's answer
/// means for `run`.
async fn probe(sink: &Sink, url: &str, id: &str) -> CheckResult {
    let body = serde_json::json!({ "id": id, "traits": {} }).to_string();
    let req = Request::stored(Endpoint::Identify, body.into());
    let mut result = match sink.send_once(&req).await {
        Verdict::Ack => pass(
            PROBE,
            format!("ConveYour accepted an identify of contact {id} with empty traits: conveyour.url, conveyour.appkey and conveyour.token work"),
        ),
        Verdict::Reject {
            status: status @ (401 | 403),
            message,
        } => fail(
            PROBE,
            format!("HTTP {status}: the app key or token is wrong (conveyour.appkey / conveyour.token, or {APPKEY_ENV} / {TOKEN_ENV}); copy both from Settings > Integrations > Analytics; ConveYour said: {message}"),
        ),
        Verdict::Reject {
            status: status @ (404 | 405),
            message,
        } => fail(
            PROBE,
            format!(
                "HTTP {status} from {url}{}: conveyour.url points to the wrong place; set it to the account's base URL, e.g. https://acme.conveyour.com; the answer was: {message}",
                Endpoint::Identify.path()
            ),
        ),
        Verdict::Reject {
            status: status @ 300..=399,
            message,
        } => fail(PROBE, format!("HTTP {status}: {message}")),
        Verdict::Reject { status, message } => fail(
            PROBE,
            format!("HTTP {status}: ConveYour refused the identify of contact {id}: {message}"),
        ),
        Verdict::NotOk { status, message } => fail(
            PROBE,
            format!("HTTP {status}: ConveYour did not accept the identify of contact {id}: {message}"),
        ),
        Verdict::Retry { reason, .. } => fail(
            PROBE,
            format!("ConveYour is unreachable or busy: {reason}; `run` would retry until it answers; try again later, or check conveyour.url and the network"),
        ),
    };
    // An HTML error page in the reply would break one line per check.
    result.detail = one_line(&result.detail);
    result
}

/// A reply's text on one line: runs of whitespace, newlines included,
/// become one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
