//! Keeps one socket's sends in the order they arrived.
//!
//! socketioxide runs each incoming event on its own task, so two sends from one socket could
//! reach the sequencer in either order. A ticket is drawn synchronously while the packet is
//! decoded (in arrival order); the handler then waits for its turn before enqueueing.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use socketioxide::adapter::Adapter;
use socketioxide::handler::FromMessageParts;
use socketioxide::socket::Socket;
use socketioxide_core::Value;
use tokio::sync::Notify;

#[derive(Default)]
pub struct SocketOrder {
    next_ticket: AtomicU64,
    serving: AtomicU64,
    notify: Notify,
}

/// The right to enqueue next; passing it on happens on drop, even if the handler fails early.
pub struct Turn(Arc<SocketOrder>);

impl Drop for Turn {
    fn drop(&mut self) {
        self.0.serving.fetch_add(1, Ordering::AcqRel);
        self.0.notify.notify_waiters();
    }
}

/// A send's place in its socket's arrival order.
pub struct Ticket {
    order: Option<Arc<SocketOrder>>,
    number: u64,
}

impl Ticket {
    pub async fn turn(self) -> Option<Turn> {
        let order = self.order?;
        loop {
            {
                let notified = order.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if order.serving.load(Ordering::Acquire) != self.number {
                    notified.await;
                    continue;
                }
            }
            return Some(Turn(order));
        }
    }
}

impl<A: Adapter> FromMessageParts<A> for Ticket {
    type Error = Infallible;

    fn from_message_parts(s: &Arc<Socket<A>>, _: &mut Value, _: &Option<i64>) -> Result<Self, Infallible> {
        let order = s.extensions.get::<Arc<SocketOrder>>();
        let number = order.as_ref().map(|o| o.next_ticket.fetch_add(1, Ordering::AcqRel)).unwrap_or(0);
        Ok(Self { order, number })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_follow_tickets() {
        let order = Arc::new(SocketOrder::default());
        let tickets: Vec<Ticket> = (0..3)
            .map(|_| Ticket { order: Some(order.clone()), number: order.next_ticket.fetch_add(1, Ordering::AcqRel) })
            .collect();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        // Spawn in reverse: the later tickets must still wait for the earlier ones.
        for (i, t) in tickets.into_iter().enumerate().rev() {
            let log = log.clone();
            handles.push(tokio::spawn(async move {
                let _turn = t.turn().await;
                log.lock().unwrap().push(i);
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), vec![0, 1, 2]);
    }
}
