//! Each attempt in a Kubernetes pod of its own (`OMOI_AGENT_SANDBOX=pod`),
//! against a stand-in of the Kubernetes API that plays the kubelet here:
//! the executor's pods carry the agent and nothing of the executor's (no
//! token, no mesh address), mount only the attempt's workspace and home,
//! reach the network through the executor's proxies alone, relay their
//! log live, land their work, are deleted when they end or are stopped,
//! are swept when an executor restarts, and are valid pods by the
//! Kubernetes schema, strictly.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use omoi_proto::ticket as pb;
use omoi_tests::kube::Kube;
use omoi_tests::process::free_port;
use omoi_tests::{Infra, eventually, file_ticket, wait_ticket};
use serde_json::{Value, json};

use super::sandbox::{bare_mesh, host, one_task, one_task_on_a_repository, port_of, tempdir};

const CANCELLED: i32 = 5;
const TOKEN: &str = "stand-in-service-account-token";
const OWNER_UID: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

/// Runs kubernetes-validate --strict on `pods` (the chart's own check).
fn validate(pods: &[Value]) {
    let dir = tempdir("pods");
    let files: Vec<String> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let f = dir.join(format!("pod-{i}.yaml"));
            std::fs::write(&f, p.to_string()).unwrap();
            f.display().to_string()
        })
        .collect();
    let validator = omoi_tests::tools_python().with_file_name("kubernetes-validate");
    let out = std::process::Command::new(validator)
        .args(["--strict", "--quiet"])
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_attempt_runs_in_a_pod_of_its_own_and_holds_nothing_of_the_executors() {
    let infra = Infra::new().await.unwrap();
    let mut mesh = bare_mesh(&infra).await;
    let (allowed, outside) = (host().await, host().await);
    let kube = Kube::start(TOKEN, mesh.workspace_root.clone()).await.unwrap();
    // A pod an earlier run of this executor left: swept at its start.
    kube.preload(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "omoi-attempt-left-over", "namespace": "agents",
                     "labels": {"omoi.dev/executor-pod": OWNER_UID}},
        "spec": {"containers": [{"name": "agent", "image": "omoi-executor:test"}]}
    }));
    let secrets = tempdir("sa");
    let token_file = secrets.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();

    // The agent: its stdin, the proxies, a line on stderr, a file, and
    // (when told to) a long sleep to be stopped in.
    let scripts = tempdir("pod-agent");
    let script = scripts.join("agent.sh");
    std::fs::write(
        &script,
        format!(
            r#"input=$(cat); first=${{input%%$'\n'*}}
via() {{ curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 --noproxy '' -x http://127.0.0.1:13128 "$@"; }}
case "$input" in *"sleep a while"*) echo "sleeping" >&2; sleep 600;; esac
r="stdin=$([ -n "$first" ] && echo yes || echo no) allowed=$(via http://127.0.0.1:{allowed}/) outside=$(via http://localhost:{outside}/)"
r="$r secrets=$(env | grep -c -E 'OMOI_AUTH_TOKEN|NATS_URL|DATABASE_URL|OMOI_GIT_TOKEN|KUBERNETES')"
r="$r home=$([ "$HOME" = "$PWD.home" ] && echo own || echo "$HOME")"
echo "a line on stderr" >&2
echo proof > proof.txt
echo "$r"
"#,
            allowed = port_of(&allowed.url),
            outside = port_of(&outside.url),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let env: Vec<(String, String)> = [
        ("OMOI_RUNNER_COMMAND", format!("bash {}", script.display())),
        ("OMOI_RUNNER_ENV_ALLOW", "PATH".into()),
        ("OMOI_AGENT_SANDBOX", "pod".into()),
        ("OMOI_AGENT_ALLOWED_HOSTS", "127.0.0.1".into()),
        ("OMOI_AGENT_POD_IMAGE", "registry.example.com/omoi-executor:test".into()),
        ("OMOI_AGENT_POD_NAMESPACE", "agents".into()),
        ("OMOI_AGENT_POD_WORKSPACE_CLAIM", "omoi-workspaces".into()),
        ("OMOI_AGENT_POD_OWNER_NAME", "omoi-executor-7d9f8-abcde".into()),
        ("OMOI_AGENT_POD_OWNER_UID", OWNER_UID.into()),
        ("OMOI_AGENT_POD_PROXY_HOST", "127.0.0.1".into()),
        ("OMOI_AGENT_POD_PROXY_ADDR", format!("127.0.0.1:{}", free_port())),
        ("OMOI_AGENT_POD_RUNTIME_CLASS", "gvisor".into()),
        ("OMOI_AGENT_POD_LABELS", "app.kubernetes.io/instance=omoi".into()),
        (
            "OMOI_AGENT_POD_RESOURCES",
            r#"{"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}"#.into(),
        ),
        ("OMOI_AGENT_POD_API", kube.url.clone()),
        ("OMOI_AGENT_POD_API_TOKEN_FILE", token_file.display().to_string()),
        ("OMOI_KILL_GRACE_SECONDS", "2".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    mesh.add_executor(&infra, &env).await.unwrap();
    assert!(
        kube.seen(|s| s.deleted.iter().any(|(n, _)| n == "omoi-attempt-left-over")),
        "the left-over pod is swept at start"
    );

    // A ticket on a repository: the agent's pod, then git's, land a commit.
    let tickets = mesh.tickets();
    let (done, bare, branch) = one_task_on_a_repository(&mesh, "in a pod").await;
    let result = omoi_proto::convert::struct_to_json(done.tasks[0].result.as_ref().unwrap());
    assert_eq!(
        result["summary"].as_str().unwrap(),
        "stdin=yes allowed=200 outside=403 secrets=0 home=own"
    );
    let landed = omoi_tests::repo::git(&bare, &["show", &format!("{branch}:proof.txt")]);
    assert_eq!(landed.trim(), "proof");
    let output = omoi_tests::task_output(&mesh.task_queue.url, &done.tasks[0].id).await;
    assert!(output.iter().any(|l| l == "a line on stderr"), "{output:#?}");
    assert!(
        output.iter().any(|l| l.contains("created pod omoi-attempt-")),
        "{output:#?}"
    );

    // What the executor asked for: the agent's pod and git's, each the
    // executor's image with its init first, the attempt's mounts alone,
    // nothing of the executor's in its environment; all deleted.
    let created: Vec<Value> = kube.seen(|s| s.created.clone());
    assert!(created.len() >= 2, "the agent's pod and git's: {created:#?}");
    let agent = &created[0];
    let container = &agent["spec"]["containers"][0];
    let command: Vec<&str> = container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(command[..3], ["omoi-executor", "--sandbox-init", "--lines"]);
    // The agent's command line, its program as found in the image.
    assert_eq!(command[command.len() - 1], script.display().to_string());
    assert!(command[command.len() - 2].ends_with("/bash"), "{command:?}");
    assert_eq!(agent["spec"]["automountServiceAccountToken"], json!(false));
    assert_eq!(agent["spec"]["runtimeClassName"], json!("gvisor"));
    assert_eq!(agent["metadata"]["namespace"], json!("agents"));
    assert_eq!(agent["metadata"]["labels"]["app.kubernetes.io/instance"], json!("omoi"));
    assert_eq!(agent["metadata"]["labels"]["omoi.dev/executor-pod"], json!(OWNER_UID));
    assert_eq!(
        agent["metadata"]["ownerReferences"][0]["name"],
        json!("omoi-executor-7d9f8-abcde")
    );
    assert_eq!(container["resources"]["limits"]["memory"], json!("4Gi"));
    let ws = result["workspace"].as_str().unwrap();
    let mounts: HashSet<String> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        mounts,
        HashSet::from([ws.to_owned(), format!("{ws}.home"), "/tmp".to_owned()])
    );
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"HTTPS_PROXY") && env.contains(&"OMOI_TASK_PROMPT"),
        "{env:?}"
    );
    for secret in ["OMOI_AUTH_TOKEN", "NATS_URL", "DATABASE_URL", "OMOI_GIT_TOKEN"] {
        assert!(!env.contains(&secret), "{secret} in {env:?}");
    }
    let deleted: HashSet<String> = kube.seen(|s| s.deleted.iter().map(|(n, _)| n.clone()).collect());
    for pod in &created {
        assert!(deleted.contains(pod["metadata"]["name"].as_str().unwrap()), "{pod:#}");
    }
    assert_eq!(kube.seen(|s| s.unauthorized), 0);
    validate(&created);

    // Stopped: its launcher deletes its pod, with the executor's grace.
    let before = kube.seen(|s| s.created.len());
    let created = file_ticket(&tickets, one_task("sleep a while")).await;
    let ticket_id = created.ticket.unwrap().id;
    let pod = eventually(Duration::from_secs(60), "the sleeper's pod", || async {
        kube.seen(|s| s.created.get(before).cloned())
    })
    .await;
    let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
    tickets
        .clone()
        .cancel_ticket(pb::CancelTicketRequest {
            ticket_id: ticket_id.clone(),
            reason: "enough".into(),
        })
        .await
        .unwrap();
    let grace = eventually(Duration::from_secs(30), "the sleeper's pod deleted", || async {
        kube.seen(|s| s.deleted.iter().find(|(n, _)| *n == name).map(|(_, g)| *g))
    })
    .await;
    assert_eq!(grace, 2);
    wait_ticket(&tickets, &ticket_id, CANCELLED).await;
    assert!(kube.pods().is_empty(), "{:?}", kube.pods());

    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
    drop(kube);
    let _ = std::fs::remove_dir_all(secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_told_to_use_pods_says_what_it_lacks() {
    let (status, said) = super::sandbox::executor_refusing(&[("OMOI_AGENT_SANDBOX", "pod")]).await;
    assert!(!status.success());
    assert!(
        said.contains("OMOI_AGENT_SANDBOX=pod needs OMOI_AGENT_POD_IMAGE"),
        "{said}"
    );
    // The API refusing it: said at start, not at the first attempt.
    let kube = Kube::start(TOKEN, std::env::temp_dir()).await.unwrap();
    let wrong = tempdir("sa").join("token");
    std::fs::write(&wrong, "not-the-token").unwrap();
    let (status, said) = super::sandbox::executor_refusing(&[
        ("OMOI_AGENT_SANDBOX", "pod"),
        ("OMOI_AGENT_POD_IMAGE", "omoi-executor:test"),
        ("OMOI_AGENT_POD_NAMESPACE", "agents"),
        ("OMOI_AGENT_POD_WORKSPACE_CLAIM", "omoi-workspaces"),
        ("OMOI_AGENT_POD_OWNER_NAME", "omoi-executor-0"),
        ("OMOI_AGENT_POD_OWNER_UID", OWNER_UID),
        ("OMOI_AGENT_POD_PROXY_HOST", "127.0.0.1"),
        ("OMOI_AGENT_POD_PROXY_ADDR", &format!("127.0.0.1:{}", free_port())),
        ("OMOI_AGENT_POD_API", &kube.url),
        ("OMOI_AGENT_POD_API_TOKEN_FILE", wrong.to_str().unwrap()),
    ])
    .await;
    assert!(!status.success());
    assert!(
        said.contains("cannot list this executor's attempt pods") && said.contains("401"),
        "{said}"
    );
}
