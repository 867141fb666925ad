//! RouterOS time values: `30s`, `2m`, `1h`, `1d2h3m4s`, `1w`, `500ms`,
//! `hh:mm:ss`, or a bare number of seconds. Printed back in the compact form.

use std::time::Duration;

/// Parses a RouterOS time value; `None` if it is not one.
pub fn parse(text: &str) -> Option<Duration> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    if t.contains(':') {
        let parts: Vec<&str> = t.split(':').collect();
        if parts.len() != 3 {
            return None;
        }
        let mut secs = 0u64;
        for p in parts {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            secs = secs.checked_mul(60)?.checked_add(p.parse::<u64>().ok()?)?;
        }
        return Some(Duration::from_secs(secs));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(t.parse().ok()?));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit = Duration::from_millis(match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 604_800_000,
            _ => return None,
        });
        rest = &rest[unit_len..];
        total = total.checked_add(unit.checked_mul(u32::try_from(n).ok()?)?)?;
    }
    Some(total)
}

/// Prints a duration the way RouterOS does: `2m`, `1h30m`, `1d2h3m4s`, `0s`.
pub fn format(d: Duration) -> String {
    let mut ms = d.as_millis() as u64;
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, len) in [("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)]
    {
        if ms >= len {
            out.push_str(&format!("{}{unit}", ms / len));
            ms %= len;
        }
    }
    out
}

/// The current UTC time as RouterOS's `export` header writes it:
/// `YYYY-MM-DD HH:MM:SS`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    utc(secs)
}

/// `secs` since the Unix epoch as `YYYY-MM-DD HH:MM:SS` (UTC; the civil
/// calendar from days, after Howard Hinnant's `civil_from_days`).
fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400 + 3661), "2000-02-29 01:01:01");
        assert_eq!(utc(1_795_000_000), "2026-11-18 11:06:40");
    }

    /// The manual's forms and RouterOS's other spellings parse to the same durations.
    #[test]
    fn parses_routeros_forms() {
        assert_eq!(parse("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("1d2h3m4s"), Some(Duration::from_secs(86400 + 7200 + 180 + 4)));
        assert_eq!(parse("00:02:00"), Some(Duration::from_secs(120)));
        assert_eq!(parse("45"), Some(Duration::from_secs(45)));
        assert_eq!(parse("1w"), Some(Duration::from_secs(604800)));
        assert_eq!(parse("1500ms"), Some(Duration::from_millis(1500)));
    }

    /// Garbage is refused rather than half-parsed.
    #[test]
    fn refuses_garbage() {
        for bad in ["", "m", "2x", "2m3", "-1s", "1:2", "a:b:c", "99999999999999999999s"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    /// Formatting is compact and round-trips.
    #[test]
    fn formats_compactly() {
        assert_eq!(format(Duration::from_secs(120)), "2m");
        assert_eq!(format(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format(Duration::from_secs(93784)), "1d2h3m4s");
        assert_eq!(format(Duration::from_millis(1500)), "1s500ms");
        for s in ["2m", "1h30m", "1d2h3m4s", "3s", "1w2d"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
