use std::time::Duration;

use chatmesh::sequencer::Sequencer;
use chatmesh::sync::redis::{SyncConfig, SyncOutcome, SyncWorker};

use crate::support::procs::{RedisCluster, RedisServer};
use crate::*;

fn worker(p: &Parts, consumer: &str, claim_idle: Duration) -> SyncWorker {
    SyncWorker::new(
        p.redis.clone(),
        p.keys.clone(),
        p.store.clone(),
        consumer.into(),
        SyncConfig { claim_idle, batch: 500, ..SyncConfig::default() },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_has_its_entries_reclaimed_and_stored_exactly_once() {
    let redis = RedisServer::start();
    let db = TestDatabase::create();
    let p = parts(&redis.url(), &db.url()).await;
    let (uid, room) = seed(&*p.store).await;
    let seqs = send_n(&p.sequencer, &room, &uid, "m", 50).await;
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());

    // Consumer A reads the batch and dies before committing it.
    let a = worker(&p, "a", Duration::from_millis(300));
    a.ensure_groups().await.unwrap();
    let taken = a.read_batch(Duration::ZERO).await.unwrap();
    assert_eq!(taken.len(), 50);
    assert!(p.store.messages_after(&as_room(&room), 0, 100).await.unwrap().is_empty(), "nothing stored yet");

    // Consumer B finds nothing new; once A's entries are idle past the timeout it takes them over.
    let b = worker(&p, "b", Duration::from_millis(300));
    assert_eq!(b.run_once(Duration::ZERO).await, SyncOutcome::Idle);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b.reclaim().await.unwrap(), 50);
    assert_eq!(b.run_once(Duration::ZERO).await, SyncOutcome::Synced { stored: 50, dead: 0 });
    assert_eq!(b.measure().await.unwrap().0, 0, "the backlog is empty");

    // A comes back and commits its stale copy: the upsert is idempotent.
    a.commit_batch(taken).await;
    let stored = p.store.messages_after(&as_room(&room), 0, 100).await.unwrap();
    assert_eq!(stored.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=50).collect::<Vec<_>>());
    let ids: std::collections::HashSet<_> = stored.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids.len(), 50, "each message stored exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_without_persistence_reinitialises_counters_from_the_store() {
    let mut redis = RedisServer::start();
    let db = TestDatabase::create();
    let p = parts(&redis.url(), &db.url()).await;
    let (uid, room) = seed(&*p.store).await;
    assert_eq!(send_n(&p.sequencer, &room, &uid, "before", 10).await, (1..=10).collect::<Vec<_>>());
    let w = worker(&p, "w", Duration::from_secs(5));
    w.ensure_groups().await.unwrap();
    assert_eq!(w.run_once(Duration::ZERO).await, SyncOutcome::Synced { stored: 10, dead: 0 });
    assert_eq!(p.store.head_seq(&as_room(&room)).await.unwrap(), Some(10));

    redis.restart(); // no persistence: counters, streams and dedupe keys are gone
    assert_eq!(redis.cli(&["DBSIZE"]).trim(), "0");

    // The connection manager reconnects; the counter starts again from the store's head.
    let mut after = Vec::new();
    for attempt in 0..50 {
        match p.sequencer.send(request(&room, &uid, &format!("after{}", after.len()))).await {
            Ok(out) => after.push(out.message().seq),
            Err(e) => {
                assert!(attempt < 49, "sends never recovered after the restart: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if after.len() == 3 {
            break;
        }
    }
    assert_eq!(after, vec![11, 12, 13], "no seq that reached the store is handed out again");
    w.ensure_groups().await.unwrap();
    assert_eq!(w.run_once(Duration::ZERO).await, SyncOutcome::Synced { stored: 3, dead: 0 });
    let stored = p.store.messages_after(&as_room(&room), 0, 100).await.unwrap();
    assert_eq!(stored.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=13).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_entries_go_to_the_dead_letter_stream() {
    let redis = RedisServer::start();
    let db = TestDatabase::create();
    let p = parts(&redis.url(), &db.url()).await;
    let w = worker(&p, "w", Duration::from_secs(5));
    w.ensure_groups().await.unwrap();
    let stream = p.keys.sync_stream(1);
    redis.cli(&["XADD", &stream, "*", "m", "{not json"]);
    assert_eq!(w.run_once(Duration::ZERO).await, SyncOutcome::Synced { stored: 0, dead: 1 });
    assert_eq!(redis.cli(&["XLEN", &p.keys.dead_letter(1)]).trim(), "1");
    assert_eq!(redis.cli(&["XLEN", &stream]).trim(), "0", "moved, not left pending");
}

/// The send script runs unchanged on a 3-primary Redis Cluster: every key of one room hashes to
/// one slot (no CROSSSLOT), for rooms spread over different nodes. A sender whose revocation count
/// moved on is refused, but its accepted sends still answer as duplicates.
#[test]
fn the_send_script_runs_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let keys = chatmesh::redis_io::Keys::new("cm", 64);
    let script = chatmesh::redis_io::send_script(&crate::test_seal());
    let script = script.as_str();
    let mut slots_seen = std::collections::HashSet::new();
    for r in 0..6 {
        let room = format!("01ROOM{r:020}");
        slots_seen.insert(cluster.cli(&["CLUSTER", "KEYSLOT", &keys.seq(&room)]).trim().to_string());
        let send = |i: u32| {
            let dedupe = keys.dedupe(&room, "u1", &format!("c{i}"));
            cluster.cli(&[
                "EVAL",
                script,
                "6",
                &keys.seq(&room),
                &dedupe,
                &keys.history(&room),
                &keys.sync_stream_of(&room),
                &keys.revocations(&room, "u1"),
                &keys.outbox_of(&room),
                "0",
                &format!("{{\"id\":\"m{i}\",\"room_id\":\"{room}\",\"seq\":"),
                &format!(",\"sender_id\":\"u1\",\"client_msg_id\":\"c{i}\",\"body\":\"b\",\"created_at\":\"2026-01-01T00:00:00.000Z\"}}"),
                "86400",
                &keys.channel(&room),
                "1000",
                &room,
                "",
                "0",
                "1000",
                // One region: no epoch, publish at once.
                "",
                "",
                "",
            ])
        };
        for (i, expect) in [(1, "ok"), (2, "ok"), (1, "dup")] {
            let reply = send(i);
            assert!(!reply.contains("CROSSSLOT") && !reply.contains("ERR"), "room {r}: {reply}");
            assert!(reply.lines().next().unwrap_or_default().trim() == expect, "room {r} send {i}: {reply}");
            if expect == "ok" {
                assert!(reply.contains(&format!("\"seq\":{i},")), "room {r} send {i}: {reply}");
            }
        }
        cluster.cli(&["INCR", &keys.revocations(&room, "u1")]);
        assert_eq!(send(3).lines().next().unwrap_or_default().trim(), "revoked", "room {r}: a send after a leave");
        assert_eq!(send(2).lines().next().unwrap_or_default().trim(), "dup", "room {r}: a retry of an accepted send");
        assert_eq!(cluster.cli(&["GET", &keys.seq(&room)]).trim(), "2", "room {r}: the refused send took no seq");
        // With peer regions each accepted send also went to its shard's outbox.
        assert_eq!(cluster.cli(&["XLEN", &keys.outbox_of(&room)]).trim(), "2", "room {r}: outbox");
    }
    assert!(slots_seen.len() > 1, "rooms landed in more than one slot");

    // The apply script (messages replicated from another region) too: in order, once, and one
    // that arrives early waits for the gap to be filled.
    let apply = chatmesh::redis_io::apply_script(&crate::test_seal());
    for r in 0..3 {
        let room = format!("01REPL{r:020}");
        let put = |seq: u32| {
            let msg = format!("{{\"seq\":{seq},\"sender_id\":\"u1\",\"client_msg_id\":\"c{seq}\"}}");
            let reply = cluster.cli(&[
                "EVAL",
                &apply,
                "4",
                &keys.seq(&room),
                &keys.history(&room),
                &keys.replica_pending(&room),
                &keys.room_epoch(&room),
                &seq.to_string(),
                &msg,
                &keys.channel(&room),
                "0",
                "2000",
                "",
                &keys.dedupe_prefix(&room),
                "3600",
            ]);
            assert!(!reply.contains("ERR"), "room {r}: {reply}");
            reply.lines().map(str::trim).collect::<Vec<_>>().join(" ")
        };
        assert_eq!(put(1), "ok 1", "room {r}");
        assert_eq!(put(1), "dup 1", "room {r}");
        assert_eq!(put(3), "gap 1", "room {r}");
        assert_eq!(put(2), "ok 3", "room {r}: 2 unblocked the waiting 3");
        assert_eq!(cluster.cli(&["XLEN", &keys.history(&room)]).trim(), "3", "room {r}");
        // Each applied message keeps its dedupe key here too (a retry after a takeover).
        for seq in 1..=3 {
            let key = keys.dedupe(&room, "u1", &format!("c{seq}"));
            assert_eq!(cluster.cli(&["EXISTS", &key]).trim(), "1", "room {r}: dedupe key of {seq}");
        }
    }
}

/// Past the backlog limit (the store is behind), sends answer `unavailable` instead of growing Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_refuses_sends_with_unavailable() {
    let redis = RedisServer::start();
    let db = TestDatabase::create();
    let mut p = parts(&redis.url(), &db.url()).await;
    p.sequencer = chatmesh::sequencer::redis::RedisSequencer::start(
        p.redis.clone(),
        p.keys.clone(),
        p.store.clone(),
        chatmesh::sequencer::redis::RedisSequencerConfig {
            ack_level: chatmesh::sequencer::redis::AckLevel::Leader,
            wait_timeout: Duration::from_secs(1),
            dedupe_ttl: Duration::from_secs(86_400),
            backlog_limit: 5,
            seal: crate::test_seal(),
            outbox_len: None,
            elsewhere: None,
        },
    );
    let (uid, room) = seed(&*p.store).await;
    assert_eq!(send_n(&p.sequencer, &room, &uid, "m", 5).await, vec![1, 2, 3, 4, 5]);
    let err = p.sequencer.send(request(&room, &uid, "m5")).await.unwrap_err();
    assert_eq!(err.code(), "unavailable");
    // A retry of an accepted send still answers with the original, backlog or not.
    assert_eq!(p.sequencer.send(request(&room, &uid, "m0")).await.unwrap().message().seq, 1);
    // Once the worker drains the backlog, sends are accepted again, with the next seq.
    let w = worker(&p, "w", Duration::from_secs(5));
    w.ensure_groups().await.unwrap();
    assert_eq!(w.run_once(Duration::ZERO).await, SyncOutcome::Synced { stored: 5, dead: 0 });
    assert_eq!(p.sequencer.send(request(&room, &uid, "m5")).await.unwrap().message().seq, 6);
}

