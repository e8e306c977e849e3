//! Sizes (`20GiB`) and durations (`15s`) as written in `config.kdl`.
//!
//! Errors are plain sentences; the parser pins them to a place in the file.

use std::time::Duration;

/// Parses a size: a number (optionally with a decimal fraction) and a unit.
/// `B`, `KiB`, `MiB`, `GiB`, `TiB` count in 1024s; `KB`, `MB`, `GB`, `TB` in
/// 1000s, as on disk labels. Units are case-insensitive; a bare number is
/// bytes. Fractions of a byte are dropped.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.trim();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "unknown size unit {unit:?}: use B, KiB, MiB, GiB, TiB (powers of 1024) \
                 or KB, MB, GB, TB (powers of 1000)"
            ));
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || fraction.contains('.') || (number.contains('.') && fraction.is_empty()) {
        return Err(format!(
            "{text:?} is not a size: write a number and a unit, like \"20GiB\""
        ));
    }
    // Exact arithmetic in u128 so "1.5GiB" is exactly 1.5 × 2^30.
    let too_big = || format!("{text:?} is too large");
    let whole: u128 = whole.parse().map_err(|_| too_big())?;
    let mut bytes = whole
        .checked_mul(u128::from(multiplier))
        .ok_or_else(too_big)?;
    if !fraction.is_empty() {
        if fraction.len() > 9 {
            return Err(format!("{text:?} has more decimals than make sense"));
        }
        let digits: u128 = fraction.parse().map_err(|_| too_big())?;
        let scale = 10u128.pow(fraction.len() as u32);
        bytes += digits * u128::from(multiplier) / scale;
    }
    u64::try_from(bytes).map_err(|_| too_big())
}

/// Parses a duration: one or more `<integer><unit>` parts, units `ms`, `s`,
/// `m`, `h`, `d` (`500ms`, `15s`, `1h30m`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("empty duration: write a number and a unit, like \"15s\"".to_owned());
    }
    let mut rest = trimmed;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "{trimmed:?} is not a duration: expected a number at {rest:?}"
            ));
        }
        let (number, after) = rest.split_at(digits);
        if after.starts_with('.') {
            return Err(format!(
                "{trimmed:?} has a fraction: durations are whole numbers \
                 (write \"1500ms\" rather than \"1.5s\")"
            ));
        }
        let unit_len = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{trimmed:?} is too large"))?;
        let seconds_per_unit = match unit {
            "ms" => None,
            "s" => Some(1),
            "m" => Some(60),
            "h" => Some(3_600),
            "d" => Some(86_400),
            "" => {
                return Err(format!(
                    "{trimmed:?} has no unit: write e.g. \"{number}s\" (units: ms, s, m, h, d)"
                ));
            }
            other => {
                return Err(format!(
                    "unknown duration unit {other:?} in {trimmed:?}: use ms, s, m, h or d"
                ));
            }
        };
        let part = match seconds_per_unit {
            None => Some(Duration::from_millis(number)),
            Some(per) => number.checked_mul(per).map(Duration::from_secs),
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(|| format!("{trimmed:?} is too large"))?;
        rest = after;
    }
    Ok(total)
}

/// `1536` → `1.5 KiB`: sizes in messages and the admin UI.
pub(crate) fn format_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_binary_and_decimal_units() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("512", 512),
            ("512B", 512),
            ("1KiB", 1024),
            ("10MiB", 10 << 20),
            ("20GiB", 20 << 30),
            ("2TiB", 2 << 40),
            ("1KB", 1000),
            ("3MB", 3_000_000),
            ("1GB", 1_000_000_000),
            ("1.5GiB", 3 << 29),
            ("20 gib", 20 << 30),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text), Ok(*want), "{text}");
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        for text in [
            "",
            "GiB",
            "10G",
            "1.2.3MiB",
            "1.MiB",
            "-5MiB",
            "99999999999TiB",
        ] {
            assert!(parse_size(text).is_err(), "{text} should be refused");
        }
        assert!(parse_size("10G").unwrap_err().contains("unknown size unit"));
    }

    #[test]
    fn durations_with_units_and_combinations() {
        let cases: &[(&str, Duration)] = &[
            ("500ms", Duration::from_millis(500)),
            ("15s", Duration::from_secs(15)),
            ("10m", Duration::from_secs(600)),
            ("1h", Duration::from_secs(3600)),
            ("2d", Duration::from_secs(2 * 86_400)),
            ("1h30m", Duration::from_secs(5400)),
            ("1s500ms", Duration::from_millis(1500)),
            ("0s", Duration::ZERO),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(*want), "{text}");
        }
    }

    #[test]
    fn bad_durations_say_why() {
        assert!(parse_duration("15").unwrap_err().contains("no unit"));
        assert!(parse_duration("1.5s").unwrap_err().contains("1500ms"));
        assert!(parse_duration("5 min").is_err());
        assert!(
            parse_duration("3w")
                .unwrap_err()
                .contains("unknown duration unit")
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
    }
}
