//! Typed ids: a room's id and a user's id are different types, so an operation that takes both
//! (`is_member(room, user)`) cannot be called with them swapped.
//!
//! Ids are opaque strings (ULIDs when chatmesh makes them); an id that names nothing is
//! answered `not_found` by whoever looks it up, so parsing accepts any string.

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        string_newtype!(
            $(#[$doc])*
            #[derive(Hash, PartialOrd, Ord, Serialize, Deserialize)]
            #[serde(transparent)]
            $name
        );

        impl $name {
            /// A new, unique id (a ULID: ids made later sort later).
            pub fn generate() -> Self {
                Self(ulid::Ulid::generate().to_string())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }

        /// Reading an id as text (keys, queries, logs) is always fine; only making one from text
        /// is explicit.
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A room's id.
    RoomId
);
id_type!(
    /// A user's id.
    UserId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_transparent_on_the_wire() {
        let r = RoomId::from("01ROOM");
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"01ROOM\"");
        let back: RoomId = serde_json::from_str("\"01ROOM\"").unwrap();
        assert_eq!(back, r);
        assert_eq!(r.as_str(), "01ROOM");
        assert_ne!(UserId::generate(), UserId::generate());
    }
}
