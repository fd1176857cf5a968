//! `omoi up` (the README's first command) on a machine whose PostgreSQL and
//! NATS are out of reach: run in a network namespace of its own, where
//! nothing listens at 127.0.0.1:5432 or :4222, with DATABASE_URL and
//! NATS_URL unset, it starts a private PostgreSQL cluster and nats-server
//! under OMOI_STATE_DIR, completes the sample ticket, stops them, and reuses
//! the cluster on the next run; every service requires the bearer token it
//! made and keeps in the state directory.

use std::path::Path;
use std::process::Output;

use omoi_tests::process::binary;

async fn up_alone(state: &Path) -> Output {
    tokio::process::Command::new("unshare")
        .args(["--net", "--", "sh", "-c"])
        // Its ports below the ephemeral range (32768-60999): in a network
        // namespace of its own the services' outgoing connections take
        // ephemeral ports, and one could hold 50054 before the executor
        // listens there.
        .arg(r#"ip link set lo up && exec "$0" up --exit-when-done --executors 1 --base-port 21051"#)
        .arg(binary("omoi"))
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .env_remove("DATABASE_URL_FILE")
        .env_remove("NATS_URL_FILE")
        .env("OMOI_STATE_DIR", state)
        .output()
        .await
        .expect("unshare runs")
}

#[tokio::test]
async fn up_brings_its_own_postgres_and_nats_when_the_machines_are_out_of_reach() {
    let state = std::env::temp_dir().join(format!("omoi-state-{}", uuid::Uuid::now_v7().simple()));
    let first = up_alone(&state).await;
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(out.contains("creating a private PostgreSQL cluster"), "{out}");
    assert!(out.contains("NATS: a private nats-server"), "{out}");
    // Its users' passwords stay in its configuration, which only we read.
    assert!(out.contains("a user for the services, another for executors"), "{out}");
    let conf = state.join("nats/nats.conf");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(
        text.contains(r#"user: "omoi-executor""#) && !out.contains("omoi-executor:"),
        "{out}"
    );
    assert!(out.contains(" is COMPLETED."), "{out}");
    assert!(out.contains("console      http://127.0.0.1:8080"), "{out}");
    let data = state.join("postgres/data");
    assert!(!data.join("postmaster.pid").exists(), "the cluster stops with the mesh");
    // The mesh had a token of its own, kept where the CLI finds it, never
    // printed.
    let token_file = state.join("auth-token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(token.len(), 64, "{token:?}");
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(out.contains("Every service asks for the mesh's bearer token"), "{out}");
    assert!(!out.contains(&token) && !String::from_utf8_lossy(&first.stderr).contains(&token));

    let second = up_alone(&state).await;
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{out}");
    assert!(!out.contains("creating"), "the cluster is reused: {out}");
    assert!(out.contains("PostgreSQL: a private cluster in"), "{out}");
    assert!(out.contains(" is COMPLETED."), "{out}");
    assert!(!data.join("postmaster.pid").exists());
    assert_eq!(
        std::fs::read_to_string(&token_file).unwrap(),
        token,
        "the token is kept"
    );
    std::fs::remove_dir_all(&state).unwrap();
}
