//! Validated input values: parse, don't validate. Past the edge an invalid value cannot exist.
//!
//! Lengths count Unicode scalar values (`chars()`), as API.md §2 says.

/// Why a field was rejected: the message goes into the `validation_failed` error verbatim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FieldError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError(msg.into()))
}

fn char_len_within(field: &str, s: &str, min: usize, max: usize) -> Result<(), FieldError> {
    // Count at most max+1 chars so a huge input is not walked to the end.
    let n = s.chars().take(max + 1).count();
    if n < min || n > max {
        return err(format!("{field} must be {min}..={max} characters"));
    }
    Ok(())
}

string_newtype!(Username);
string_newtype!(Password);
string_newtype!(DisplayName);
string_newtype!(StatusText);
string_newtype!(AvatarUrl);
string_newtype!(RoomName);
string_newtype!(Topic);
string_newtype!(MessageBody);
string_newtype!(ClientMsgId);

impl Username {
    /// 3..=32 of `[a-z0-9_]`, case-insensitive on input (stored lower-case).
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        let lower = s.to_ascii_lowercase();
        if !(3..=32).contains(&lower.len())
            || !lower.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return err("username must be 3..=32 characters of [a-z0-9_]");
        }
        Ok(Self(lower))
    }
}

impl Password {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        char_len_within("password", s, 8, 128)?;
        Ok(Self(s.to_string()))
    }
}

impl DisplayName {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        char_len_within("display_name", s, 1, 64)?;
        reject_controls("display_name", s, false)?;
        reject_invisible("display_name", s)?;
        if s.trim().is_empty() {
            return err("display_name must not be only whitespace");
        }
        Ok(Self(s.to_string()))
    }
}

impl StatusText {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        char_len_within("status_text", s, 0, 140)?;
        reject_controls("status_text", s, false)?;
        Ok(Self(s.to_string()))
    }
}

impl AvatarUrl {
    /// An absolute http/https URL, or `""` to clear it.
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        char_len_within("avatar_url", s, 0, 512)?;
        if s.is_empty() {
            return Ok(Self(String::new()));
        }
        let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://"));
        match rest {
            Some(r)
                if !r.is_empty() && !r.starts_with('/') && !s.chars().any(|c| c.is_whitespace() || c.is_control()) =>
            {
                Ok(Self(s.to_string()))
            }
            _ => err("avatar_url must be an absolute http(s) URL or empty"),
        }
    }
}

impl RoomName {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        char_len_within("name", s, 1, 80)?;
        reject_controls("name", s, false)?;
        reject_invisible("name", s)?;
        if s.trim().is_empty() {
            return err("name must not be only whitespace");
        }
        Ok(Self(s.to_string()))
    }
}

impl Topic {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        char_len_within("topic", s, 0, 512)?;
        reject_controls("topic", s, true)?;
        Ok(Self(s.to_string()))
    }
}

impl MessageBody {
    /// 1..=4000 scalar values, kept verbatim; not only whitespace; no Cc controls but `\n` and `\t`.
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        char_len_within("body", s, 1, 4000)?;
        reject_controls("body", s, true)?;
        if s.chars().all(char::is_whitespace) {
            return err("body must not be only whitespace");
        }
        Ok(Self(s.to_string()))
    }
}

impl ClientMsgId {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        if !(1..=64).contains(&s.len()) || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return err("client_msg_id must be 1..=64 characters of [A-Za-z0-9_-]");
        }
        Ok(Self(s.to_string()))
    }
}

/// Category Cc is U+0000..U+001F and U+007F..U+009F; `\n` and `\t` pass where multi-line text is allowed.
fn reject_controls(field: &str, s: &str, allow_newline_tab: bool) -> Result<(), FieldError> {
    let bad = s.chars().any(|c| c.is_control() && !(allow_newline_tab && (c == '\n' || c == '\t')));
    if bad {
        return err(if allow_newline_tab {
            format!("{field} must not contain control characters other than \\n and \\t")
        } else {
            format!("{field} must not contain control characters")
        });
    }
    Ok(())
}

