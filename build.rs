//! Copies the browser build of socket.io-client (from npm, web/node_modules) into OUT_DIR so the
//! binary can serve it. Runs `npm ci` in web/ when the package is not installed yet.

use std::path::Path;
use std::process::Command;

fn main() {
    let web = Path::new("web");
    let dist = web.join("node_modules/socket.io-client/dist/socket.io.min.js");
    println!("cargo:rerun-if-changed=web/package-lock.json");
    println!("cargo:rerun-if-changed={}", dist.display());
    if !dist.exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(web)
            .status()
            .unwrap_or_else(|e| panic!("web/: could not run `npm ci` ({e}); install Node.js and npm"));
        assert!(status.success(), "web/: `npm ci` failed");
    }
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    std::fs::copy(&dist, Path::new(&out).join("socket.io.min.js"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", dist.display()));
}
