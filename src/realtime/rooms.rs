//! `room:join`, `room:leave`, `room:sync`.

use std::sync::Arc;

use serde_json::{Value, json};
use socketioxide::extract::{AckSender, SocketRef, TryData};

use super::{identity, payload, reply};
use crate::app::AppState;
use crate::domain::input::parse_seq;
use crate::error::ApiResult;
use crate::service::{Cursor, MAX_PAGE, clamp_limit};
use crate::telemetry;
use tracing::Instrument;

pub fn register(s: &SocketRef, state: &Arc<AppState>) {
    let st = state.clone();
    s.on("room:join", move |s: SocketRef, TryData(d): TryData<Value>, ack: AckSender| {
        let st = st.clone();
        async move { reply(ack, "room:join", join(&st, &s, d).instrument(telemetry::event_span("room:join")).await) }
    });
    let st = state.clone();
    s.on("room:leave", move |s: SocketRef, TryData(d): TryData<Value>, ack: AckSender| {
        let st = st.clone();
        async move { reply(ack, "room:leave", leave(&st, &s, d).instrument(telemetry::event_span("room:leave")).await) }
    });
    let st = state.clone();
    s.on("room:sync", move |s: SocketRef, TryData(d): TryData<Value>, ack: AckSender| {
        let st = st.clone();
        async move { reply(ack, "room:sync", sync(&st, &s, d).instrument(telemetry::event_span("room:sync")).await) }
    });
}

async fn join<E: std::fmt::Display>(state: &AppState, s: &SocketRef, data: Result<Value, E>) -> ApiResult<Value> {
    let me = identity(s)?;
    let input = payload(state, data)?;
    let room_id = input.req_str("room_id")?;
    let after = input.opt_int("after_seq")?.map(|v| parse_seq("after_seq", v)).transpose()?;
    let room = state.svc.join_room(&me.user_id, room_id).await?;
    // Join the delivery group before reading history: a message accepted in between is then
    // delivered live or found in the read (or both; clients dedupe by seq), never neither.
    s.join(room.id.clone());
    state.svc.fanout.watch_room(&room.id).await?;
    let page = match after {
        Some(after) => state.svc.page(&room.id, Cursor::After(after), MAX_PAGE).await?,
        None => {
            let mut page = state.svc.page(&room.id, Cursor::After(i64::MAX), 1).await?;
            page.has_more = false;
            page
        }
    };
    let room = crate::domain::Room { head_seq: page.head_seq, ..room };
    Ok(json!({"room": room, "head_seq": page.head_seq, "messages": page.messages, "has_more": page.has_more}))
}

async fn leave<E: std::fmt::Display>(state: &AppState, s: &SocketRef, data: Result<Value, E>) -> ApiResult<Value> {
    identity(s)?;
    let input = payload(state, data)?;
    let room_id = input.req_str("room_id")?;
    s.leave(room_id.to_string());
    Ok(json!({}))
}

async fn sync<E: std::fmt::Display>(state: &AppState, s: &SocketRef, data: Result<Value, E>) -> ApiResult<Value> {
    let me = identity(s)?;
    let input = payload(state, data)?;
    let room_id = input.req_str("room_id")?;
    let after = parse_seq("after_seq", input.req_int("after_seq")?)?;
    let limit = clamp_limit(input.opt_int("limit")?)?;
    let page = state.svc.history(&me.user_id, room_id, Cursor::After(after), limit).await?;
    Ok(json!({"messages": page.messages, "head_seq": page.head_seq, "has_more": page.has_more}))
}
