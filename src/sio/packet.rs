//! Engine.IO v4 and Socket.IO v5 packets as text: parsing what clients send, encoding what we send.
//!
//! Only namespace `/` and text payloads are served; binary attachments are recognised (so their
//! packets are skipped cleanly) but never decoded.

use serde::Serialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// One encoded Engine.IO text packet, shared by every socket it is sent to.
pub type Frame = Utf8Bytes;

pub const PING: &str = "2";
pub const PONG: &str = "3";
pub const NOOP: &str = "6";
pub const CLOSE: &str = "1";
/// Separates packets in one long-polling body.
pub const SEPARATOR: char = '\x1e';

/// The Engine.IO packets of a long-polling POST body; `Err` when it is not UTF-8 (binary
/// packets come base64-encoded, so a valid body always is).
pub fn polling_packets(body: &[u8]) -> Result<std::str::Split<'_, char>, std::str::Utf8Error> {
    Ok(std::str::from_utf8(body)?.split(SEPARATOR))
}

/// A Socket.IO packet from a client (the text after the Engine.IO `4`).
#[derive(Debug, PartialEq)]
pub enum Incoming<'a> {
    Connect {
        namespace: &'a str,
        auth: Option<Value>,
    },
    Disconnect {
        namespace: &'a str,
    },
    Event {
        namespace: &'a str,
        ack: Option<u64>,
        name: String,
        data: Result<Value, String>,
        attachments: usize,
    },
    /// Acks from the client (we never ask for one) and anything malformed.
    Ignored(&'static str),
}

/// Parses a Socket.IO packet; never fails, malformed input becomes `Ignored` with the reason.
pub fn parse(text: &str) -> Incoming<'_> {
    let Some(&kind) = text.as_bytes().first() else { return Incoming::Ignored("empty packet") };
    // A packet type is one ASCII digit; a first character of several bytes (say `é`) is not one,
    // and slicing after its first byte would panic.
    let Some(mut rest) = text.get(1..) else { return Incoming::Ignored("unknown packet type") };
    let mut attachments = 0;
    if kind == b'5' || kind == b'6' {
        let Some(dash) = rest.find('-') else { return Incoming::Ignored("binary packet without attachment count") };
        let Ok(n) = rest[..dash].parse::<usize>() else { return Incoming::Ignored("bad attachment count") };
        attachments = n;
        rest = &rest[dash + 1..];
    }
    let mut namespace = "/";
    if rest.starts_with('/') {
        match rest.find(',') {
            Some(comma) => {
                namespace = &rest[..comma];
                rest = &rest[comma + 1..];
            }
            None => {
                namespace = rest;
                rest = "";
            }
        }
    }
    match kind {
        b'0' => {
            let auth = if rest.is_empty() { None } else { serde_json::from_str(rest).ok() };
            Incoming::Connect { namespace, auth }
        }
        b'1' => Incoming::Disconnect { namespace },
        b'2' | b'5' => {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let ack = if digits == 0 {
                None
            } else {
                match rest[..digits].parse::<u64>() {
                    Ok(id) => Some(id),
                    Err(_) => return Incoming::Ignored("ack id out of range"),
                }
            };
            let Ok(args) = serde_json::from_str::<Vec<Value>>(&rest[digits..]) else {
                return Incoming::Ignored("event payload is not a JSON array");
            };
            let mut args = args.into_iter();
            let Some(Value::String(name)) = args.next() else { return Incoming::Ignored("event without a name") };
            let data = args.next().ok_or_else(|| "the event carries no payload".to_string());
            Incoming::Event { namespace, ack, name, data, attachments }
        }
        b'3' | b'6' => Incoming::Ignored("ack from the client"),
        _ => Incoming::Ignored("unknown packet type"),
    }
}

/// `0{...}`: the Engine.IO handshake.
pub fn open(sid: &str, upgrades: bool, ping_interval_ms: u64, ping_timeout_ms: u64, max_payload: usize) -> Frame {
    let upgrades = if upgrades { r#"["websocket"]"# } else { "[]" };
    format!(
        r#"0{{"sid":"{sid}","upgrades":{upgrades},"pingInterval":{ping_interval_ms},"pingTimeout":{ping_timeout_ms},"maxPayload":{max_payload}}}"#
    )
    .into()
}

/// `40{"sid":...}`: the namespace accepted the socket.
pub fn connected(sid: &str) -> Frame {
    format!(r#"40{{"sid":"{sid}"}}"#).into()
}

/// `44{"message":...}`, or `44/ns,{...}` for another namespace.
pub fn connect_error(namespace: &str, message: &str) -> Frame {
    let body = serde_json::json!({ "message": message });
    if namespace == "/" { format!("44{body}") } else { format!("44{namespace},{body}") }.into()
}

/// `42["event",data]`, serialized once however many sockets receive it.
pub fn event<T: Serialize + ?Sized>(name: &str, data: &T) -> Result<Frame, serde_json::Error> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"42[");
    serde_json::to_writer(&mut out, name)?;
    out.push(b',');
    serde_json::to_writer(&mut out, data)?;
    out.push(b']');
    Ok(utf8(out))
}

