//! Validated values ([`fields`]) and the objects of API.md §2 ([`models`]).

/// A newtype over `String` that can only be read back (`as_str`, `into_inner`, `Display`); how
/// one is made is each type's own business (`parse` for fields, `From` for ids).
macro_rules! string_newtype {
    ($(#[$attr:meta])* $name:ident) => {
        $(#[$attr])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name(String);
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub fn into_inner(self) -> String {
                self.0
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

pub mod fields;
pub mod ids;
pub mod input;
pub mod models;

pub use fields::*;
pub use ids::{RoomId, UserId};
pub use models::*;
