//! The `omoi` command line against a real mesh (every service a process):
//! tickets (planned in a file too), tasks, agents, stats, logs, pause and
//! resume, limits, cancelling a task, text and JSON.

use std::process::Command;

use omoi_tests::mesh::{Options, ProcessMesh};
use omoi_tests::process::binary;
use omoi_tests::{Infra, wait_ticket};
use serde_json::Value;

/// Runs `omoi` against the mesh; its stdout, or its stderr as the error.
fn omoi(mesh: &ProcessMesh, args: &[&str]) -> Result<String, String> {
    let out = Command::new(binary("omoi"))
        .args(["--ticket-url", &mesh.ticket.url])
        .args(["--task-queue-url", &mesh.task_queue.url])
        .args(["--health-url", &mesh.health.url])
        .args(args)
        .env_remove("OMOI_AUTH_TOKEN")
        .output()
        .expect("omoi runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Runs `omoi` on a pseudo-terminal (util-linux `script`), 160 columns
/// wide; everything it drew.
fn on_a_terminal(mesh: &ProcessMesh, args: &[&str]) -> String {
    let command = format!(
        "stty cols 160 rows 40; {} --ticket-url {} {}",
        binary("omoi").display(),
        mesh.ticket.url,
        args.join(" ")
    );
    let out = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .env_remove("OMOI_AUTH_TOKEN")
        .output()
        .expect("script runs");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{shown}");
    shown
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_and_steers_the_whole_mesh() {
    let infra = Infra::new().await.unwrap();
    let mesh = ProcessMesh::start(&infra, Options::default()).await.unwrap();
    let created = omoi(&mesh, &["create", "Add a greeting", "--budget", "5"]).unwrap();
    let ticket_id = created.split_whitespace().nth(1).unwrap().to_owned();
    assert!(created.contains("budget $5.00"), "{created}");
    wait_ticket(&mesh.tickets(), &ticket_id, 3).await;

    // Tasks, as text and as the API's JSON.
    let tasks = json(&omoi(&mesh, &["tasks", "--ticket", &ticket_id, "-o", "json"]).unwrap());
    let tasks = tasks["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 4);
    assert!(
        tasks.iter().all(|t| t["status"] == "TASK_STATUS_COMPLETED"),
        "{tasks:?}"
    );
    let first = tasks[0]["id"].as_str().unwrap();
    let text = omoi(&mesh, &["tasks", "--ticket", &ticket_id, "--phase", "implementation"]).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("COMPLETED") && text.contains("IMPLEMENTATION"), "{text}");
    assert!(omoi(&mesh, &["task", first]).unwrap().contains(&ticket_id));
    let got = json(&omoi(&mesh, &["get", &ticket_id, "-o", "json"]).unwrap());
    assert_eq!(got["ticket"]["maxCostUsd"], 5.0);

    // Following it: piped, its events as lines (or JSON); on a terminal, its
    // tasks as a table redrawn in place.
    let lines = omoi(&mesh, &["watch", &ticket_id]).unwrap();
    assert!(lines.contains("TICKET_COMPLETED") && !lines.contains('\x1b'), "{lines}");
    let first_event = json(
        omoi(&mesh, &["watch", &ticket_id, "-o", "json"])
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    );
    assert_eq!(first_event["eventType"], "TICKET_CREATED");
    let shown = on_a_terminal(&mesh, &["watch", &ticket_id]);
    for needle in [
        "IMPLEMENTATION",
        "REFACTORING",
        "COMPLETED",
        "Implement: Add a greeting",
        "\x1b[",
    ] {
        assert!(shown.contains(needle), "{needle:?} missing from {shown:?}");
    }

    // Agents and the queue.
    let agents = json(&omoi(&mesh, &["agents", "-o", "json"]).unwrap());
    assert_eq!(agents["agents"].as_array().unwrap().len(), 2);
    assert_eq!(
        omoi(&mesh, &["agents", "--status", "healthy"]).unwrap().lines().count(),
        2
    );
    let agent_id = agents["agents"][0]["id"].as_str().unwrap();
    let one = json(&omoi(&mesh, &["agent", agent_id, "-o", "json"]).unwrap());
    assert_eq!(one["agent"]["id"], agent_id);
    assert!(omoi(&mesh, &["tickets"]).unwrap().contains(&ticket_id));
    let stats = omoi(&mesh, &["stats"]).unwrap();
    assert!(stats.contains("completed 4"), "{stats}");

    // What the agent of the first task did.
    let logs = omoi(&mesh, &["logs", first]).unwrap();
    assert!(logs.contains("writing PLAN.md"), "{logs}");
    let followed = omoi(&mesh, &["logs", "-f", first]).unwrap();
    assert_eq!(followed, logs, "a finished task's follow ends with its history");

    // Brakes.
    let paused = omoi(&mesh, &["pause", "--phase", "integration", "--reason", "flaky tests"]).unwrap();
    assert!(paused.contains("paused: phase INTEGRATION  flaky tests"), "{paused}");
    let stats = json(&omoi(&mesh, &["stats", "-o", "json"]).unwrap());
    assert_eq!(stats["pauses"][0]["phase"], "PHASE_INTEGRATION");
    let resumed = omoi(&mesh, &["resume", "--phase", "integration"]).unwrap();
    assert!(!resumed.contains("paused:"), "{resumed}");
    let limited = omoi(&mesh, &["limit", "repo-x", "2"]).unwrap();
    assert!(limited.contains("limit: 0 of \"repo-x\" out (cap 2)"), "{limited}");
    let stats = json(&omoi(&mesh, &["stats", "-o", "json"]).unwrap());
    assert_eq!(stats["limits"][0]["maxRunning"], 2);
    let cleared = omoi(&mesh, &["limit", "repo-x", "--clear"]).unwrap();
    assert!(!cleared.contains("limit:"), "{cleared}");

    // A ticket planned in a file; one of its tasks cancelled while the
    // queue holds everything back.
    omoi(&mesh, &["pause", "--reason", "planning"]).unwrap();
    let plan = std::env::temp_dir().join(format!("omoi-plan-{}.yaml", uuid::Uuid::now_v7()));
    std::fs::write(
        &plan,
        "- title: Sketch the parser\n  phase: initial\n\
         - title: Write the parser\n  phase: implementation\n  depends_on: [Sketch the parser]\n",
    )
    .unwrap();
    let created = omoi(&mesh, &["create", "Parse it", "--plan", plan.to_str().unwrap()]).unwrap();
    let planned = created.split_whitespace().nth(1).unwrap().to_owned();
    let tasks = json(&omoi(&mesh, &["tasks", "--ticket", &planned, "-o", "json"]).unwrap());
    let tasks = tasks["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    assert_eq!(tasks[1]["dependsOn"][0], tasks[0]["id"]);
    assert_eq!(tasks[1]["phase"], "PHASE_IMPLEMENTATION");
    let cancelled = omoi(&mesh, &["cancel", tasks[1]["id"].as_str().unwrap()]).unwrap();
    assert!(cancelled.contains("CANCELLED"), "{cancelled}");
    std::fs::write(&plan, "- title: Dream\n  phase: dreaming\n").unwrap();
    let refused = omoi(&mesh, &["create", "Never", "--plan", plan.to_str().unwrap()]).unwrap_err();
    assert!(refused.contains("\"dreaming\""), "{refused}");
    std::fs::remove_file(&plan).unwrap();
    omoi(&mesh, &["resume"]).unwrap();

    // Clear errors for what does not exist or does not parse.
    let missing = uuid::Uuid::now_v7().to_string();
    assert!(omoi(&mesh, &["retry", &missing]).unwrap_err().contains("not found"));
    assert!(
        omoi(&mesh, &["tasks", "--status", "sleeping"])
            .unwrap_err()
            .contains("\"sleeping\"")
    );
    assert!(omoi(&mesh, &["completions", "bash"]).unwrap().contains("omoi"));

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
