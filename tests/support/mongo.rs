//! The one way a Rust test gets a MongoDB database: [`TestMongoDatabase::create`] gives a fresh
//! database and dropping it drops the database.
//!
//! Where it lives:
//! - `CHATMESH_TEST_MONGODB_URL` set: on that deployment, e.g. a real `mongod` replica set
//!   (`mongodb://127.0.0.1:27017/?replicaSet=rs0`; one member is enough);
//! - else on a private SecantusDB server ([`SecantusServer`]), one per test process: started by
//!   the first database that needs it, shared by the databases that exist at the same time, and
//!   killed (its temp dir removed) when the last of them is dropped. Under nextest (one process
//!   per test) that is one server per test.
//!
//! A missing `secantusd-py` is a panic that says how to install it, never a skip.

#![allow(dead_code)]

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::pg::with_database;
use super::procs::SecantusServer;

/// The variable that points the tests at a real MongoDB deployment instead of SecantusDB.
pub const URL_VAR: &str = "CHATMESH_TEST_MONGODB_URL";

/// The deployment `CHATMESH_TEST_MONGODB_URL` names, if it is set.
pub fn override_url() -> Option<String> {
    std::env::var(URL_VAR).ok().filter(|u| !u.trim().is_empty())
}

/// The database named by a MongoDB URL's path, if any.
pub fn url_database(url: &str) -> Option<&str> {
    let base = url.split_once('?').map_or(url, |(base, _)| base);
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = &base[authority..];
    path.find('/').map(|i| &path[i + 1..]).filter(|db| !db.is_empty())
}

/// `url` pointed at database `db`. With credentials and no `authSource`, the driver would
/// authenticate against the database in the path: keep authenticating where the URL said.
pub fn url_for(url: &str, db: &str) -> String {
    let has_credentials = url.split_once("://").is_some_and(|(_, rest)| {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        authority.contains('@')
    });
    let mut out = with_database(url, db);
    if has_credentials && !url.contains("authSource=") {
        let auth_db = url_database(url).unwrap_or("admin");
        out.push(if out.contains('?') { '&' } else { '?' });
        out.push_str(&format!("authSource={auth_db}"));
    }
    out
}

/// This process's SecantusDB server, started if no database holds it now.
fn shared_secantus() -> Arc<SecantusServer> {
    static SHARED: Mutex<Weak<SecantusServer>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(server) = slot.upgrade() {
        return server;
    }
    let server = Arc::new(SecantusServer::start());
    *slot = Arc::downgrade(&server);
    server
}

/// A database of its own for one test, dropped when this is dropped (and the private server with
/// it, if this was the last database on it).
pub struct TestMongoDatabase {
    name: String,
    url: String,
    /// `None` when the database is on the `CHATMESH_TEST_MONGODB_URL` deployment.
    secantus: Option<Arc<SecantusServer>>,
}

impl TestMongoDatabase {
    /// A fresh database `chatmesh_test_<ulid>` (MongoDB creates it at the first write).
    /// Blocking: it may start the server (about a second).
    pub fn create() -> Self {
        let name = format!("chatmesh_test_{}", ulid::Ulid::generate().to_string().to_lowercase());
        match override_url() {
            Some(url) => TestMongoDatabase { url: url_for(&url, &name), name, secantus: None },
            None => {
                let server = shared_secantus();
                TestMongoDatabase { url: server.url(&name), name, secantus: Some(server) }
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The database's URL, for `MongoStore::connect` or `CHATMESH_STORE_URL`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Whether the database is on the private SecantusDB server rather than on the deployment
    /// `CHATMESH_TEST_MONGODB_URL` names.
    pub fn on_secantus(&self) -> bool {
        self.secantus.is_some()
    }

    /// A driver client for the database's deployment (its URL names the database).
    pub async fn client(&self) -> mongodb::Client {
        let mut opts = mongodb::options::ClientOptions::parse(&self.url)
            .await
            .unwrap_or_else(|e| panic!("parse MongoDB URL {}: {e}", self.url));
        opts.server_selection_timeout.get_or_insert(Duration::from_secs(5));
        mongodb::Client::with_options(opts).unwrap_or_else(|e| panic!("MongoDB client for {}: {e}", self.url))
    }

    /// How many documents `collection` of this database holds.
    pub async fn count(&self, collection: &str) -> u64 {
        let client = self.client().await;
        let coll = client.database(&self.name).collection::<mongodb::bson::Document>(collection);
        let n = coll
            .count_documents(mongodb::bson::doc! {})
            .await
            .unwrap_or_else(|e| panic!("count {}.{collection}: {e}", self.name));
        client.shutdown().await;
        n
    }
}

impl Drop for TestMongoDatabase {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // Drop may run on a runtime worker: do the async cleanup on a thread with its own runtime.
        let res = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let mut opts = mongodb::options::ClientOptions::parse(&url).await?;
                opts.server_selection_timeout.get_or_insert(Duration::from_secs(5));
                let client = mongodb::Client::with_options(opts)?;
                client.database(&name).drop().await?;
                client.shutdown().await;
                anyhow::Ok(())
            })
        })
        .join();
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test database {}: {e:#}", self.name),
            Err(_) => eprintln!("could not drop test database {}: cleanup panicked", self.name),
        }
        // Then `secantus` drops: the last database on the server stops it.
    }
}
