//! What differs between the SQL backends, as data: the shared store ([`super::SqlStore`]) is
//! written once against sqlx's generic [`Database`], and asks its backend only these.
//!
//! Placeholders are not among them: every statement is built with [`sqlx::QueryBuilder`], which
//! writes each backend's own (`?` / `$n`). Error codes are not either: sqlx classifies unique and
//! foreign-key violations for every backend, and `super::errors` maps them once.

use sqlx::Database;

pub trait Dialect: Database {
    /// Starts a transaction that writes. It must make the rows a transaction reads with
    /// [`Dialect::LOCK_ROWS`] stay as read until it commits.
    const BEGIN_WRITE: &'static str;
    /// Appended to a read of room rows that the transaction then writes (in id order, so that
    /// two writers never wait on each other in a cycle); empty where `BEGIN_WRITE` already
    /// serializes all writers.
    const LOCK_ROWS: &'static str;
    /// Starts the read-only transaction of an export: every read in it sees one snapshot, taken
    /// at its first read, and writers are not blocked.
    const BEGIN_SNAPSHOT: &'static str;
    /// The larger of two values (the SQL standard has no such scalar function).
    const GREATEST: &'static str;
    /// How the dedupe lookup joins its list of keys to `messages`: the keys must drive the loop,
    /// one probe of the dedupe index each.
    const KEYS_JOIN: &'static str;

    /// How many rows a statement wrote (sqlx has no trait for it).
    fn rows_affected(done: &Self::QueryResult) -> u64;
}
