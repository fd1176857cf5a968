//! The Helm chart's pods, run here: render the chart with Helm's SDK, start
//! each service's real binary with exactly the command and environment its
//! Deployment sets (cluster addresses rewritten to loopback), check the gRPC
//! probes the chart declares, and put a ticket through.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use omoi_proto::ticket::{self as pb, ticket_service_client::TicketServiceClient};
use omoi_runtime::grpc::Connector;
use omoi_runtime::tls::TlsArgs;
use omoi_tests::pki::Pki;
use omoi_tests::process::{Service, binary, free_port};
use omoi_tests::{Infra, eventually, file_ticket, ticket_client, wait_ticket};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
/// The uid the downward API gives a pod here.
const POD_UID: &str = "5c5d8e1a-2f7b-4c1e-9a33-6d1f0e7b2c44";

/// How the chart is installed for a run of its pods.
#[derive(Default)]
struct Variant<'a> {
    /// `tls.enabled`, with this PKI's files as the Secret's.
    tls: Option<&'a Pki>,
    /// `nats.auth.credsSecret`, NATS in operator mode.
    nats_creds: bool,
    /// `executor.podPerAttempt`, against a stand-in Kubernetes API.
    pod_per_attempt: bool,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The Python that has helm-python-sdk (tests/run.sh and .ci/run set it up).
fn helm_python() -> PathBuf {
    omoi_tests::tools_python()
}

fn render(overrides: &Value) -> Vec<Value> {
    let out = std::env::temp_dir().join(format!("omoi-render-{}.json", uuid::Uuid::new_v4().simple()));
    let status = std::process::Command::new(helm_python())
        .arg(workspace_root().join("deploy/k8s/check.py"))
        .arg("render-json")
        .arg(&out)
        .arg("--set-json")
        .arg(overrides.to_string())
        .status()
        .expect("python runs");
    assert!(status.success(), "rendering the chart failed");
    let docs: Vec<Value> = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(out);
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

struct Pod {
    command: Vec<String>,
    env: Vec<(String, String)>,
    /// (readiness port, liveness port, liveness service); None for a Job.
    probes: Option<(u16, u16, String)>,
}

/// A container as the kubelet would run it, with cluster addresses mapped
/// to local ports (`ports`: in-cluster port -> local port; the pod's other
/// ports get their own) and mounted files to local ones (`files`).
fn pod(docs: &[Value], workload: &Value, ports: &HashMap<u64, u16>, files: &HashMap<String, String>) -> Pod {
    let container = &workload["spec"]["template"]["spec"]["containers"][0];
    let mut ports = ports.clone();
    for p in container["ports"].as_array().into_iter().flatten() {
        ports
            .entry(p["containerPort"].as_u64().unwrap())
            .or_insert_with(free_port);
    }
    let rewrite = |v: &str| -> String {
        let mut out = v.to_owned();
        for (cluster, local) in &ports {
            for scheme in ["http", "https"] {
                if let Some(rest) = v.strip_prefix(&format!("{scheme}://"))
                    && rest.ends_with(&format!(".svc:{cluster}"))
                {
                    out = format!("{scheme}://127.0.0.1:{local}");
                }
            }
            if v == format!("0.0.0.0:{cluster}") {
                out = format!("127.0.0.1:{local}");
            }
        }
        // Any other listener (metrics) gets a port of its own here.
        if out == v && v.starts_with("0.0.0.0:") {
            out = format!("127.0.0.1:{}", free_port());
        }
        if let Some(local) = files.get(v) {
            out = local.clone();
        }
        out
    };
    let mut env: Vec<(String, String)> = Vec::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let cm = find(docs, "ConfigMap", from["configMapRef"]["name"].as_str().unwrap());
        for (k, v) in cm["data"].as_object().into_iter().flatten() {
            env.push((k.clone(), v.as_str().unwrap().to_owned()));
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_owned();
        if let Some(v) = e["value"].as_str() {
            env.push((name, rewrite(v)));
        } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            // The downward API, as for a pod of this workload.
            let value = match field {
                "metadata.name" => format!("{}-0", workload["metadata"]["name"].as_str().unwrap()),
                "metadata.uid" => POD_UID.to_owned(),
                "status.podIP" => "127.0.0.1".to_owned(),
                other => panic!("no downward API value for {other}"),
            };
            env.push((name, value));
        } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
            let secret = find(docs, "Secret", r["name"].as_str().unwrap());
            match secret["stringData"][r["key"].as_str().unwrap()].as_str() {
                Some(v) => env.push((name, v.to_owned())),
                None => assert_eq!(r.get("optional"), Some(&json!(true)), "secret key {name} missing"),
            }
        }
    }
    // The image's PATH, with the binaries where the image has them.
    let bins = binary("omoi").parent().unwrap().display().to_string();
    env.push((
        "PATH".into(),
        format!("{bins}:{}", std::env::var("PATH").unwrap_or_default()),
    ));
    let command: Vec<String> = container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let port = |probe: &str| container[probe]["grpc"]["port"].as_u64().map(|p| ports[&p]);
    let probes = match (port("readinessProbe"), port("livenessProbe")) {
        (Some(r), Some(l)) => Some((
            r,
            l,
            container["livenessProbe"]["grpc"]["service"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        )),
        _ => None,
    };
    Pod { command, env, probes }
}

