//! `message:send`, `typing`.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};

use super::order::Ticket;
use super::{identity, payload, reply, reply_ok, room_arg};
use crate::domain::input::Input;
use crate::domain::{ClientMsgId, Message, MessageBody, RoomId};
use crate::error::{ApiError, ApiResult};
use crate::sio::{Ack, Socket};
use crate::state::AppState;
use crate::telemetry;
use tracing::Instrument;

/// The `message:send` ack, serialized straight from the message.
#[derive(serde::Serialize)]
struct SendAck<'a> {
    ok: bool,
    message: &'a Message,
}

/// `message:send`'s arguments, validated (pub for the `event_payload` fuzz target).
pub struct SendArgs {
    pub room_id: RoomId,
    pub client_msg_id: ClientMsgId,
    pub body: MessageBody,
}

impl SendArgs {
    pub fn parse(input: &Input) -> ApiResult<Self> {
        Ok(Self {
            room_id: room_arg(input)?,
            client_msg_id: ClientMsgId::parse(input.req_str("client_msg_id")?)?,
            body: MessageBody::parse(input.req_str("body")?)?,
        })
    }
}

/// Called in arrival order: the ticket drawn here keeps this socket's sends in that order even
/// though each runs on its own task.
pub fn on_send(st: Arc<AppState>, s: Arc<Socket>, data: Result<Value, String>, ack: Ack, slot: super::Slot) {
    let inflight = match st.admit_send() {
        Ok(token) => token,
        Err(e) => return reply(ack, "message:send", Err(e)),
    };
    let ticket = s.ext::<super::Conn>().map(|c| c.order.ticket()).unwrap_or_default();
    tokio::spawn(async move {
        let _inflight = inflight;
        let _slot = slot;
        match send(&st, &s, data, ticket).instrument(telemetry::event_span("message:send")).await {
            Ok(message) => reply_ok(ack, "message:send", &SendAck { ok: true, message: &message }),
            Err(e) => reply(ack, "message:send", Err(e)),
        }
    });
}

pub fn on_typing(st: Arc<AppState>, s: Arc<Socket>, data: Result<Value, String>, ack: Ack, slot: super::Slot) {
    tokio::spawn(async move {
        let _slot = slot;
        reply(ack, "typing", typing(&st, &s, data).instrument(telemetry::event_span("typing")).await)
    });
}

async fn send(state: &AppState, s: &Socket, data: Result<Value, String>, ticket: Ticket) -> ApiResult<Message> {
    let started = Instant::now();
    let turn = ticket.turn().await;
    let me = identity(s)?;
    let SendArgs { room_id, client_msg_id, body } = SendArgs::parse(&payload(state, data)?)?;
    let sent = state.svc.send(&me.user_id, &room_id, client_msg_id, body, turn).await?;
    sent.record("socket", started);
    Ok(sent.message)
}

async fn typing(state: &AppState, s: &Socket, data: Result<Value, String>) -> ApiResult<Value> {
    let me = identity(s)?;
    let input = payload(state, data)?;
    let room_id = room_arg(&input)?;
    if !s.in_room(&room_id) {
        return Err(ApiError::Forbidden("join the room before sending typing".into()));
    }
    state.svc.typing(&room_id, &me.user_id, &s.id).await?;
    Ok(json!({}))
}
