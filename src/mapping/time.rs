//! Dates and timestamps in the format a field asks for (`time_format`):
//! Unix seconds or milliseconds, or a `%Y %m %d %H %M %S` pattern, in UTC.
//! ISO 8601, the default, is decode's own output.

use serde_json::Value;

use crate::config::TimeFormat;
use crate::decode::value::{to_json, write_json, ValueError, ValueKind};

/// Appends to `out` the JSON of a value under `format`: byte for byte what
/// serde_json writes for [`formatted`]'s value.
pub(crate) fn write_formatted(
    kind: &ValueKind,
    text: &[u8],
    format: &TimeFormat,
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    let timed = matches!(
        kind,
        ValueKind::Date | ValueKind::Timestamp | ValueKind::TimestampTz
    );
    if !timed || *format == TimeFormat::Iso8601 {
        return write_json(kind, text, out);
    }
    let value = formatted(kind, text, format)?;
    // Writing into a Vec cannot fail, and a Value always serialises.
    serde_json::to_writer(&mut *out, &value).map_err(|e| ValueError {
        reason: format!("cannot encode the value as JSON ({e})"),
    })
}

/// A date or timestamp in another format than ISO 8601 (`unix`, `unix_ms`,
/// or a `%Y %m %d %H %M %S` pattern, in UTC); other kinds, and values
/// with no instant (`infinity`, BC dates), convert as [`to_json`] does.
pub(crate) fn formatted(
    kind: &ValueKind,
    text: &[u8],
    format: &TimeFormat,
) -> Result<Value, ValueError> {
    let timed = matches!(
        kind,
        ValueKind::Date | ValueKind::Timestamp | ValueKind::TimestampTz
    );
    if !timed || *format == TimeFormat::Iso8601 {
        return to_json(kind, text);
    }
    let s = std::str::from_utf8(text).map_err(|e| ValueError {
        reason: format!("value is not valid UTF-8 ({e})"),
    })?;
    let Some(t) = Instant::parse(s) else {
        return to_json(kind, text);
    };
    Ok(match format {
        TimeFormat::Iso8601 => unreachable!("handled above"),
        TimeFormat::Unix => Value::from(t.unix_seconds()),
        TimeFormat::UnixMs => Value::from(t.unix_seconds() * 1000 + i64::from(t.micros / 1000)),
        TimeFormat::Pattern(p) => Value::String(t.format(p)),
    })
}

/// A date or timestamp read from Postgres's ISO output, moved to UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Instant {
    /// Days since 1970-01-01.
    days: i64,
    /// Seconds into the day.
    seconds: i64,
    micros: u32,
}

