//! `message:send`, `typing`.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use socketioxide::extract::{AckSender, SocketRef, TryData};

use super::order::Ticket;
use super::{identity, payload, reply, reply_ok};
use crate::app::AppState;
use crate::domain::{ClientMsgId, Message, MessageBody};
use crate::error::{ApiError, ApiResult};
use crate::telemetry;
use tracing::Instrument;

/// The `message:send` ack, serialized straight from the message.
#[derive(serde::Serialize)]
struct SendAck<'a> {
    ok: bool,
    message: &'a Message,
}

pub fn register(s: &SocketRef, state: &Arc<AppState>) {
    let st = state.clone();
    // The Ticket extractor comes last: extractors before it cannot fail, so no ticket is lost.
    s.on("message:send", move |s: SocketRef, TryData(d): TryData<Value>, ack: AckSender, ticket: Ticket| {
        let st = st.clone();
        async move {
            if st.inflight.is_closed() {
                // Past the drain: answer rather than leave the client waiting on a closing socket.
                let err = ApiError::Unavailable("this instance is shutting down; reconnect and retry".into());
                return reply(ack, "message:send", Err(err));
            }
            let _inflight = st.inflight.token();
            match send(&st, &s, d, ticket).instrument(telemetry::event_span("message:send")).await {
                Ok(message) => reply_ok(ack, "message:send", &SendAck { ok: true, message: &message }),
                Err(e) => reply(ack, "message:send", Err(e)),
            }
        }
    });
    let st = state.clone();
    s.on("typing", move |s: SocketRef, TryData(d): TryData<Value>, ack: AckSender| {
        let st = st.clone();
        async move { reply(ack, "typing", typing(&st, &s, d).instrument(telemetry::event_span("typing")).await) }
    });
}

async fn send<E: std::fmt::Display>(
    state: &AppState,
    s: &SocketRef,
    data: Result<Value, E>,
    ticket: Ticket,
) -> ApiResult<Message> {
    let started = Instant::now();
    let turn = ticket.turn().await;
    let me = identity(s)?;
    let input = payload(state, data)?;
    let room_id = input.req_str("room_id")?;
    let client_msg_id = ClientMsgId::parse(input.req_str("client_msg_id")?)?;
    let body = MessageBody::parse(input.req_str("body")?)?;
    let sent = state.svc.send(&me.user_id, room_id, client_msg_id, body, turn).await?;
    sent.record("socket", started);
    Ok(sent.message)
}

async fn typing<E: std::fmt::Display>(state: &AppState, s: &SocketRef, data: Result<Value, E>) -> ApiResult<Value> {
    let me = identity(s)?;
    let input = payload(state, data)?;
    let room_id = input.req_str("room_id")?;
    if !s.rooms().iter().any(|r| r == room_id) {
        return Err(ApiError::Forbidden("join the room before sending typing".into()));
    }
    state.svc.fanout.typing(room_id, &me.user_id, &s.id.to_string()).await;
    Ok(json!({}))
}
