//! What a client sends over Engine.IO, read as the server reads it: a long-polling POST body (or
//! one WebSocket text frame, which is one packet of the same form) split into packets, each
//! Socket.IO message (`4…`) parsed.
//!
//! Properties: no input panics; a parsed event re-encoded the way socket.io-client encodes it
//! parses back to the same event; what the server encodes for it (`42[...]`, `43<id>[...]`,
//! `44{...}`) is JSON where JSON is promised.
#![no_main]

use chatmesh::sio::packet::{self, Incoming};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    // Not UTF-8: the server answers 400 before parsing anything (and tungstenite refuses such a
    // text frame), so there is nothing further to reach.
    let Ok(packets) = packet::polling_packets(body) else { return };
    for p in packets {
        // Engine.IO `4` is a message; every other type is one byte the engine matches on.
        if let Some(message) = p.strip_prefix('4') {
            check(message);
        }
    }
});

fn check(text: &str) {
    match packet::parse(text) {
        Incoming::Event { namespace, ack, name, data, attachments } => {
            assert!(namespace.starts_with('/') && !namespace.contains(','), "namespace {namespace:?}");
            let binary = text.starts_with('5');
            assert!(binary || attachments == 0, "a text event claims {attachments} attachments");
            let Ok(data) = data else { return };
            // As socket.io-client writes it: type, attachments, namespace, ack id, [name, data].
            let mut again = String::from(if binary { "5" } else { "2" });
            if binary {
                again.push_str(&format!("{attachments}-"));
            }
            if namespace != "/" {
                again.push_str(&format!("{namespace},"));
            }
            if let Some(id) = ack {
                again.push_str(&id.to_string());
            }
            again.push_str(&serde_json::to_string(&(&name, &data)).expect("a parsed value serializes"));
            match packet::parse(&again) {
                Incoming::Event { namespace: n, ack: a, name: e, data: Ok(d), attachments: k } => {
                    assert_eq!((n, a, e.as_str(), k), (namespace, ack, name.as_str(), attachments), "{again:?}");
                    assert!(same(&d, &data), "{again:?}: {d} != {data}");
                }
                other => panic!("{text:?} re-encoded as {again:?} parses to {other:?}"),
            }
            // The server's own frames for it: an event broadcast and an ack.
            let frame = packet::event(&name, &data).expect("event frame");
            let Incoming::Event { name: e, data: Ok(d), .. } = packet::parse(&frame.as_str()[1..]) else {
                panic!("{frame:?} does not parse as an event")
            };
            assert!(e == name && same(&d, &data), "{frame:?}");
            if let Some(id) = ack {
                let frame = packet::ack(id, &data).expect("ack frame");
                let body = frame.as_str().strip_prefix(&format!("43{id}")).expect("ack prefix");
                let decoded: Vec<Value> = serde_json::from_str(body).expect("ack body is a JSON array");
                assert!(decoded.len() == 1 && same(&decoded[0], &data), "{frame:?}");
            }
        }
        Incoming::Connect { namespace, auth } => {
            assert!(namespace.starts_with('/') && !namespace.contains(','), "namespace {namespace:?}");
            assert!(auth.is_none() || !text[1..].is_empty());
            // Refusing another namespace echoes it back: the frame must stay JSON after the comma.
            let frame = packet::connect_error(namespace, "Invalid namespace");
            let json = if namespace == "/" { &frame.as_str()[2..] } else { &frame.as_str()[2 + namespace.len() + 1..] };
            let v: Value = serde_json::from_str(json).expect("connect_error carries JSON");
            assert_eq!(v["message"], "Invalid namespace");
        }
        Incoming::Disconnect { namespace } => assert!(namespace.starts_with('/'), "namespace {namespace:?}"),
        Incoming::Ignored(why) => assert!(!why.is_empty()),
    }
}

/// JSON equality, floats within a rounding step: serde_json's default float parser is "best
/// effort" (exact round trips need its `float_roundtrip` feature), which is not a parser bug.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            _ if x == y => true,
            (Some(x), Some(y)) if x.is_finite() && y.is_finite() => (x - y).abs() <= x.abs().max(y.abs()) * 1e-15,
            _ => false,
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}
