// The conformance suite of conformance.test.mjs once more, against two regions: region a (n1, n3)
// and region b (n2), each on its own Redis behind its own HAProxy (the deploy configuration), one
// PostgreSQL database, every request between the regions through a link that delays it 25 ms each
// way (scripts/relay.py). Requests and sockets alternate between the regions' HAProxys, so every
// test's users, rooms (homed where created) and sockets are spread over both regions. The tests
// exist once, there; this file only picks the topology.
process.env.CHATMESH_CONFORMANCE_REGIONS = '2';
await import('./conformance.test.mjs');
