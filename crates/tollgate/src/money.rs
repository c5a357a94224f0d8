//! Money as integer micro-dollars (1 = 0.000001 USD).
//!
//! Every amount inside tollgate is a [`Micros`]; decimal text only appears at the edges
//! (policy files, request JSON, decisions). Parsing is exact: no `f64` arithmetic touches
//! an amount. A JSON or YAML *number* is first turned into its shortest round-trip decimal
//! text, which is exact for any decimal a person writes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An amount of money in micro-dollars.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(pub i64);

/// Why a decimal amount could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// The text is not a decimal number.
    #[error("`{0}` is not a decimal amount (write e.g. \"0.25\")")]
    NotDecimal(String),
    /// More than six decimal places: below one micro-dollar.
    #[error("`{0}` has more than 6 decimal places (the unit is one micro-dollar)")]
    TooPrecise(String),
    /// The amount does not fit.
    #[error("`{0}` is too large")]
    TooLarge(String),
}

impl Micros {
    /// Zero dollars.
    pub const ZERO: Micros = Micros(0);
    /// Micro-dollars per dollar.
    pub const PER_USD: i64 = 1_000_000;

    /// Parses a decimal amount such as `"0.0042"`, `"5"`, `"-1.5"`.
    pub fn parse(text: &str) -> Result<Micros, MoneyError> {
        let s = text.trim();
        let err = || MoneyError::NotDecimal(text.to_string());
        let (neg, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (int_part, frac_part) = match digits.split_once('.') {
            Some((i, f)) => (i, f),
            None => (digits, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(err());
        }
        if !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(err());
        }
        let frac_trimmed = frac_part.trim_end_matches('0');
        if frac_trimmed.len() > 6 {
            return Err(MoneyError::TooPrecise(text.to_string()));
        }
        let large = || MoneyError::TooLarge(text.to_string());
        let mut value: i64 = 0;
        for b in int_part.bytes() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(i64::from(b - b'0')))
                .ok_or_else(large)?;
        }
        value = value.checked_mul(Self::PER_USD).ok_or_else(large)?;
        let mut frac: i64 = 0;
        for (i, b) in frac_trimmed.bytes().enumerate() {
            frac += i64::from(b - b'0') * 10_i64.pow(5 - i as u32);
        }
        value = value.checked_add(frac).ok_or_else(large)?;
        Ok(Micros(if neg { -value } else { value }))
    }

    /// Parses a number that arrived as a JSON/YAML float, through its shortest decimal text.
    pub fn from_f64(value: f64) -> Result<Micros, MoneyError> {
        if !value.is_finite() {
            return Err(MoneyError::NotDecimal(value.to_string()));
        }
        // `Display` for f64 prints the shortest text that reads back to the same float,
        // without an exponent, so "0.1" stays "0.1".
        Micros::parse(&format!("{value}"))
    }

    /// Whole dollars.
    pub fn from_usd(dollars: i64) -> Micros {
        Micros(dollars * Self::PER_USD)
    }

    /// The amount as a decimal, for expressions and ratios (never for accounting).
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / Self::PER_USD as f64
    }

    /// The largest cost a `record` accepts: 2^53 − 1 micro-dollars (about 9.0 billion
    /// dollars), the largest integer every ledger backend holds exactly (the Redis ledger's
    /// scripts compute in doubles, and wrote a cost of 10^17 or more as a float that Redis
    /// then refused halfway through the record).
    pub const MAX_RECORDED: Micros = Micros((1 << 53) - 1);

    /// Why a `record` cannot take this cost, if it cannot: `negative` (spend only grows)
    /// or `too large` (over [`Micros::MAX_RECORDED`]). The library and the HTTP API refuse
    /// the same costs.
    pub fn unrecordable(self) -> Option<&'static str> {
        if self.0 < 0 {
            Some("negative")
        } else if self > Micros::MAX_RECORDED {
            Some("too large")
        } else {
            None
        }
    }

    /// Saturating addition.
    pub fn saturating_add(self, other: Micros) -> Micros {
        Micros(self.0.saturating_add(other.0))
    }
}

impl Micros {
    /// `3.120000`, written without the formatting machinery (it runs on every decision).
    pub fn to_decimal(self) -> String {
        self.write_decimal(&mut [0u8; 28]).to_string()
    }

    /// Writes the decimal form at the end of `buf` and returns it.
    pub(crate) fn write_decimal(self, buf: &mut [u8; 28]) -> &str {
        // Only ASCII digits, '.' and '-' are written: the check cannot fail.
        std::str::from_utf8(self.write_decimal_ascii(buf)).unwrap_or_default()
    }

    /// [`Micros::write_decimal`] as bytes, for a writer that takes bytes (a decision's
    /// JSON): checking a dozen bytes as UTF-8 costs more than writing them.
    pub(crate) fn write_decimal_ascii(self, buf: &mut [u8; 28]) -> &[u8] {
        let mut i = buf.len();
        let abs = self.0.unsigned_abs();
        let (mut whole, mut frac) = (abs / Self::PER_USD as u64, abs % Self::PER_USD as u64);
        for _ in 0..6 {
            i -= 1;
            buf[i] = b'0' + (frac % 10) as u8;
            frac /= 10;
        }
        i -= 1;
        buf[i] = b'.';
        loop {
            i -= 1;
            buf[i] = b'0' + (whole % 10) as u8;
            whole /= 10;
            if whole == 0 {
                break;
            }
        }
        if self.0 < 0 {
            i -= 1;
            buf[i] = b'-';
        }
        &buf[i..]
    }
}

