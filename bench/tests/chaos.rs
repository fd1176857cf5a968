//! The whole mesh under chaos, seeded and short: two replicas of each
//! service and three executors as processes, every one killed with SIGKILL
//! and restarted, NATS and PostgreSQL each stopped for 10–20 s, under a
//! steady load of tickets whose agents work in sessions; nothing lost,
//! doubled or stranded, and the sessions killed executors left resumed
//! with their conversations whole. The long
//! version: `bash bench/chaos.sh`.

use std::time::Duration;

use omoi_bench::chaos::{ChaosOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_keeps_every_promise_under_kills_and_outages() {
    let dir = std::env::temp_dir().join(format!("omoi-chaos-test-{}", uuid::Uuid::new_v4().simple()));
    let report = run(&ChaosOptions {
        seed: 16,
        load: Duration::from_secs(60),
        tickets_per_second: 2.0,
        executors: 3,
        dir: dir.clone(),
    })
    .await
    .unwrap();
    println!("{report}");
    assert!(report.violations.is_empty(), "{report}\nlogs: {}", dir.display());
    assert_eq!(report.kills.len(), 9, "every process killed at least once");
    assert_eq!((report.nats_outages, report.postgres_outages), (1, 1));
    assert!(report.tickets.get("completed").copied().unwrap_or(0) > 50);
    assert!(report.retries > 0 && report.cancels_asked > 0);
    assert!(report.resumes > 0, "killed agents' sessions were resumed: {report}");
    let _ = std::fs::remove_dir_all(&dir);
}
