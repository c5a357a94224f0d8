//! Durations as written in policies: `500ms`, `10s`, `1m`, `1h`, `7d`, `1w`, or sums such as `1h30m`.

use std::fmt;

/// A duration in whole milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub i64);

impl Millis {
    /// One second.
    pub const SECOND: Millis = Millis(1000);
    /// One day.
    pub const DAY: Millis = Millis(86_400_000);
    /// The longest duration a policy or request may give: 36,500 days (about 100 years).
    /// A longer window or TTL is a slip of the keyboard, and with durations this small
    /// `now ± duration` stays far from `i64` overflow everywhere time is counted.
    pub const MAX: Millis = Millis(36_500 * 86_400_000);

    /// Parses `10s`, `1m`, `1h30m`, `500ms`, `7d`, `2w`. Zero and negative durations are refused.
    pub fn parse(text: &str) -> Option<Millis> {
        let s = text.trim();
        if s.is_empty() {
            return None;
        }
        let bytes = s.as_bytes();
        let mut i = 0;
        let mut total: i64 = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if start == i {
                return None;
            }
            let n: i64 = s[start..i].parse().ok()?;
            let ustart = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let unit: i64 = match &s[ustart..i] {
                "ms" => 1,
                "s" => 1000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "w" => 7 * 86_400_000,
                _ => return None,
            };
            total = total.checked_add(n.checked_mul(unit)?)?;
        }
        (total > 0 && total <= Millis::MAX.0).then_some(Millis(total))
    }

    /// The duration in days, as a real number (36h = 1.5).
    pub fn as_days(self) -> f64 {
        self.0 as f64 / Self::DAY.0 as f64
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(Millis::parse("500ms"), Some(Millis(500)));
        assert_eq!(Millis::parse("10s"), Some(Millis(10_000)));
        assert_eq!(Millis::parse("1m"), Some(Millis(60_000)));
        assert_eq!(Millis::parse("1h30m"), Some(Millis(5_400_000)));
        assert_eq!(Millis::parse("7d"), Some(Millis(604_800_000)));
        assert_eq!(Millis::parse("1w"), Some(Millis(604_800_000)));
        assert_eq!(Millis::parse("36500d"), Some(Millis::MAX));
        for bad in ["", "10", "10 parsecs", "s", "-1s", "0s", "1.5h", "1x"] {
            assert_eq!(Millis::parse(bad), None, "{bad}");
        }
        // Past the longest accepted duration, or past i64 milliseconds.
        for too_long in [
            "36501d",
            "36500d1ms",
            "9223372036854775807ms",
            "99999999999999d",
        ] {
            assert_eq!(Millis::parse(too_long), None, "{too_long}");
        }
    }

    #[test]
    fn displays_in_the_largest_whole_unit() {
        assert_eq!(Millis(60_000).to_string(), "1m");
        assert_eq!(Millis(90_000).to_string(), "90s");
        assert_eq!(Millis(1500).to_string(), "1500ms");
    }
}
