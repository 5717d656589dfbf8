//! `room:join`, `room:leave`, `room:sync`.

use std::sync::Arc;

use serde_json::{Value, json};

use super::{identity, payload, reply, room_arg};
use crate::domain::RoomId;
use crate::domain::input::{Input, parse_seq};
use crate::error::ApiResult;
use crate::fanout::INTERNAL_CHANNELS_PER_SOCKET;
use crate::service::{Cursor, MAX_PAGE, clamp_limit};
use crate::sio::{Ack, Socket};
use crate::state::AppState;
use crate::telemetry;
use tracing::Instrument;

/// `room:join`'s arguments, validated (pub for the `event_payload` fuzz target).
pub struct JoinArgs {
    pub room_id: RoomId,
    pub after_seq: Option<i64>,
}

impl JoinArgs {
    pub fn parse(input: &Input) -> ApiResult<Self> {
        let room_id = room_arg(input)?;
        let after_seq = input.opt_int("after_seq")?.map(|v| parse_seq("after_seq", v)).transpose()?;
        Ok(Self { room_id, after_seq })
    }
}

/// `room:sync`'s arguments, validated.
pub struct SyncArgs {
    pub room_id: RoomId,
    pub after_seq: i64,
    pub limit: u32,
}

impl SyncArgs {
    pub fn parse(input: &Input) -> ApiResult<Self> {
        let room_id = room_arg(input)?;
        let after_seq = parse_seq("after_seq", input.req_int("after_seq")?)?;
        Ok(Self { room_id, after_seq, limit: clamp_limit(input.opt_int("limit")?)? })
    }
}

pub fn on_event(
    st: Arc<AppState>,
    s: Arc<Socket>,
    name: &str,
    data: Result<Value, String>,
    ack: Ack,
    slot: super::Slot,
) {
    let name: &'static str = match name {
        "room:join" => "room:join",
        "room:leave" => "room:leave",
        _ => "room:sync",
    };
    tokio::spawn(async move {
        let _slot = slot;
        let span = telemetry::event_span(name);
        let result = match name {
            "room:join" => join(&st, &s, data).instrument(span).await,
            "room:leave" => leave(&s, data, &st).instrument(span).await,
            _ => sync(&st, &s, data).instrument(span).await,
        };
        reply(ack, name, result)
    });
}

async fn join(state: &AppState, s: &Arc<Socket>, data: Result<Value, String>) -> ApiResult<Value> {
    let me = identity(s)?;
    let JoinArgs { room_id, after_seq: after } = JoinArgs::parse(&payload(state, data)?)?;
    // Its own user and session channels are among the socket's rooms, not counted against the cap.
    if !s.in_room(&room_id) && s.room_count() >= state.config.max_rooms_per_socket + INTERNAL_CHANNELS_PER_SOCKET {
        return Err(crate::error::ApiError::validation(format!(
            "a socket may be in at most {} rooms; leave one first",
            state.config.max_rooms_per_socket
        )));
    }
    let room = state.svc.join_room(&me.user_id, &room_id).await?;
    // Join the delivery group before reading history: a message accepted in between is then
    // delivered live or found in the read (or both; clients dedupe by seq), never neither.
    s.join(&room.id);
    state.svc.watch_room(&room_id).await?;
    let page = match after {
        Some(after) => state.svc.page(&room_id, Cursor::After(after), MAX_PAGE).await?,
        None => {
            let mut page = state.svc.page(&room_id, Cursor::After(i64::MAX), 1).await?;
            page.has_more = false;
            page
        }
    };
    let room = crate::domain::Room { head_seq: page.head_seq, ..room };
    Ok(json!({"room": room, "head_seq": page.head_seq, "messages": page.messages, "has_more": page.has_more}))
}

async fn leave(s: &Arc<Socket>, data: Result<Value, String>, state: &AppState) -> ApiResult<Value> {
    identity(s)?;
    let input = payload(state, data)?;
    let room_id = room_arg(&input)?;
    s.leave(&room_id);
    Ok(json!({}))
}

async fn sync(state: &AppState, s: &Socket, data: Result<Value, String>) -> ApiResult<Value> {
    let me = identity(s)?;
    let SyncArgs { room_id, after_seq: after, limit } = SyncArgs::parse(&payload(state, data)?)?;
    let page = state.svc.history(&me.user_id, &room_id, Cursor::After(after), limit).await?;
    Ok(json!({"messages": page.messages, "head_seq": page.head_seq, "has_more": page.has_more}))
}
