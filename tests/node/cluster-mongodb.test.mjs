// The cluster suite of cluster.test.mjs once more, with the instances on Redis + MongoDB (a private
// SecantusDB server, or the mongod CHATMESH_TEST_MONGODB_URL names; a fresh database per cluster).
// The tests exist once, there; this file only picks the store, and being a file of its own lets
// `node --test --test-concurrency=2` run both parameterisations side by side.
process.env.CHATMESH_CLUSTER_STORE = 'mongodb';
await import('./cluster.test.mjs');
