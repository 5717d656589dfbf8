//! Shared helpers for integration test binaries: include with
//! `#[path = "support/mod.rs"] mod support;`.

pub mod mongo;
pub mod pg;
pub mod procs;
pub mod tls;
