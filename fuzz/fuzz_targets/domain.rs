//! The domain parsers every client string goes through (src/domain): fields, ids and the JSON
//! input reader. The first byte picks the parser, the rest is the string (clients send JSON, so
//! only UTF-8 reaches them).
//!
//! Properties: no input panics; what is accepted holds API.md §2's rule for the field (checked
//! against a model written from the spec, in both directions where the rule is complete); an
//! accepted value parses again to itself; ids survive a JSON round trip.
#![no_main]

use chatmesh::domain::input::{Input, parse_seq};
use chatmesh::domain::{
    AvatarUrl, ClientMsgId, DisplayName, MessageBody, Password, RoomId, RoomName, StatusText, Topic, UserId, Username,
    Visibility,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Some((&which, rest)) = bytes.split_first() else { return };
    let Ok(s) = std::str::from_utf8(rest) else { return };
    let chars = s.chars().count();
    let no_controls = !s.chars().any(char::is_control);
    match which % 12 {
        0 => {
            let lower = s.to_ascii_lowercase();
            let model = (3..=32).contains(&lower.len())
                && lower.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            let parsed = Username::parse(s);
            assert_eq!(parsed.is_ok(), model, "username {s:?}");
            if let Ok(u) = parsed {
                assert_eq!(u.as_str(), lower);
                assert_eq!(Username::parse(u.as_str()).unwrap(), u);
            }
        }
        1 => {
            let parsed = Password::parse(s);
            assert_eq!(parsed.is_ok(), (8..=128).contains(&chars), "password of {chars} characters");
            if let Ok(p) = parsed {
                assert_eq!(p.as_str(), s, "kept verbatim");
            }
        }
        2 => {
            if let Ok(v) = DisplayName::parse(s) {
                assert!((1..=64).contains(&chars) && no_controls && !s.trim().is_empty(), "display_name {s:?}");
                assert_eq!(DisplayName::parse(v.as_str()).unwrap(), v);
            }
        }
        3 => {
            let parsed = StatusText::parse(s);
            assert_eq!(parsed.is_ok(), chars <= 140 && no_controls, "status_text {s:?}");
        }
        4 => {
            if let Ok(v) = AvatarUrl::parse(s) {
                assert!(chars <= 512, "avatar_url of {chars} characters");
                assert!(
                    s.is_empty()
                        || ((s.starts_with("https://") || s.starts_with("http://"))
                            && !s.chars().any(|c| c.is_whitespace() || c.is_control())),
                    "avatar_url {s:?}"
                );
                assert_eq!(AvatarUrl::parse(v.as_str()).unwrap(), v);
            }
        }
        5 => {
            if let Ok(v) = RoomName::parse(s) {
                assert!((1..=80).contains(&chars) && no_controls && !s.trim().is_empty(), "name {s:?}");
                assert_eq!(RoomName::parse(v.as_str()).unwrap(), v);
            }
        }
        6 => {
            let multi_line = !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t');
            assert_eq!(Topic::parse(s).is_ok(), chars <= 512 && multi_line, "topic {s:?}");
        }
        7 => {
            let model = (1..=4000).contains(&chars)
                && !s.chars().all(char::is_whitespace)
                && !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t');
            let parsed = MessageBody::parse(s);
            assert_eq!(parsed.is_ok(), model, "body {s:?}");
            if let Ok(b) = parsed {
                assert_eq!(b.as_str(), s, "kept verbatim, never trimmed");
            }
        }
        8 => {
            let model =
                (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            assert_eq!(ClientMsgId::parse(s).is_ok(), model, "client_msg_id {s:?}");
        }
        9 => match Visibility::parse(s) {
            Ok(v) => assert_eq!(v.as_str(), s),
            Err(_) => assert!(s != "public" && s != "private"),
        },
        10 => {
            let room = RoomId::from(s);
            let back: RoomId = serde_json::from_str(&serde_json::to_string(&room).unwrap()).unwrap();
            assert_eq!(back, room);
            let user = UserId::from(s);
            let back: UserId = serde_json::from_str(&serde_json::to_string(&user).unwrap()).unwrap();
            assert_eq!(back.as_str(), s);
        }
        _ => {
            // A request body or event payload: typed reads must agree with what the JSON holds.
            let Ok(value) = serde_json::from_str::<serde_json::Value>(s) else { return };
            let object = value.as_object().cloned();
            let Ok(input) = Input::from_value(value) else {
                assert!(object.is_none(), "an object was refused");
                return;
            };
            let object = object.expect("only objects are accepted");
            for (k, v) in &object {
                match input.opt_str(k) {
                    Ok(Some(got)) => assert_eq!(Some(got), v.as_str()),
                    Ok(None) => assert!(v.is_null()),
                    Err(_) => assert!(!v.is_string() && !v.is_null()),
                }
                match input.opt_int(k) {
                    Ok(Some(n)) => {
                        assert_eq!(Some(n), v.as_i64());
                        assert_eq!(parse_seq(k, n).is_ok(), n >= 0);
                    }
                    Ok(None) => assert!(v.is_null()),
                    Err(_) => assert!(v.as_i64().is_none()),
                }
                assert_eq!(input.req_str(k).is_ok(), v.is_string());
            }
        }
    }
});
