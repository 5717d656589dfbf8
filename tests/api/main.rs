//! Integration tests against the real `chatmesh` binary (one test binary, one spawn helper).

mod config;
mod helpers;
mod lifecycle;
mod listener;
mod logs;
mod messages;
mod netfuzz;
mod ops;
mod rooms;
mod sessions;
#[allow(dead_code)]
#[path = "../support/mod.rs"]
mod support;
mod users;
