//! Whether the Redis primary keeps an append-only file: without one a restart empties it and takes
//! acknowledged messages not yet written back with it, so an instance says so at start (a warning)
//! and all along (`chatmesh_redis_aof_enabled`, which the ChatmeshRedisWithoutAof alert watches).

use crate::support::procs::RedisServer;
use crate::{TestDatabase, cluster_instance, wait_metric};

const WARNING: &str = "keeps no append-only file";

fn warned(logs: &[String]) -> bool {
    logs.iter().any(|l| l.contains(WARNING) && l.contains(r#""level":"WARN""#))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_says_when_redis_keeps_no_append_only_file() {
    let bare = RedisServer::start();
    let durable = RedisServer::start_with(&["--appendonly", "yes"]);
    let (db1, db2) = (TestDatabase::create(), TestDatabase::create());
    let without = cluster_instance(bare.url(), db1.url(), "aof-off", vec![]).await;
    let with = cluster_instance(durable.url(), db2.url(), "aof-on", vec![]).await;

    // The warning comes while the instance starts, before it listens.
    assert!(warned(&without.logs.lock().unwrap()), "no start-up warning without AOF");
    assert!(!warned(&with.logs.lock().unwrap()), "a warning although Redis keeps an AOF");
    wait_metric(&without, "chatmesh_redis_aof_enabled 0").await;
    wait_metric(&with, "chatmesh_redis_aof_enabled 1").await;

    // The gauge follows the primary as it is now, not as it was at start.
    tokio::task::block_in_place(|| bare.cli(&["CONFIG", "SET", "appendonly", "yes"]));
    wait_metric(&without, "chatmesh_redis_aof_enabled 1").await;
}