/// `43<id>[data]`: the answer to an event that asked for one.
pub fn ack<T: Serialize + ?Sized>(id: u64, data: &T) -> Result<Frame, serde_json::Error> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"43");
    out.extend_from_slice(id.to_string().as_bytes());
    out.push(b'[');
    serde_json::to_writer(&mut out, data)?;
    out.push(b']');
    Ok(utf8(out))
}

fn utf8(bytes: Vec<u8>) -> Frame {
    // serde_json writes UTF-8 and the rest is ASCII; checked all the same (it is cheap next to
    // serializing), so no unsafe is needed.
    Frame::try_from(bytes).unwrap_or_else(|_| Frame::from_static("6"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_connect_with_and_without_auth() {
        assert_eq!(parse(r#"0{"token":"t"}"#), Incoming::Connect { namespace: "/", auth: Some(json!({"token": "t"})) });
        assert_eq!(parse("0"), Incoming::Connect { namespace: "/", auth: None });
        assert_eq!(parse("0/admin,"), Incoming::Connect { namespace: "/admin", auth: None });
        assert_eq!(parse(r#"0{"token":"#), Incoming::Connect { namespace: "/", auth: None });
    }

    #[test]
    fn parses_events_with_ack_ids_namespaces_and_attachments() {
        let Incoming::Event { namespace, ack, name, data, attachments } = parse(r#"212["room:join",{"room_id":"r"}]"#)
        else {
            panic!("not an event")
        };
        assert_eq!((namespace, ack, name.as_str(), attachments), ("/", Some(12), "room:join", 0));
        assert_eq!(data.unwrap(), json!({"room_id": "r"}));

        let Incoming::Event { namespace, ack, data, .. } = parse(r#"2/other,["x"]"#) else { panic!("not an event") };
        assert_eq!((namespace, ack), ("/other", None));
        assert!(data.is_err(), "no payload argument");

        let Incoming::Event { attachments, data, .. } = parse(r#"51-3["message:send",{"_placeholder":true,"num":0}]"#)
        else {
            panic!("not a binary event")
        };
        assert_eq!(attachments, 1);
        assert_eq!(data.unwrap(), json!({"_placeholder": true, "num": 0}));
    }

    #[test]
    fn malformed_packets_are_ignored_not_errors() {
        for raw in ["", "9", r#"2["message:send""#, "2garbage", "2[1,2,3]", r#"2{"a":1}"#, r#"3["nope"]"#, "5-[\"a\"]"]
        {
            assert!(matches!(parse(raw), Incoming::Ignored(_)), "{raw:?} was not ignored");
        }
        assert!(matches!(parse(r#"2999999999999999999999x["room:join"]"#), Incoming::Ignored(_)));
    }

    #[test]
    fn no_input_makes_the_parser_panic() {
        // Every string of up to three characters from an alphabet of the characters the parser
        // looks at, plus multi-byte ones in each position (a client controls every byte).
        let alphabet = ["0", "1", "2", "3", "5", "6", "9", "/", ",", "-", "[", "]", "\"", "{", "é", "😀", "\u{1e}", ""];
        let mut checked = 0;
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    for tail in ["", r#"["e",1]"#, "é]"] {
                        let raw = format!("{a}{b}{c}{tail}");
                        let _ = parse(&raw);
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 18 * 18 * 18 * 3);
        assert_eq!(parse("é"), Incoming::Ignored("unknown packet type"));
        assert_eq!(parse("2é"), Incoming::Ignored("event payload is not a JSON array"));
    }

    #[test]
    fn encodes_what_socket_io_clients_decode() {
        assert_eq!(event("typing", &json!({"room_id": "r"})).unwrap().as_str(), r#"42["typing",{"room_id":"r"}]"#);
        assert_eq!(ack(7, &json!({"ok": true})).unwrap().as_str(), r#"437[{"ok":true}]"#);
        assert_eq!(connect_error("/", "unauthorized").as_str(), r#"44{"message":"unauthorized"}"#);
        assert_eq!(connect_error("/x", "Invalid namespace").as_str(), r#"44/x,{"message":"Invalid namespace"}"#);
        assert_eq!(connected("abc").as_str(), r#"40{"sid":"abc"}"#);
        let open: Value = serde_json::from_str(&open("s", true, 25000, 20000, 100).as_str()[1..]).unwrap();
        assert_eq!(
            open,
            json!({"sid":"s","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":100})
        );
    }
}
