//! A client event's arguments, decoded as the namespace handlers decode them: the Socket.IO
//! packet, then the payload (a JSON object within the body limit), then each event's arguments
//! (`message:send`, `room:join`, `room:sync`; `room:leave` and `typing` take only `room_id`).
//!
//! Every decoder runs on every payload, whatever the event's name: the name only picks which one
//! the server would call, and the fuzzer should not have to guess names to reach them.
//!
//! Properties: no input panics; a refusal is a client error (`validation_failed` or
//! `payload_too_large`) with the API's error shape; what is accepted holds API.md §2's rules.
#![no_main]

use chatmesh::domain::input::Input;
use chatmesh::error::ApiError;
use chatmesh::realtime::{JoinArgs, SendArgs, SyncArgs, decode_payload, room_arg};
use chatmesh::sio::packet::{self, Incoming};
use libfuzzer_sys::fuzz_target;

/// CHATMESH_MAX_BODY_BYTES's default is 64 KiB; a small limit lets the fuzzer reach both sides.
const LIMIT: usize = 512;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let Incoming::Event { data, .. } = packet::parse(text) else { return };
    let size = data.as_ref().ok().map(|v| serde_json::to_string(v).expect("serializes").len());
    let input = match decode_payload(data, LIMIT) {
        Ok(input) => input,
        Err(e) => return refused(&e),
    };
    assert!(size.is_some_and(|n| n <= LIMIT), "accepted a payload of {size:?} bytes");
    if let Ok(a) = outcome(SendArgs::parse(&input)) {
        let body = a.body.as_str();
        let n = body.chars().count();
        assert!((1..=4000).contains(&n), "body of {n} characters");
        assert!(!body.chars().all(char::is_whitespace), "blank body");
        assert!(!body.chars().any(|c| c.is_control() && c != '\n' && c != '\t'), "control in body {body:?}");
        assert_eq!(Some(body), input.opt_str("body").ok().flatten(), "body kept verbatim");
        let id = a.client_msg_id.as_str();
        assert!(
            (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        );
        assert_room(&a.room_id);
    }
    if let Ok(a) = outcome(JoinArgs::parse(&input)) {
        assert!(a.after_seq.is_none_or(|s| s >= 0), "after_seq {:?}", a.after_seq);
        assert_room(&a.room_id);
    }
    if let Ok(a) = outcome(SyncArgs::parse(&input)) {
        assert!(a.after_seq >= 0, "after_seq {}", a.after_seq);
        assert!((1..=chatmesh::service::MAX_PAGE).contains(&a.limit), "limit {}", a.limit);
        assert_room(&a.room_id);
    }
    if let Ok(room) = outcome(room_arg(&input)) {
        assert_room(&room);
    }
    // The same answer twice: decoding keeps no state.
    assert_eq!(SendArgs::parse(&input).is_ok(), SendArgs::parse(&again(&input)).is_ok());
});

fn outcome<T>(r: Result<T, ApiError>) -> Result<T, ()> {
    r.map_err(|e| refused(&e))
}

fn refused(e: &ApiError) {
    assert!(matches!(e.code(), "validation_failed" | "payload_too_large"), "{}: {e}", e.code());
    let ack = e.ack();
    assert!(ack["error"]["message"].is_string() && ack["error"]["code"] == e.code(), "{ack}");
}

fn assert_room(room: &str) {
    assert!(!chatmesh::fanout::is_internal_channel(room), "internal channel {room:?} taken as a room");
}

fn again(input: &Input) -> Input {
    let mut map = serde_json::Map::new();
    for k in ["room_id", "client_msg_id", "body"] {
        if let Ok(Some(v)) = input.opt_str(k) {
            map.insert(k.to_string(), v.into());
        }
    }
    Input::from_value(map.into()).expect("an object")
}
