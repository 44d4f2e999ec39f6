//! What a ConveYour reply means, as a pure function of the reply, and how
//! long to wait before trying again.

use std::time::{Duration, SystemTime};

/// The verdict on one HTTP exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// 2xx and a JSON body whose `status` is `"ok"`: ConveYour stored it.
    Ack,
    /// Worth trying again, optionally not before the server said.
    /// `status` is the HTTP status, `None` when no reply came (connection
    /// error, timeout).
    Retry {
        status: Option<u16>,
        reason: String,
        after: Option<Duration>,
    },
    /// 2xx but the body does not say ok. Retried a bounded number of times,
    /// then treated as a rejection.
    NotOk { status: u16, message: String },
    /// ConveYour will never accept this request as it is.
    Reject { status: u16, message: String },
}

/// Longest Retry-After honoured; a larger value is clamped so a bogus
/// header cannot park the connector for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Classifies a reply. 408, 429 and 5xx other than 501 are transient
/// (ConveYour or a proxy is busy or down); other 4xx mean the request
/// itself is wrong; 501 (Not Implemented) means the address serves no such
/// endpoint, which waiting does not change; 2xx is an acknowledgement only
/// if the body's `status` is `"ok"`, which is how ConveYour's own clients
/// read success.
pub(crate) fn classify(status: u16, retry_after: Option<&str>, body: &[u8]) -> Verdict {
    let message = body_message(body);
    match status {
        200..=299 => match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) if v.get("status").and_then(|s| s.as_str()) == Some("ok") => Verdict::Ack,
            Ok(_) => Verdict::NotOk {
                status,
                message: format!("the body's status is not \"ok\": {message}"),
            },
            Err(_) => Verdict::NotOk {
                status,
                message: format!("the body is not JSON: {message}"),
            },
        },
        300..=399 => Verdict::Reject {
            status,
            message: "ConveYour answered with a redirect; set conveyour.url to the address it redirects to (https?)".to_owned(),
        },
        501 => Verdict::Reject { status, message },
        408 | 429 | 500..=599 => Verdict::Retry {
            status: Some(status),
            reason: format!("HTTP {status}: {message}"),
            after: retry_after
                .and_then(parse_retry_after)
                .map(|d| d.min(MAX_RETRY_AFTER)),
        },
        _ => Verdict::Reject { status, message },
    }
}

/// ConveYour's message from an error body, or the body itself, shortened.
fn body_message(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => match v.get("message").and_then(|m| m.as_str()) {
            Some(m) => m.to_owned(),
            None => v.to_string(),
        },
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".to_owned();
    }
    match text.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// Retry-After as delay-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The wait before trying again: the backoff, or longer when the server
/// asked for longer. A Retry-After of 0 (or a date already past) does not
/// drop the backoff: a server that keeps saying "now" would otherwise be
/// sent to in a loop with no pause at all.
pub(crate) fn retry_wait(after: Option<Duration>, backoff: Duration) -> Duration {
    after.map_or(backoff, |after| after.max(backoff))
}

/// Capped exponential backoff with jitter: attempt n waits between half and
/// all of `min * 2^n`, capped at `max`, so many connectors retrying at once
/// spread out.
pub(crate) fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let full = min
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(max);
    let half = full / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_needs_status_ok_in_the_body() {
        assert_eq!(classify(200, None, br#"{"status":"ok"}"#), Verdict::Ack);
        assert_eq!(
            classify(201, None, br#"{"status":"ok","id":1}"#),
            Verdict::Ack
        );
        assert!(
            matches!(classify(200, None, br#"{"status":"error","message":"bad"}"#), Verdict::NotOk { message, .. } if message.contains("bad"))
        );
        assert!(matches!(classify(200, None, b""), Verdict::NotOk { .. }));
        assert!(matches!(
            classify(200, None, b"<html>"),
            Verdict::NotOk { .. }
        ));
        assert!(matches!(
            classify(200, None, br#"{"status":"OK"}"#),
            Verdict::NotOk { .. }
        ));
    }

    #[test]
    fn transient_statuses_are_retried() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(classify(s, None, b""), Verdict::Retry { .. }),
                "{s}"
            );
        }
        assert_eq!(
            classify(429, Some("7"), b""),
            Verdict::Retry {
                status: Some(429),
                reason: "HTTP 429: (empty body)".into(),
                after: Some(Duration::from_secs(7))
            }
        );
        assert!(matches!(
            classify(503, Some("99999"), b""),
            Verdict::Retry { after: Some(d), .. } if d == MAX_RETRY_AFTER
        ));
    }

    #[test]
    fn other_client_errors_are_rejections_with_conveyours_message() {
        for s in [400, 401, 403, 404, 413, 422] {
            assert!(
                matches!(classify(s, None, b""), Verdict::Reject { .. }),
                "{s}"
            );
        }
        match classify(
            400,
            None,
            br#"{"status":"error","message":"too many properties"}"#,
        ) {
            Verdict::Reject { status, message } => {
                assert_eq!(status, 400);
                assert_eq!(message, "too many properties");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_status_travels_in_the_verdict_not_in_its_text() {
        // A message that reads like a 429 is not one, and a 429 whose body
        // says something else still is.
        assert!(matches!(
            classify(503, None, br#"{"message":"HTTP 429 upstream"}"#),
            Verdict::Retry {
                status: Some(503),
                ..
            }
        ));
        assert!(matches!(
            classify(429, None, br#"{"message":"slow down"}"#),
            Verdict::Retry {
                status: Some(429),
                ..
            }
        ));
    }

    #[test]
    fn not_implemented_is_a_refusal_not_an_outage() {
        match classify(501, None, b"no such endpoint") {
            Verdict::Reject { status, message } => {
                assert_eq!(status, 501);
                assert_eq!(message, "no such endpoint");
            }
            other => panic!("{other:?}"),
        }
        for s in [500, 502, 503, 504, 505, 599] {
            assert!(
                matches!(classify(s, None, b""), Verdict::Retry { .. }),
                "{s}"
            );
        }
    }

    #[test]
    fn a_retry_after_of_now_still_backs_off() {
        let backoff = Duration::from_millis(400);
        assert_eq!(retry_wait(Some(Duration::ZERO), backoff), backoff);
        assert_eq!(
            retry_wait(
                parse_retry_after(&httpdate::fmt_http_date(SystemTime::UNIX_EPOCH)),
                backoff
            ),
            backoff
        );
        assert_eq!(retry_wait(None, backoff), backoff);
        // A longer wait asked for is honoured.
        assert_eq!(
            retry_wait(Some(Duration::from_secs(7)), backoff),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn retry_after_accepts_http_dates() {
        let later = SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 0..40 {
            let d = backoff(attempt, min, max);
            let full = (min * 2u32.pow(attempt.min(20))).min(max);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }
}