/// The retention job trims every room's recent history to the last `recent_per_room` messages
/// below the store's head — never what the store does not hold — and runs on one instance of the
/// region at a time (the singleton job lease `retention:<region>` in the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retention_job_runs_on_one_instance_and_trims_only_what_the_store_holds() {
    use chatmesh::sync::retention::{Retention, Round};
    let redis = RedisServer::start();
    let db = TestDatabase::create();
    let p = parts(&redis.url(), &db.url()).await;
    let (uid, room) = seed(&*p.store).await;
    send_n(&p.sequencer, &room, &uid, "m", 10).await;
    // The write-back stores the first 10 (keeping them all in recent history: its own bound is
    // 1000); 5 more wait in Redis.
    let w = worker(&p, "w", Duration::from_secs(30));
    w.ensure_groups().await.unwrap();
    assert_eq!(w.run_once(Duration::ZERO).await, SyncOutcome::Synced { stored: 10, dead: 0 });
    send_n(&p.sequencer, &room, &uid, "n", 5).await;
    assert_eq!(redis.cli(&["XLEN", &p.keys.history(&room)]).trim(), "15");
    let job = |instance: &str| Retention {
        store: p.store.clone(),
        redis: p.redis.clone(),
        keys: p.keys.clone(),
        region: "local".into(),
        instance: instance.into(),
        recent_per_room: 3,
        every: Duration::from_secs(60),
    };
    let (one, other) = (job("i1"), job("i2"));
    assert_eq!(one.run_once().await.unwrap(), Round::Trimmed { rooms: 1, entries: 6 });
    assert_eq!(other.run_once().await.unwrap(), Round::NotHolder, "one instance at a time");
    // Kept: from seq 7 (the store's head 10 minus 3) on, the 5 not yet stored included.
    let first = redis.cli(&["XRANGE", &p.keys.history(&room), "-", "+", "COUNT", "1"]);
    assert!(first.lines().next().unwrap_or_default().trim() == "7-0", "{first}");
    assert_eq!(redis.cli(&["XLEN", &p.keys.history(&room)]).trim(), "9");
    assert_eq!(one.run_once().await.unwrap(), Round::Trimmed { rooms: 0, entries: 0 }, "nothing more to trim");
}
