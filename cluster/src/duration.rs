//! The duration syntax of the cluster configuration, the same as ccmgr's own (src/duration.rs,
//! copied rather than shared: the cluster crate does not link ccmgr).
//!
//! A duration is either an integer, read as milliseconds, or a string made of a non-negative
//! integer and a unit: `"250ms"`, `"7s"`, `"2m"`, `"1h"`. Anything else is refused with a
//! sentence that says what is accepted; a typo must never turn into a surprising timeout.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Serialize, Serializer};

/// A duration read from configuration. Serialises back as milliseconds, so a config image
/// written to the shared segment reads back identically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    pub const fn as_duration(self) -> Duration {
        self.0
    }
}

impl From<ConfigDuration> for Duration {
    fn from(d: ConfigDuration) -> Self {
        d.0
    }
}

impl fmt::Display for ConfigDuration {
    /// Prints the largest unit that represents the value exactly: `2m`, `1500ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000)] {
            if ms != 0 && ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration \"{text}\": {reason}; write milliseconds as an integer, or a number with a unit: \"250ms\", \"7s\", \"2m\", \"1h\""
)]
pub struct ParseDurationError {
    text: String,
    reason: &'static str,
}

/// Parses `"250ms"`, `"7s"`, `"2m"`, `"1h"` (surrounding blanks allowed, nothing else).
pub fn parse_duration(text: &str) -> Result<ConfigDuration, ParseDurationError> {
    let fail = |reason| ParseDurationError {
        text: text.to_owned(),
        reason,
    };
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return Err(fail("it does not start with a number"));
    }
    let value: u64 = number
        .parse()
        .map_err(|_| fail("the number is too large"))?;
    let millis_per_unit: u64 = match unit.trim_start() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(fail("the unit is missing")),
        _ => return Err(fail("the unit is not one of ms, s, m, h")),
    };
    value
        .checked_mul(millis_per_unit)
        .map(ConfigDuration::from_millis)
        .ok_or_else(|| fail("the number is too large"))
}

impl<'de> de::Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = ConfigDuration;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration: milliseconds as an integer, or a string like \"7s\"")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(ConfigDuration::from_millis)
                    .map_err(|_| E::custom(format!("invalid duration {v}: it is negative")))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ConfigDuration::from_millis(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse_duration(v).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(DurationVisitor)
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        serializer.serialize_u64(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_scale_to_milliseconds() {
        for (text, ms) in [
            ("250ms", 250),
            ("7s", 7_000),
            ("2m", 120_000),
            ("1h", 3_600_000),
            (" 0s ", 0),
            ("10 s", 10_000),
        ] {
            assert_eq!(parse_duration(text), Ok(ConfigDuration::from_millis(ms)));
        }
    }

    #[test]
    fn bad_text_is_refused_with_a_reason() {
        for (text, reason) in [
            ("", "does not start with a number"),
            ("s", "does not start with a number"),
            ("-5s", "does not start with a number"),
            ("5", "unit is missing"),
            ("5 parsecs", "not one of ms, s, m, h"),
            ("1.5s", "not one of ms, s, m, h"),
            ("99999999999999999999ms", "too large"),
            ("9999999999999999h", "too large"),
        ] {
            let err = parse_duration(text).unwrap_err().to_string();
            assert!(err.contains(reason), "{text:?}: {err}");
            assert!(err.contains(&format!("\"{text}\"")), "{err}");
        }
    }

    #[test]
    fn display_uses_the_largest_exact_unit() {
        for (ms, text) in [
            (0, "0ms"),
            (1500, "1500ms"),
            (7000, "7s"),
            (120_000, "2m"),
            (3_600_000, "1h"),
        ] {
            assert_eq!(ConfigDuration::from_millis(ms).to_string(), text);
        }
    }

    #[test]
    fn display_round_trips_through_parse() {
        for ms in [0, 1, 999, 1000, 61_000, 3_600_000, 86_400_000] {
            let d = ConfigDuration::from_millis(ms);
            assert_eq!(parse_duration(&d.to_string()), Ok(d));
        }
    }
}
