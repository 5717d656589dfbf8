//! Reading fields out of a JSON request body or Socket.IO payload, with clear errors.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// A JSON object received from a client.
pub struct Input(Map<String, Value>);

impl Input {
    pub fn from_value(v: Value) -> Result<Self, ApiError> {
        match v {
            Value::Object(map) => Ok(Self(map)),
            _ => Err(ApiError::validation("payload must be a JSON object")),
        }
    }

    /// A string field that may be absent (`null` counts as absent).
    pub fn opt_str(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::validation(format!("{name} must be a string"))),
        }
    }

    pub fn req_str(&self, name: &str) -> Result<&str, ApiError> {
        self.opt_str(name)?.ok_or_else(|| ApiError::validation(format!("{name} is required")))
    }

    /// An integer field that may be absent.
    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => {
                n.as_i64().map(Some).ok_or_else(|| ApiError::validation(format!("{name} must be an integer")))
            }
            Some(_) => Err(ApiError::validation(format!("{name} must be an integer"))),
        }
    }

    pub fn req_int(&self, name: &str) -> Result<i64, ApiError> {
        self.opt_int(name)?.ok_or_else(|| ApiError::validation(format!("{name} is required")))
    }
}

/// A seq cursor from a client: a non-negative integer.
pub fn parse_seq(name: &str, v: i64) -> Result<i64, ApiError> {
    if v < 0 {
        return Err(ApiError::validation(format!("{name} must be >= 0")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typed_fields() {
        let i = Input::from_value(json!({"a": "x", "n": 3, "z": null, "bad": 1.5})).unwrap();
        assert_eq!(i.req_str("a").unwrap(), "x");
        assert_eq!(i.opt_str("z").unwrap(), None);
        assert_eq!(i.req_str("n").unwrap_err().code(), "validation_failed");
        assert_eq!(i.opt_int("n").unwrap(), Some(3));
        assert!(i.opt_int("bad").is_err());
        assert!(i.req_int("missing").is_err());
        assert!(Input::from_value(json!([1])).is_err());
    }
}
