//! The Redis sequencer runs several batches at once (lanes by room). What must survive that: one
//! sender's sends to many rooms, all queued before any is answered, get each room's seqs gap-free
//! and in the order they were queued.

use chatmesh::sequencer::Sequencer;

use crate::support::procs::RedisServer;
use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_sends_to_many_rooms_keep_each_rooms_queue_order() {
    let redis = RedisServer::start();
    let db = TestDatabase::create();
    let p = parts(&redis.url(), &db.url()).await;
    let mut rooms = Vec::new();
    let mut sender = String::new();
    for _ in 0..8 {
        let (uid, room) = seed(&*p.store).await;
        sender = uid;
        rooms.push(room);
    }
    // Queue everything first (submit returns once the send is enqueued), then collect the answers.
    let per_room = 60;
    let mut receipts = Vec::new();
    for i in 0..per_room {
        for (r, room) in rooms.iter().enumerate() {
            let receipt = p.sequencer.submit(request(room, &sender, &format!("c{r}-{i}"))).await.unwrap();
            receipts.push((r, i, receipt));
        }
    }
    let mut seqs = vec![Vec::new(); rooms.len()];
    for (r, i, receipt) in receipts {
        let message = receipt.await.unwrap().message().clone();
        assert_eq!(message.client_msg_id, format!("c{r}-{i}"));
        seqs[r].push(message.seq);
    }
    for (r, got) in seqs.iter().enumerate() {
        assert_eq!(got, &(1..=per_room as i64).collect::<Vec<_>>(), "room {r}: seqs in queue order, no gaps");
    }
}
