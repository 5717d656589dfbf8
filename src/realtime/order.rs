//! Keeps one socket's sends in the order they arrived.
//!
//! Each incoming event runs on its own task, so two sends from one socket could reach the
//! sequencer in either order. A ticket is drawn synchronously as the packet is dispatched (in
//! arrival order); the handler then waits for its turn before enqueueing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

#[derive(Default)]
pub struct SocketOrder {
    next_ticket: AtomicU64,
    queue: Mutex<Queue>,
}

/// Whose turn it is, and a wake-up for each ticket already waiting. Each passed turn wakes only
/// the next ticket: waking every waiter cost a burst of N queued sends N² wake-ups (a 200k-send
/// burst from one socket kept an instance busy for minutes after the client had gone).
#[derive(Default)]
struct Queue {
    serving: u64,
    waiting: HashMap<u64, oneshot::Sender<()>>,
}

impl SocketOrder {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The right to enqueue next; passing it on happens on drop, even if the handler fails early.
pub struct Turn(Arc<SocketOrder>);

impl Drop for Turn {
    fn drop(&mut self) {
        let mut queue = self.0.queue();
        loop {
            queue.serving += 1;
            let serving = queue.serving;
            let Some(wake) = queue.waiting.remove(&serving) else { return };
            if wake.send(()).is_ok() {
                return;
            }
            // That waiter is gone (its handler was dropped): its turn passes on at once.
        }
    }
}

/// A send's place in its socket's arrival order (the default one waits for nothing).
#[derive(Default)]
pub struct Ticket {
    order: Option<Arc<SocketOrder>>,
    number: u64,
}

impl Ticket {
    pub async fn turn(self) -> Option<Turn> {
        let order = self.order?;
        loop {
            let woken = {
                let mut queue = order.queue();
                if queue.serving == self.number {
                    return Some(Turn(order.clone()));
                }
                let (wake, woken) = oneshot::channel();
                queue.waiting.insert(self.number, wake);
                woken
            };
            // Woken when the previous turn ends; checked again under the lock all the same.
            let _ = woken.await;
        }
    }
}

impl SocketOrder {
    /// The next place in this socket's order; draw it in arrival order.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        Ticket { order: Some(self.clone()), number: self.next_ticket.fetch_add(1, Ordering::AcqRel) }
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

    #[tokio::test]
    async fn a_waiter_that_is_dropped_passes_its_turn_on() {
        let order = Arc::new(SocketOrder::default());
        let ticket = || Ticket { order: Some(order.clone()), number: order.next_ticket.fetch_add(1, Ordering::AcqRel) };
        let (first, second, third) = (ticket(), ticket(), ticket());
        let turn = first.turn().await.expect("the first ticket is served at once");
        // The second waits, then its handler is dropped before its turn comes.
        let waiting = tokio::spawn(second.turn());
        tokio::task::yield_now().await;
        waiting.abort();
        let _ = waiting.await;
        let third = tokio::spawn(third.turn());
        drop(turn);
        let turn = tokio::time::timeout(std::time::Duration::from_secs(5), third).await;
        assert!(matches!(turn, Ok(Ok(Some(_)))), "the third ticket never got its turn");
    }
}
