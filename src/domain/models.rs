//! The API objects of API.md §2, as stored and as serialized on the wire.

use serde::{Deserialize, Serialize, Serializer};

use super::Visibility;

/// Milliseconds since the Unix epoch; serialized as RFC 3339 UTC with milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl<'de> Deserialize<'de> for Timestamp {
    /// Accepts the wire form (RFC 3339) and plain milliseconds.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Millis(i64),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Millis(ms) => Ok(Self(ms)),
            Either::Text(s) => chrono::DateTime::parse_from_rfc3339(&s)
                .map(|t| Self(t.timestamp_millis()))
                .map_err(serde::de::Error::custom),
        }
    }
}

impl Timestamp {
    pub fn now() -> Self {
        Self(chrono::Utc::now().timestamp_millis())
    }
    pub fn to_rfc3339(self) -> String {
        chrono::DateTime::from_timestamp_millis(self.0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

/// New ids are ULIDs: sortable, unique without coordination.
pub fn new_id() -> String {
    ulid::Ulid::generate().to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub status_text: String,
    pub avatar_url: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    pub id: String,
    pub name: String,
    pub topic: String,
    pub visibility: Visibility,
    pub owner_id: String,
    pub home_region: String,
    pub head_seq: i64,
    pub member_count: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: String,
    pub room_id: String,
    pub seq: i64,
    pub sender_id: String,
    pub client_msg_id: String,
    pub body: String,
    pub created_at: Timestamp,
}

/// One page of history, ascending by seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    }
}