/// Bidirectional-text controls and zero-width characters: in a name they make one user or room look
/// like another (`admin` vs `ad\u{200B}min`, a right-to-left override turning `exe.txt` into
/// `txt.exe`). Message bodies keep them (emoji sequences join with U+200D).
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' // Arabic letter mark, LRM, RLM
        | '\u{202A}'..='\u{202E}' // embeddings and overrides
        | '\u{2066}'..='\u{2069}' // isolates
        | '\u{200B}'..='\u{200D}' // zero-width space, non-joiner, joiner
        | '\u{2060}'..='\u{2064}' // word joiner and invisible operators
        | '\u{180E}' | '\u{FEFF}' // Mongolian vowel separator, zero-width no-break space
        | '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' // Hangul fillers (blank look-alikes)
    )
}

fn reject_invisible(field: &str, s: &str) -> Result<(), FieldError> {
    match s.chars().find(|&c| is_invisible(c)) {
        Some(c) => err(format!(
            "{field} must not contain bidirectional controls or zero-width characters (found U+{:04X})",
            c as u32
        )),
        None => Ok(()),
    }
}

/// Room visibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    Public,
    Private,
}

/// How a stored visibility is read back (SQL rows).
impl TryFrom<String> for Visibility {
    type Error = FieldError;
    fn try_from(s: String) -> Result<Self, FieldError> {
        Self::parse(&s)
    }
}

impl Visibility {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        match s {
            "public" => Ok(Self::Public),
            "private" => Ok(Self::Private),
            _ => err("visibility must be \"public\" or \"private\""),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Private => "private",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_is_lowercased_and_bounded() {
        assert_eq!(Username::parse("Alice_1").unwrap().as_str(), "alice_1");
        assert!(Username::parse("ab").is_err());
        assert!(Username::parse(&"a".repeat(33)).is_err());
        assert!(Username::parse("al ice").is_err());
        assert!(Username::parse("alicé").is_err());
        assert!(Username::parse(&"a".repeat(32)).is_ok());
    }

    #[test]
    fn names_refuse_bidi_controls_and_zero_width_characters() {
        for bad in
            ["ad\u{200B}min", "\u{202E}txt.exe", "a\u{2066}b\u{2069}", "x\u{FEFF}", "\u{3164}\u{3164}", "a\u{200D}b"]
        {
            let e = DisplayName::parse(bad).unwrap_err().to_string();
            assert!(e.contains("zero-width"), "{bad:?}: {e}");
            assert!(RoomName::parse(bad).is_err(), "room name {bad:?}");
        }
        for good in ["김철수", "José", "O'Brien", "מרים", "شادي", "👍 team"] {
            assert!(DisplayName::parse(good).is_ok(), "{good:?}");
            assert!(RoomName::parse(good).is_ok(), "{good:?}");
        }
        assert!(MessageBody::parse("👨\u{200D}👩\u{200D}👧").is_ok(), "bodies keep emoji sequences");
    }

    #[test]
    fn body_counts_scalar_values() {
        assert!(MessageBody::parse(&"€".repeat(4000)).is_ok());
        assert!(MessageBody::parse(&"€".repeat(4001)).is_err());
        assert!(MessageBody::parse(&"😀".repeat(4000)).is_ok());
        assert!(MessageBody::parse(&"😀".repeat(4001)).is_err());
    }

    #[test]
    fn body_rules() {
        assert!(MessageBody::parse("").is_err());
        assert!(MessageBody::parse(" \n\t ").is_err());
        assert!(MessageBody::parse("a\u{7}").is_err());
        assert!(MessageBody::parse("a\r\nb").is_err());
        assert!(MessageBody::parse("a\u{7f}").is_err());
        assert!(MessageBody::parse("a\u{85}").is_err());
        assert_eq!(MessageBody::parse("  a\n\tb  ").unwrap().as_str(), "  a\n\tb  ");
    }

    #[test]
    fn client_msg_id_charset() {
        assert!(ClientMsgId::parse("abc-DEF_123").is_ok());
        assert!(ClientMsgId::parse("").is_err());
        assert!(ClientMsgId::parse("a b").is_err());
        assert!(ClientMsgId::parse(&"x".repeat(65)).is_err());
        assert!(ClientMsgId::parse(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn avatar_url_forms() {
        assert!(AvatarUrl::parse("").is_ok());
        assert!(AvatarUrl::parse("https://example.com/a.png").is_ok());
        assert!(AvatarUrl::parse("ftp://example.com/a.png").is_err());
        assert!(AvatarUrl::parse("/relative.png").is_err());
        assert!(AvatarUrl::parse("https://").is_err());
    }
}
