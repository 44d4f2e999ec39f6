//! The ConveYour side: request building, the HTTP client, and the retry
//! policy that decides what counts as an acknowledgement.

mod batch;
mod blame;
mod client;
mod coalesce;
mod concurrency;
mod error;
mod request;
mod retry;
mod throttle;

pub(crate) use batch::{contact_key, Batcher, ContactKeyHash};
pub(crate) use blame::{probe_contact, Blame, Trial};
pub(crate) use client::Sink;
pub(crate) use concurrency::{Limiter, Permit};
pub use error::SinkError;
pub(crate) use request::{single_body, Request};
pub(crate) use retry::{backoff, Verdict};

/// Which ConveYour API a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Identify,
    Track,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Identify => "/api/analytics/identify",
            Endpoint::Track => "/api/analytics/track",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Identify => "identify",
            Endpoint::Track => "track",
        }
    }
}
