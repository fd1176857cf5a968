//! omoi-console's HTTP/JSON API against a real mesh: routes from the protos'
//! annotations, bodies in the proto3 JSON mapping, gRPC statuses as HTTP
//! statuses with google.rpc.Status bodies, the bearer token, and a server
//! stream as Server-Sent Events resumed from Last-Event-ID.

use omoi_tests::console::Console;
use omoi_tests::{Infra, Mesh};
use serde_json::{Value, json};

async fn start(mesh: &Mesh, token: Option<&str>) -> Console {
    Console::start(&mesh.ticket.url, &mesh.task_queue.url, &mesh.health.url, token).await
}

/// One request; the status, the content type and the body.
async fn send(method: &str, url: &str, body: Option<Value>, headers: &[(&str, &str)]) -> (u16, String, String) {
    omoi_tests::http::send(method, url, body.map(|b| b.to_string()), headers)
        .await
        .unwrap()
}

/// Checks the document with openapi-spec-validator (pinned in
/// .ci/requirements.txt; tests/run.sh installs it with the chart tools).
fn assert_valid_openapi(doc: &Value) {
    let python = omoi_tests::tools_python();
    let file = std::env::temp_dir().join(format!("omoi-openapi-{}.json", uuid::Uuid::now_v7()));
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = std::process::Command::new(&python)
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}; run the tests with `bash tests/run.sh`", python.display()));
    std::fs::remove_file(&file).unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn call(method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let (status, kind, text) = send(method, url, body, &[]).await;
    assert_eq!(kind, "application/json", "{status} {text}");
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_speaks_json_over_http_as_the_annotations_say() {
    let infra = Infra::new().await.unwrap();
    let mesh = Mesh::start(&infra, |_| {}).await.unwrap();
    let console = start(&mesh, None).await;
    let api = |path: &str| format!("{}{path}", console.url);

    let (status, created) = call(
        "POST",
        &api("/v1/tickets"),
        Some(json!({"title": "Greet people", "priority": "TICKET_PRIORITY_HIGH"})),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let id = created["ticket"]["id"].as_str().unwrap().to_owned();
    assert_eq!(created["tasks"].as_array().unwrap().len(), 4);
    assert_eq!(created["ticket"]["priority"], "TICKET_PRIORITY_HIGH");

    let (status, got) = call("GET", &api(&format!("/v1/tickets/{id}")), None).await;
    assert_eq!((status, got["ticket"]["title"].as_str()), (200, Some("Greet people")));
    let (_, listed) = call("GET", &api("/v1/tickets?page_size=5"), None).await;
    assert_eq!(listed["tickets"][0]["id"], id.as_str());
    let (_, tasks) = call(
        "GET",
        &api(&format!("/v1/tasks?ticket_id={id}&phase=PHASE_INITIAL")),
        None,
    )
    .await;
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 1, "{tasks}");
    let task_id = tasks["tasks"][0]["id"].as_str().unwrap().to_owned();
    let (status, task) = call("GET", &api(&format!("/v1/tasks/{task_id}")), None).await;
    assert_eq!(
        (status, task["task"]["title"].as_str()),
        (200, Some("Set up: Greet people"))
    );

    let (status, paused) = call("POST", &api("/v1/queue:pause"), Some(json!({"reason": "lunch"}))).await;
    assert_eq!((status, paused["pause"]["reason"].as_str()), (200, Some("lunch")));
    let (_, stats) = call("GET", &api("/v1/queue/stats"), None).await;
    assert_eq!(stats["pauses"][0]["reason"], "lunch");
    assert_eq!(stats["pending"], "4", "int64 as a string, as the JSON mapping says");
    let (status, _) = call("POST", &api("/v1/queue:resume"), Some(json!({}))).await;
    assert_eq!(status, 200);
    let (status, limit) = call("PUT", &api("/v1/queue/limits/repo-a"), Some(json!({"maxRunning": 2}))).await;
    assert_eq!((status, limit["limit"]["key"].as_str()), (200, Some("repo-a")));
    let (status, agents) = call("GET", &api("/v1/agents"), None).await;
    assert_eq!((status, agents["agents"].as_array().map(Vec::len)), (200, Some(0)));

    let (status, cancelled) = call(
        "POST",
        &api(&format!("/v1/tickets/{id}:cancel")),
        Some(json!({"reason": "not now"})),
    )
    .await;
    assert_eq!(
        (status, cancelled["ticket"]["status"].as_str()),
        (200, Some("TICKET_STATUS_CANCELLED"))
    );

    // gRPC statuses as HTTP statuses, google.rpc.Status bodies.
    let (status, refused) = call("GET", &api("/v1/tickets/not-a-uuid"), None).await;
    assert_eq!((status, refused["code"].as_i64()), (400, Some(3)));
    assert!(refused["message"].as_str().unwrap().contains("ticket_id"), "{refused}");
    let missing = uuid::Uuid::now_v7();
    let (status, refused) = call("GET", &api(&format!("/v1/tickets/{missing}")), None).await;
    assert_eq!((status, refused["code"].as_i64()), (404, Some(5)));
    let (status, refused) = call("POST", &api("/v1/tickets"), Some(json!({"title": 7}))).await;
    assert_eq!((status, refused["code"].as_i64()), (400, Some(3)));
    let (status, refused) = call("GET", &api(&format!("/v1/tickets/{id}:retry")), None).await;
    assert_eq!(status, 405, "{refused}");
    let (status, _) = call("GET", &api("/v1/nowhere"), None).await;
    assert_eq!(status, 404);
    let (status, refused) = call("GET", &api("/v1/tasks?colour=red"), None).await;
    assert!(
        status == 400 && refused["message"].as_str().unwrap().contains("colour"),
        "{refused}"
    );

    // The ticket's events as Server-Sent Events: the history, then the end
    // (it is cancelled); resumed after the first, the first is not sent again.
    let watch = api(&format!("/v1/tickets/{id}:watch"));
    let (status, kind, stream) = send("GET", &watch, None, &[]).await;
    assert_eq!((status, kind.as_str()), (200, "text/event-stream"), "{stream}");
    let ids: Vec<&str> = stream.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
    assert!(ids.len() >= 6, "{stream}");
    assert!(
        stream.contains("TICKET_CREATED") && stream.contains("TICKET_CANCELLED"),
        "{stream}"
    );
    let (_, _, resumed) = send("GET", &watch, None, &[("last-event-id", ids[0])]).await;
    let again: Vec<&str> = resumed.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
    assert_eq!(again, ids[1..], "resumed after the first");
    // The document of it all, generated from the protos.
    let (status, doc) = call("GET", &api("/openapi.json"), None).await;
    assert_eq!((status, doc["openapi"].as_str()), (200, Some("3.0.3")));
    for stream in [
        "/v1/tickets/{ticket_id}:watch",
        "/v1/tickets:watch",
        "/v1/agents:watch",
        "/v1/queue/stats:watch",
    ] {
        assert!(doc["paths"][stream]["get"].is_object(), "{stream}: {doc}");
    }
    let (status, kind, page) = send("GET", &api("/docs"), None, &[]).await;
    assert!(status == 200 && kind.starts_with("text/html") && page.contains("/v1/queue:pause"));
    assert_valid_openapi(&doc);

    // The web console: every page's URL answers with the page, its assets
    // are built in; a browser on another site cannot change anything.
    for page in ["/", &format!("/tickets/{id}"), "/agents", "/queue"] {
        let (status, kind, html) = send("GET", &api(page), None, &[]).await;
        assert!(
            status == 200 && kind.starts_with("text/html") && html.contains("/assets/app.js"),
            "{page}: {status} {kind}"
        );
    }
    let (status, kind, script) = send("GET", &api("/assets/app.js"), None, &[]).await;
    assert!(
        status == 200 && kind.starts_with("text/javascript") && script.contains("/v1/tickets"),
        "{status} {kind}"
    );
    let (status, kind, _) = send("GET", &api("/assets/app.css"), None, &[]).await;
    assert!(status == 200 && kind.starts_with("text/css"), "{status} {kind}");
    let host = console.url.trim_start_matches("http://").to_owned();
    let pause = Some(json!({"reason": "from elsewhere"}));
    for headers in [
        vec![("origin", "https://evil.example")],
        vec![("sec-fetch-site", "cross-site")],
        vec![("sec-fetch-site", "same-site"), ("origin", "http://other.localhost")],
    ] {
        let (status, _, text) = send("POST", &api("/v1/queue:pause"), pause.clone(), &headers).await;
        assert!(
            status == 403 && text.contains("may not change anything"),
            "{headers:?}: {status} {text}"
        );
    }
    let (_, stats) = call("GET", &api("/v1/queue/stats"), None).await;
    assert!(
        stats["pauses"].as_array().unwrap().is_empty(),
        "nothing paused: {stats}"
    );
    let origin = format!("http://{host}");
    let own = [("origin", origin.as_str()), ("sec-fetch-site", "same-origin")];
    let (status, _, text) = send("POST", &api("/v1/queue:pause"), pause, &own).await;
    assert_eq!(status, 200, "the console's own page may: {text}");
    let (status, _, text) = send("POST", &api("/v1/queue:resume"), Some(json!({})), &own).await;
    assert_eq!(status, 200, "{text}");
    console.stop().await;

    // With a token, the console asks for it as the services do.
    let guarded = start(&mesh, Some("s3cret")).await;
    let stats = format!("{}/v1/queue/stats", guarded.url);
    let (status, _, text) = send("GET", &stats, None, &[]).await;
    assert_eq!(status, 401, "{text}");
    let (status, _, _) = send("GET", &stats, None, &[("authorization", "Bearer wrong")]).await;
    assert_eq!(status, 401);
    let (status, _, _) = send("GET", &stats, None, &[("authorization", "Bearer s3cret")]).await;
    assert_eq!(status, 200);
    let (status, _, _) = send("GET", &format!("{}/v1/nowhere", guarded.url), None, &[]).await;
    assert_eq!(status, 401, "not even which paths exist");
    guarded.stop().await;

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
