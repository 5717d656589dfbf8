use crate::helpers::*;

#[test]
fn invalid_settings_stop_the_process_with_one_line_naming_them() {
    for (env, name) in [
        (vec![("CHATMESH_BIND", "not-an-address")], "CHATMESH_BIND"),
        (vec![("CHATMESH_MAX_BODY_BYTES", "lots")], "CHATMESH_MAX_BODY_BYTES"),
        (vec![("CHATMESH_SEND_RATE_PER_SEC", "0")], "CHATMESH_SEND_RATE_PER_SEC"),
        (vec![("CHATMESH_AUTH_RATE_PER_MIN", "-5")], "CHATMESH_AUTH_RATE_PER_MIN"),
        (vec![("CHATMESH_LOG_FORMAT", "xml")], "CHATMESH_LOG_FORMAT"),
        (vec![("CHATMESH_STORE_URL", "mysql://db")], "CHATMESH_STORE_URL"),
        (vec![("CHATMESH_JWT_SECRET", "short")], "CHATMESH_JWT_SECRET"),
        (vec![("CHATMESH_BINDD", "127.0.0.1:1")], "CHATMESH_BINDD"),
        // A SQLite file cannot be shared by instances on different machines.
        (
            vec![
                ("CHATMESH_REDIS_URL", "redis://127.0.0.1:1"),
                ("CHATMESH_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
                ("CHATMESH_CLUSTER_SECRET", "0123456789abcdef0123456789abcdef"),
            ],
            "CHATMESH_STORE_URL",
        ),
        (
            vec![("CHATMESH_REDIS_URL", "redis://127.0.0.1:1"), ("CHATMESH_STORE_URL", "postgres://x@127.0.0.1/db")],
            "CHATMESH_JWT_SECRET",
        ),
        (vec![("CHATMESH_REDIS_URL", "redis+sentinel://127.0.0.1:1")], "CHATMESH_REDIS_URL"),
        (vec![("CHATMESH_ACK_LEVEL", "quorum")], "CHATMESH_ACK_LEVEL"),
        (vec![("CHATMESH_SYNC_LINGER_MS", "5000")], "CHATMESH_SYNC_LINGER_MS"),
    ] {
        let (code, stderr) = run_to_exit(&env, &["serve"]);
        assert_eq!(code, Some(2), "{name}: {stderr}");
        let lines: Vec<_> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{name}: one line, got {stderr:?}");
        assert!(lines[0].contains(name), "{name} not named in {stderr:?}");
    }
}

#[test]
fn help_lists_every_setting() {
    let out = std::process::Command::new(binary()).args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "CHATMESH_BIND",
        "CHATMESH_STORE_URL",
        "CHATMESH_REDIS_URL",
        "CHATMESH_MAX_BODY_BYTES",
        "CHATMESH_SEND_RATE_PER_SEC",
    ] {
        assert!(help.contains(var), "{var} missing from --help");
    }
}

#[test]
fn help_never_prints_the_values_of_urls_or_secrets() {
    // clap shows an env variable's current value in --help unless told not to; store and Redis
    // URLs carry passwords.
    for cmd in ["serve", "backup", "restore"] {
        let out = std::process::Command::new(binary())
            .args([cmd, "--help"])
            .env("CHATMESH_STORE_URL", "postgres://app:store-pw-1@db/chat")
            .env("CHATMESH_REDIS_URL", "redis://:redis-pw-2@cache:6379")
            .env("CHATMESH_JWT_SECRET", "jwt-secret-3-0123456789abcdef0123456789")
            .env("CHATMESH_CLUSTER_SECRET", "cluster-secret-4-0123456789abcdef01234")
            .env("CHATMESH_ADMIN_TOKEN", "admin-token-5-0123456789")
            .env("CHATMESH_REDIS_SENTINEL_PASSWORD", "sentinel-pw-6")
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("CHATMESH_STORE_URL"), "{cmd} --help names the store setting");
        for secret in ["store-pw-1", "redis-pw-2", "jwt-secret-3", "cluster-secret-4", "admin-token-5", "sentinel-pw-6"]
        {
            assert!(!help.contains(secret), "{cmd} --help printed {secret}:\n{help}");
        }
    }
}
