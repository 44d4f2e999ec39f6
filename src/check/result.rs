//! One check's outcome, and how it prints.

use std::fmt;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Ok,
    /// `run` works, but not as well as it could; the detail says how to
    /// fix it. Does not fail `check`.
    Warn,
    /// `run` would fail or do harm; fails `check`.
    Fail,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub name: String,
    pub mark: Mark,
    /// What was found, or the problem and its fix.
    pub detail: String,
}

impl CheckResult {
    /// Whether this check fails `check` (warnings do not).
    pub fn failed(&self) -> bool {
        self.mark == Mark::Fail
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.mark {
            Mark::Ok => "ok  ",
            Mark::Warn => "WARN",
            Mark::Fail => "FAIL",
        };
        write!(f, "{mark} {}: {}", self.name, self.detail)
    }
}

pub(super) fn result(name: &str, mark: Mark, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        name: name.to_owned(),
        mark,
        detail: detail.into(),
    }
}

pub(super) fn pass(name: &str, detail: impl Into<String>) -> CheckResult {
    result(name, Mark::Ok, detail)
}

pub(super) fn warn(name: &str, detail: impl Into<String>) -> CheckResult {
    result(name, Mark::Warn, detail)
}

pub(super) fn fail(name: &str, detail: impl Into<String>) -> CheckResult {
    result(name, Mark::Fail, detail)
}
