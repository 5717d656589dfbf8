//! Validated values ([`fields`]) and the objects of API.md §2 ([`models`]).

pub mod fields;
pub mod ids;
pub mod input;
pub mod models;

pub use fields::*;
pub use ids::{RoomId, UserId};
pub use models::*;