impl Instant {
    /// `YYYY-MM-DD`, `YYYY-MM-DD HH:MM:SS[.ffffff]` and with a `±HH[:MM[:SS]]`
    /// offset. None for `infinity`, BC values and anything else.
    fn parse(s: &str) -> Option<Instant> {
        if s.ends_with(" BC") {
            return None;
        }
        let (date, time) = match s.split_once(' ') {
            Some((d, t)) => (d, Some(t)),
            None => (s, None),
        };
        let mut parts = date.splitn(3, '-');
        let year: i64 = parts.next()?.parse().ok()?;
        let month: u32 = parts.next()?.parse().ok()?;
        let day: u32 = parts.next()?.parse().ok()?;
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
            return None;
        }
        let days = days_from_civil(year, month, day);
        let Some(time) = time else {
            return Some(Instant {
                days,
                seconds: 0,
                micros: 0,
            });
        };
        let (clock, offset) = match time.find(['+', '-']) {
            Some(at) => (&time[..at], Some(&time[at..])),
            None => (time, None),
        };
        let (hms, frac) = match clock.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (clock, None),
        };
        let mut hms = hms.split(':');
        let h: i64 = hms.next()?.parse().ok()?;
        let m: i64 = hms.next()?.parse().ok()?;
        let sec: i64 = hms.next()?.parse().ok()?;
        let micros = match frac {
            Some(f) if !f.is_empty() && f.len() <= 6 && f.bytes().all(|b| b.is_ascii_digit()) => {
                f.parse::<u32>().ok()? * 10u32.pow(6 - f.len() as u32)
            }
            Some(_) => return None,
            None => 0,
        };
        let mut seconds = h * 3600 + m * 60 + sec;
        if let Some(o) = offset {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let mut f = o[1..].split(':');
            let oh: i64 = f.next()?.parse().ok()?;
            let om: i64 = f.next().map(str::parse).transpose().ok()?.unwrap_or(0);
            let os: i64 = f.next().map(str::parse).transpose().ok()?.unwrap_or(0);
            seconds -= sign * (oh * 3600 + om * 60 + os);
        }
        let days = days + seconds.div_euclid(86_400);
        Some(Instant {
            days,
            seconds: seconds.rem_euclid(86_400),
            micros,
        })
    }

    fn unix_seconds(&self) -> i64 {
        self.days * 86_400 + self.seconds
    }

    fn format(&self, pattern: &str) -> String {
        let (y, mo, d) = civil_from_days(self.days);
        let mut out = String::with_capacity(pattern.len() + 8);
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            use std::fmt::Write;
            let _ = match chars.next() {
                Some('Y') => write!(out, "{y:04}"),
                Some('m') => write!(out, "{mo:02}"),
                Some('d') => write!(out, "{d:02}"),
                Some('H') => write!(out, "{:02}", self.seconds / 3600),
                Some('M') => write!(out, "{:02}", self.seconds / 60 % 60),
                Some('S') => write!(out, "{:02}", self.seconds % 60),
                Some('%') => write!(out, "%"),
                Some(other) => write!(out, "%{other}"),
                None => write!(out, "%"),
            };
        }
        out
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn time_formats() {
        let f = |k: &ValueKind, s: &str, fmt: &str| {
            formatted(k, s.as_bytes(), &TimeFormat::parse(fmt).unwrap()).unwrap()
        };
        assert_eq!(
            f(&ValueKind::Date, "2024-01-31", "unix"),
            json!(1_706_659_200)
        );
        assert_eq!(f(&ValueKind::Date, "1970-01-01", "unix_ms"), json!(0));
        assert_eq!(f(&ValueKind::Date, "1969-12-31", "unix"), json!(-86_400));
        assert_eq!(
            f(&ValueKind::Date, "2024-02-29", "%m/%d/%Y"),
            json!("02/29/2024")
        );
        assert_eq!(
            f(&ValueKind::Timestamp, "2024-01-31 10:00:00.123", "unix_ms"),
            json!(1_706_695_200_123i64)
        );
        assert_eq!(
            f(&ValueKind::TimestampTz, "2024-01-31 10:00:00+02", "unix"),
            json!(1_706_688_000)
        );
        assert_eq!(
            f(
                &ValueKind::TimestampTz,
                "2024-01-01 01:30:00+05:30",
                "%Y-%m-%d %H:%M:%S 100%%"
            ),
            json!("2023-12-31 20:00:00 100%")
        );
        assert_eq!(f(&ValueKind::Date, "infinity", "unix"), json!("infinity"));
        assert_eq!(
            f(&ValueKind::Date, "2024-01-31 BC", "unix"),
            json!("2024-01-31 BC")
        );
        assert_eq!(f(&ValueKind::Int, "7", "unix"), json!(7));
        assert_eq!(
            f(&ValueKind::Timestamp, "2024-01-31 10:00:00", "iso8601"),
            json!("2024-01-31T10:00:00")
        );
        for days in [-800_000i64, -1, 0, 1, 19_753, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    /// The writer and the converter agree under every format.
    #[test]
    fn write_formatted_writes_what_serde_json_writes_for_formatted() {
        use ValueKind::*;
        let cases: Vec<(ValueKind, &str)> = vec![
            (Int, "7"),
            (Text, "plain"),
            (Date, "2024-01-31"),
            (Date, "infinity"),
            (Timestamp, "2024-01-31 10:00:00.123"),
            (Timestamp, "-infinity"),
            (Timestamp, "2024-01-31 10:00:00 BC"),
            (TimestampTz, "2024-01-31 10:00:00+00"),
            (TimestampTz, "2024-01-31 10:00:00.5-08"),
            (TimestampTz, "2024-01-31 10:00:00+05:30"),
        ];
        let formats = [
            TimeFormat::Iso8601,
            TimeFormat::Unix,
            TimeFormat::UnixMs,
            TimeFormat::parse("%d/%m/%Y").unwrap(),
        ];
        for (kind, text) in &cases {
            for format in &formats {
                let expected = formatted(kind, text.as_bytes(), format)
                    .map(|v| serde_json::to_vec(&v).unwrap());
                let mut out = Vec::new();
                let written =
                    write_formatted(kind, text.as_bytes(), format, &mut out).map(|()| out);
                assert_eq!(
                    written
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned()),
                    expected
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned()),
                    "{kind:?} {text:?} {format:?}"
                );
            }
        }
    }
}
