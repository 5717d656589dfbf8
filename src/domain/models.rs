//! The API objects of API.md §2, as stored and as serialized on the wire.

use serde::{Deserialize, Serialize, Serializer};

use super::Visibility;

/// Milliseconds since the Unix epoch; serialized as RFC 3339 UTC with milliseconds, stored as the
/// plain number (SQL columns, MongoDB fields and backup lines alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl From<i64> for Timestamp {
    fn from(ms: i64) -> Self {
        Self(ms)
    }
}

impl From<Timestamp> for i64 {
    fn from(t: Timestamp) -> Self {
        t.0
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    /// Accepts the wire form (RFC 3339) and plain milliseconds. A visitor rather than an untagged
    /// enum: that one buffers the value and builds an error for each variant it rejects, on every
    /// message read back from Redis.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Timestamp;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an RFC 3339 timestamp or milliseconds since the epoch")
            }
            fn visit_i64<E: serde::de::Error>(self, ms: i64) -> Result<Timestamp, E> {
                Ok(Timestamp(ms))
            }
            fn visit_u64<E: serde::de::Error>(self, ms: u64) -> Result<Timestamp, E> {
                i64::try_from(ms).map(Timestamp).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Timestamp, E> {
                chrono::DateTime::parse_from_rfc3339(s).map(|t| Timestamp(t.timestamp_millis())).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Timestamp {
    pub fn now() -> Self {
        Self(chrono::Utc::now().timestamp_millis())
    }
    pub fn to_rfc3339(self) -> String {
        self.with_rfc3339(str::to_string)
    }

    /// Hands the RFC 3339 text to `f`: from a stack buffer, or for years outside 0000..=9999
    /// from chrono's general formatter.
    fn with_rfc3339<R>(self, f: impl FnOnce(&str) -> R) -> R {
        let mut buf = [0u8; 24];
        match self.write_rfc3339(&mut buf) {
            Some(text) => f(text),
            None => f(&self.to_rfc3339_slow()),
        }
    }

    fn to_rfc3339_slow(self) -> String {
        chrono::DateTime::from_timestamp_millis(self.0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    /// `YYYY-MM-DDTHH:MM:SS.mmmZ` into `buf` without allocating (every message serializes one);
    /// `None` for years outside 0000..=9999, which take the general path.
    fn write_rfc3339(self, buf: &mut [u8; 24]) -> Option<&str> {
        use chrono::{Datelike, Timelike};
        let t = chrono::DateTime::from_timestamp_millis(self.0)?.naive_utc();
        if !(0..=9999).contains(&t.year()) {
            return None;
        }
        let mut put = |at: usize, value: u32, width: usize| {
            let mut v = value;
            for i in (at..at + width).rev() {
                buf[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, t.year() as u32, 4);
        put(5, t.month(), 2);
        put(8, t.day(), 2);
        put(11, t.hour(), 2);
        put(14, t.minute(), 2);
        put(17, t.second(), 2);
        put(20, t.nanosecond() / 1_000_000 % 1000, 3);
        for (at, sep) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (23, b'Z')] {
            buf[at] = sep;
        }
        std::str::from_utf8(buf).ok()
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.with_rfc3339(|text| s.serialize_str(text))
    }
}

/// New ids are ULIDs: sortable, unique without coordination.
pub fn new_id() -> String {
    ulid::Ulid::generate().to_string()
}

/// The models decode from SQL rows by their `FromRow` derives: columns bear the field names, times
/// are stored as ms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct User {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub status_text: String,
    pub avatar_url: String,
    #[sqlx(try_from = "i64")]
    pub created_at: Timestamp,
    #[sqlx(try_from = "i64")]
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Room {
    pub id: String,
    pub name: String,
    pub topic: String,
    #[sqlx(try_from = "String")]
    pub visibility: Visibility,
    pub owner_id: String,
    pub home_region: String,
    pub head_seq: i64,
    pub member_count: i64,
    #[sqlx(try_from = "i64")]
    pub created_at: Timestamp,
    #[sqlx(try_from = "i64")]
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Message {
    pub id: String,
    pub room_id: String,
    pub seq: i64,
    pub sender_id: String,
    pub client_msg_id: String,
    pub body: String,
    #[sqlx(try_from = "i64")]
    pub created_at: Timestamp,
}

/// One page of history, ascending by seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPage {
    pub messages: Vec<Message>,
    pub head_seq: i64,
    pub has_more: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_millis_and_z() {
        assert_eq!(Timestamp(1_795_000_000_123).to_rfc3339(), "2026-11-18T11:06:40.123Z");
        assert_eq!(Timestamp(0).to_rfc3339(), "1970-01-01T00:00:00.000Z");
        let back: Timestamp = serde_json::from_str("\"2026-11-18T11:06:40.123Z\"").unwrap();
        assert_eq!(back, Timestamp(1_795_000_000_123));
        assert_eq!(serde_json::from_str::<Timestamp>("42").unwrap(), Timestamp(42));
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
    }

    #[test]
    fn fast_formatting_matches_chrono_across_dates() {
        // Leap days, month ends, the epoch, before it, and the ends of the four-digit years.
        let samples = [
            0,
            -1,
            951_782_400_000,
            951_868_799_999,
            1_709_164_800_123,
            1_795_000_000_123,
            253_402_300_799_999,
            -62_167_219_200_000,
        ];
        for ms in samples.into_iter().chain((0..2000).map(|i| i * 86_399_937 + 17)) {
            let t = Timestamp(ms);
            assert_eq!(t.to_rfc3339(), t.to_rfc3339_slow(), "{ms}");
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{}\"", t.to_rfc3339_slow()));
        }
        // Past year 9999 the general path answers.
        let far = Timestamp(253_402_300_800_000);
        assert_eq!(far.to_rfc3339(), far.to_rfc3339_slow());
    }
}