async fn probe(port: u16, service: &str) -> bool {
    omoi_tests::health_status(&format!("http://127.0.0.1:{port}"), service).await
        == Ok(tonic_health::ServingStatus::Serving)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_pods_serve_and_run_a_ticket() {
    run_the_charts_pods(Variant::default()).await;
}

/// `executor.podPerAttempt`: the executor's pod, as the chart sets it up,
/// runs each attempt in a pod of its own through the (stand-in) API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_executor_runs_each_attempt_in_a_pod_of_its_own() {
    run_the_charts_pods(Variant {
        pod_per_attempt: true,
        ..Default::default()
    })
    .await;
}

/// `nats.auth.credsSecret`: a NATS in operator (JWT) mode, each pod with
/// its own user's credentials file where the chart mounts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_pods_run_a_ticket_on_nats_credentials_files() {
    run_the_charts_pods(Variant {
        nats_creds: true,
        ..Default::default()
    })
    .await;
}

/// `tls.enabled`: mTLS between the pods, probes on their plaintext port, the
/// Secret's files where the chart mounts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_pods_run_a_ticket_over_mtls() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    pki.leaf("tls", &ca);
    run_the_charts_pods(Variant {
        tls: Some(&pki),
        ..Default::default()
    })
    .await;
}

async fn run_the_charts_pods(variant: Variant<'_>) {
    let (tls, nats_creds) = (variant.tls, variant.nats_creds);
    let mut infra = Infra::new().await.unwrap();
    let machines_nats = infra.nats_url.clone();
    let creds_dir = std::env::temp_dir().join(format!("omoi-creds-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&creds_dir).unwrap();
    // Operator mode: a NATS of its own that knows no one without a user JWT.
    let mut files = HashMap::new();
    let private_nats = match nats_creds {
        false => None,
        true => {
            let operator = omoi_tests::nats_jwt::Operator::new();
            let permissions = omoi_bus::auth::executor_permissions(&infra.topology, &infra.sessions_bucket());
            for (file, limits) in [("services", None), ("executor", Some(&permissions))] {
                let local = operator.user(&creds_dir, file, limits);
                files.insert(format!("/etc/omoi/nats/{file}.creds"), local.display().to_string());
            }
            let nats = omoi_tests::process::PrivateNats::start_with_config(&operator.server_config)
                .await
                .unwrap();
            infra.nats_url = nats.url();
            Some(nats)
        }
    };
    let docs = render(&json!({
        "database": {"url": infra.db.url},
        "nats": {"url": infra.nats_url, "auth": {"credsSecret": if nats_creds { "omoi-nats-creds" } else { "" }}},
        "config": {
            "subjectPrefix": infra.topology.prefix,
            "eventsStream": infra.topology.stream,
            "rustLog": "warn",
            "timeoutCheckIntervalSeconds": 1,
        },
        "executor": {
            "replicas": 1,
            "command": "omoi-demo-agent",
            "podPerAttempt": {"enabled": variant.pod_per_attempt},
            "workspace": {"type": if variant.pod_per_attempt { "pvc" } else { "emptyDir" }},
        },
        "tls": {"enabled": tls.is_some(), "secretName": "omoi-tls"},
    }));
    let ports: HashMap<u64, u16> = [50051u64, 50052, 50053, 50054]
        .into_iter()
        .map(|p| (p, free_port()))
        .collect();
    let workspaces = std::env::temp_dir().join(format!("omoi-pods-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&workspaces).unwrap();
    files.insert("/workspaces".to_string(), workspaces.display().to_string());
    // The cluster's API and the executor's mounted service account token.
    let sa = std::env::temp_dir().join(format!("omoi-sa-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), "chart-executor-token").unwrap();
    let kube = match variant.pod_per_attempt {
        true => Some(
            omoi_tests::kube::Kube::start("chart-executor-token", workspaces.clone())
                .await
                .unwrap(),
        ),
        false => None,
    };
    if let Some(pki) = tls {
        for (mounted, local) in [("tls.crt", "tls.pem"), ("tls.key", "tls.key"), ("ca.crt", "ca.pem")] {
            files.insert(
                format!("/etc/omoi/tls/{mounted}"),
                pki.path(local).display().to_string(),
            );
        }
    }

    // The pre-install hook first: the migration Job.
    let job = pod(&docs, find(&docs, "Job", "omoi-migrate"), &ports, &files);
    let out = std::process::Command::new(binary(
        Path::new(&job.command[0]).file_name().unwrap().to_str().unwrap(),
    ))
    .args(&job.command[1..])
    .env_clear()
    .envs(job.env.iter().map(|(k, v)| (k, v)))
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "migration job: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut running = Vec::new();
    for component in ["task-queue", "health", "ticket", "executor"] {
        let workload = find(&docs, "Deployment", &format!("omoi-{component}"));
        if nats_creds {
            // Each pod gets its own user's file and no other.
            let own = if component == "executor" {
                "executor.creds"
            } else {
                "services.creds"
            };
            let volumes = workload["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
            let creds = volumes.iter().find(|v| v["name"] == "nats-creds").unwrap();
            assert_eq!(
                creds["secret"]["items"],
                json!([{"key": own, "path": own}]),
                "{component}"
            );
        }
        let p = pod(&docs, workload, &ports, &files);
        let bin = Path::new(&p.command[0])
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(p.command.len(), 1, "{component}: no arguments expected");
        let (ready_port, live_port, live_service) = p.probes.clone().expect("gRPC probes declared");
        let mut env = p.env.clone();
        if let (true, Some(kube)) = (component == "executor", &kube) {
            env.push(("OMOI_AGENT_POD_API".into(), kube.url.clone()));
            env.push((
                "OMOI_AGENT_POD_API_TOKEN_FILE".into(),
                sa.join("token").display().to_string(),
            ));
        }
        let svc = Service::spawn(&bin, ready_port, &env).unwrap();
        eventually(WAIT, &format!("{component} ready on its readiness probe"), || async {
            probe(ready_port, "").await.then_some(())
        })
        .await;
        assert!(probe(live_port, &live_service).await, "{component} liveness probe");
        running.push((component, svc));
    }

    let tickets = match tls {
        Some(pki) => {
            // A client of the mesh's own CA (here: with the pods' certificate).
            let client = TlsArgs {
                tls_cert: Some(pki.path("tls.pem")),
                tls_key: Some(pki.path("tls.key")),
                tls_ca: Some(pki.path("ca.pem")),
            };
            let connector = Connector::new(None, &client).unwrap();
            let url = format!("https://127.0.0.1:{}", ports[&50051]);
            // Plaintext is refused on the API port.
            assert!(
                ticket_client(&format!("http://127.0.0.1:{}", ports[&50051]))
                    .list_tickets(pb::ListTicketsRequest::default())
                    .await
                    .is_err()
            );
            TicketServiceClient::new(connector.channel(&url).unwrap())
        }
        None => ticket_client(&format!("http://127.0.0.1:{}", ports[&50051])),
    };
    let created = file_ticket(
        &tickets,
        pb::CreateTicketRequest {
            title: "from the chart".into(),
            ..Default::default()
        },
    )
    .await;
    let id = created.ticket.unwrap().id;
    wait_ticket(&tickets, &id, omoi_proto::common::TicketStatus::Completed as i32).await;
    if let Some(kube) = &kube {
        // A pod per phase, each the chart's image on its claim, all gone.
        let created = kube.seen(|s| s.created.clone());
        assert_eq!(created.len(), 4, "{created:#?}");
        for pod in &created {
            assert_eq!(pod["spec"]["containers"][0]["image"], json!("omoi-executor:0.1.0"));
            assert_eq!(pod["spec"]["serviceAccountName"], json!("omoi-agent"));
            assert_eq!(
                pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
                json!("omoi-workspaces")
            );
            assert_eq!(pod["metadata"]["labels"]["app.kubernetes.io/instance"], json!("omoi"));
        }
        assert!(kube.pods().is_empty(), "{:?}", kube.pods());
    }

    // The console's pod: its HTTP probe, and the ticket read through it (over
    // the mesh's TLS when the chart turns it on).
    let console = pod(&docs, find(&docs, "Deployment", "omoi-console"), &ports, &files);
    let listen = console
        .env
        .iter()
        .find(|(k, _)| k == "OMOI_LISTEN_ADDR")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert!(
        console.env.iter().all(|(k, _)| k != "DATABASE_URL" && k != "NATS_URL"),
        "the console gets no database or broker credentials"
    );
    let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let console_svc = Service::spawn("omoi-console", port, &console.env).unwrap();
    let probe_path = find(&docs, "Deployment", "omoi-console")["spec"]["template"]["spec"]["containers"][0]
        ["readinessProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let base = format!("http://{listen}");
    eventually(WAIT, "console ready on its readiness probe", || async {
        let (status, _, _) = omoi_tests::http::send("GET", &format!("{base}{probe_path}"), None, &[])
            .await
            .ok()?;
        (status == 200).then_some(())
    })
    .await;
    let (status, _, body) = omoi_tests::http::send("GET", &format!("{base}/v1/tickets/{id}"), None, &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("TICKET_STATUS_COMPLETED"), "{body}");
    let status = console_svc.terminate(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(0), "console exit");

    // SIGTERM, as the kubelet sends it: each exits cleanly within its grace period.
    for (component, svc) in running.into_iter().rev() {
        let grace = find(&docs, "Deployment", &format!("omoi-{component}"))["spec"]["template"]["spec"]
            ["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap();
        let status = svc.terminate(Duration::from_secs(grace)).await.unwrap();
        assert_eq!(status.code(), Some(0), "{component} exit");
    }
    let _ = std::fs::remove_dir_all(&workspaces);
    let _ = std::fs::remove_dir_all(&creds_dir);
    let _ = std::fs::remove_dir_all(&sa);
    drop(private_nats);
    infra.nats_url = machines_nats;
    infra.cleanup().await.unwrap();
}
