//! Who is online on this instance: a user is online while at least one of its sockets is connected.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct LocalPresence {
    // A std mutex: counters only, never held across an await.
    sockets_per_user: Mutex<HashMap<String, usize>>,
}

impl LocalPresence {
    /// Counts a new socket if the user has fewer than `max` here: `Ok(true)` when it is the
    /// user's first (the user came online), `Err(())` when the user is at `max` already.
    #[allow(clippy::result_unit_err)]
    pub fn connect(&self, user_id: &str, max: usize) -> Result<bool, ()> {
        let mut m = self.sockets_per_user.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(user_id.to_string()).or_insert(0);
        if *n >= max {
            return Err(());
        }
        *n += 1;
        Ok(*n == 1)
    }

    /// Uncounts a socket; true when it was the user's last (the user went offline).
    pub fn disconnect(&self, user_id: &str) -> bool {
        let mut m = self.sockets_per_user.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(user_id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                m.remove(user_id);
                true
            }
            None => false,
        }
    }

    pub fn is_online(&self, user_id: &str) -> bool {
        self.sockets_per_user.lock().unwrap_or_else(|p| p.into_inner()).contains_key(user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_while_any_socket() {
        let p = LocalPresence::default();
        assert_eq!(p.connect("u", 2), Ok(true));
        assert_eq!(p.connect("u", 2), Ok(false));
        assert_eq!(p.connect("u", 2), Err(()), "a third socket past a cap of 2");
        assert!(!p.disconnect("u"));
        assert!(p.is_online("u"));
        assert!(p.disconnect("u"));
        assert!(!p.is_online("u"));
        assert!(!p.disconnect("u"));
        assert_eq!(p.connect("u", 1), Ok(true), "a refused socket was never counted");
    }
}