impl fmt::Display for Micros {
    /// Six decimal places: `3.120000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.write_decimal(&mut [0u8; 28]))
    }
}

impl FromStr for Micros {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Micros::parse(s)
    }
}

impl Serialize for Micros {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The decimal text straight from a stack buffer: `collect_str` would go through
        // the formatting machinery for every amount of every decision.
        serializer.serialize_str(self.write_decimal(&mut [0u8; 28]))
    }
}

impl<'de> Deserialize<'de> for Micros {
    /// Accepts a decimal string or a number.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Micros;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal amount in USD, as a number or a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Micros, E> {
                Micros::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Micros, E> {
                v.checked_mul(Micros::PER_USD)
                    .map(Micros)
                    .ok_or_else(|| E::custom(MoneyError::TooLarge(v.to_string())))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Micros, E> {
                i64::try_from(v)
                    .ok()
                    .and_then(|v| v.checked_mul(Micros::PER_USD))
                    .map(Micros)
                    .ok_or_else(|| E::custom(MoneyError::TooLarge(v.to_string())))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Micros, E> {
                Micros::from_f64(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `numerator / denominator` rounded up, for prices: never under-reserve.
pub(crate) fn div_ceil_i128(numerator: i128, denominator: i128) -> i128 {
    let q = numerator / denominator;
    if numerator % denominator != 0 && (numerator > 0) == (denominator > 0) {
        q + 1
    } else {
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recordable_costs_run_from_zero_to_the_largest_exact_amount() {
        assert_eq!(Micros(-1).unrecordable(), Some("negative"));
        assert_eq!(Micros::ZERO.unrecordable(), None);
        assert_eq!(Micros::MAX_RECORDED.unrecordable(), None);
        assert_eq!(
            Micros(Micros::MAX_RECORDED.0 + 1).unrecordable(),
            Some("too large")
        );
    }

    #[test]
    fn parses_decimals_exactly() {
        assert_eq!(Micros::parse("0.0042"), Ok(Micros(4200)));
        assert_eq!(Micros::parse("5"), Ok(Micros(5_000_000)));
        assert_eq!(Micros::parse("-1"), Ok(Micros(-1_000_000)));
        assert_eq!(Micros::parse(".5"), Ok(Micros(500_000)));
        assert_eq!(Micros::parse("1.500000000"), Ok(Micros(1_500_000)));
        assert_eq!(Micros::parse("0.000001"), Ok(Micros(1)));
        assert!(matches!(
            Micros::parse("0.0000001"),
            Err(MoneyError::TooPrecise(_))
        ));
        assert!(Micros::parse("1e3").is_err());
        assert!(Micros::parse("").is_err());
        assert!(Micros::parse(".").is_err());
        assert!(Micros::parse("abc").is_err());
        assert!(matches!(
            Micros::parse("99999999999999999999"),
            Err(MoneyError::TooLarge(_))
        ));
    }

    #[test]
    fn floats_go_through_their_shortest_text() {
        assert_eq!(Micros::from_f64(0.1), Ok(Micros(100_000)));
        assert_eq!(Micros::from_f64(2.5), Ok(Micros(2_500_000)));
        assert_eq!(Micros::from_f64(0.0042), Ok(Micros(4200)));
        assert!(Micros::from_f64(f64::NAN).is_err());
    }

    #[test]
    fn displays_six_places() {
        assert_eq!(Micros(i64::MIN).to_string(), "-9223372036854.775808");
        assert_eq!(Micros(i64::MAX).to_string(), "9223372036854.775807");
        assert_eq!(Micros(12).to_string(), "0.000012");
        assert_eq!(Micros(3_120_000).to_string(), "3.120000");
        assert_eq!(Micros(-5).to_string(), "-0.000005");
        assert_eq!(Micros(0).to_string(), "0.000000");
    }

    #[test]
    fn serde_accepts_numbers_and_strings() {
        let v: Micros = serde_json::from_str("\"0.25\"").unwrap();
        assert_eq!(v, Micros(250_000));
        let v: Micros = serde_json::from_str("0.25").unwrap();
        assert_eq!(v, Micros(250_000));
        let v: Micros = serde_json::from_str("3").unwrap();
        assert_eq!(v, Micros(3_000_000));
        assert!(serde_json::from_str::<Micros>("true").is_err());
        assert_eq!(serde_json::to_string(&Micros(1)).unwrap(), "\"0.000001\"");
    }

    #[test]
    fn serializes_as_its_decimal_text() {
        for m in [Micros(-3_120_000), Micros(0), Micros(i64::MAX)] {
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{m}\""));
            assert_eq!(serde_json::from_str::<Micros>(&json).unwrap(), m);
        }
        assert_eq!(
            serde_json::to_string(&Micros(-3_120_000)).unwrap(),
            "\"-3.120000\""
        );
    }

    #[test]
    fn ceil_division() {
        assert_eq!(div_ceil_i128(10, 3), 4);
        assert_eq!(div_ceil_i128(9, 3), 3);
        assert_eq!(div_ceil_i128(0, 3), 0);
    }
}
