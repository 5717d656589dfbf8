//! How a failed statement reads to the caller, decided once for every SQL backend.

use crate::store::StoreError;

/// The backend could not answer; the caller may retry.
pub fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A unique violation on `users` can only be the username (ids are new ULIDs or, in an import,
/// skipped when stored).
pub fn username_taken(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::UsernameTaken,
        _ => unavailable(e),
    }
}

/// A foreign-key violation means the statement names a room or user the store does not have.
/// PostgreSQL says which by the constraint's name (`memberships_room_id_fkey`,
/// `rooms_owner_id_fkey`, ...); SQLite names none, and then `unnamed` is the answer.
pub fn missing(unnamed: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match &e {
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => StoreError::NotFound(match d.constraint() {
            Some(c) if c.contains("room_id") => "room",
            Some(c) if c.contains("user_id") || c.contains("owner_id") => "user",
            _ => unnamed,
        }),
        _ => unavailable(e),
    }
}
