// The cluster suite of cluster.test.mjs once more, with its instances in two regions: n1 and n3
// in region a, n2 in region b, each region on its own Redis, one PostgreSQL database, and every
// request between the regions through a link that delays it 25 ms each way (scripts/relay.py).
// Each region has its own HAProxy (the deploy configuration): every client request goes through
// its region's, pinned to the instance the test picked, and the regions reach each other through
// the link and the other region's internal frontend. Sockets spread over the instances are spread
// over both regions; rooms created through n2 are
// homed in b, the others in a. The tests exist once, there; this file only picks the topology.
process.env.CHATMESH_CLUSTER_REGIONS = '2';
await import('./cluster.test.mjs');
