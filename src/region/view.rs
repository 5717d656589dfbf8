//! The other regions in the cluster view (`GET /api/v1/cluster`, `/admin`): each one's instances
//! as it lists them, and how far behind it this region's copy is.

use serde_json::{Value, json};

use crate::region::replicator::lag_of;
use crate::state::RegionApi;

/// One entry per peer region, asked at once (each within the region timeout).
pub async fn peers(api: &RegionApi) -> Vec<Value> {
    let asks = api.peers.iter().map(|peer| async move {
        let view = peer.call::<_, Value>("view", "/view", &json!({})).await;
        let lag = lag_of(&api.redis, &api.keys, &peer.region).await;
        match view {
            Ok(v) => json!({
                "region": peer.region,
                "reachable": true,
                "instances": v["instances"],
                "replication_lag_seconds": lag,
            }),
            Err(e) => json!({
                "region": peer.region,
                "reachable": false,
                "error": e.to_string(),
                "instances": [],
                "replication_lag_seconds": lag,
            }),
        }
    });
    futures::future::join_all(asks).await
}
