//! Each attempt in a Kubernetes pod of its own (`OMOI_AGENT_SANDBOX=pod`).
//!
//! The runner starts the agent as on a machine, but its command line is
//! this binary as the attempt's launcher (`omoi-executor --attempt-pod
//! <file>`): it creates the pod the executor described in the file (the
//! agent's command line, the launcher's own environment — the agent's —,
//! the attempt's workspace and home mounted from the workspaces' claim at
//! the paths they have here), relays the pod's log to its stdout and
//! stderr, ends with the agent's exit status, and deletes the pod when it
//! is stopped (and when it ends). The pod's first process is the sandbox
//! init: it bridges the loopback ports the agent's proxy settings name to
//! this executor's pod proxy listener, each connection opened with the
//! attempt's token, which leads it to that attempt's proxies. The pod
//! holds no credential: no service account token, no API key, no git or
//! mesh token; the chart's NetworkPolicy lets it reach this executor's
//! proxy port and nothing else.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::net::{TcpListener, UnixStream};
use uuid::Uuid;

use super::init;
use crate::config::PodArgs;

/// The flag that makes the executor's binary an attempt's launcher.
pub const FLAG: &str = "--attempt-pod";

/// The container variable the launcher hands the agent's stdin over in
/// (the init writes it to the agent and keeps it out of its environment).
pub const STDIN_ENV: &str = "OMOI_AGENT_STDIN";

/// The label every attempt's pod has, with the executor pod's uid.
const EXECUTOR_LABEL: &str = "omoi.dev/executor-pod";

/// How attempts' pods are made (from `OMOI_AGENT_POD_*`), checked at start.
#[derive(Debug, Clone)]
pub struct Pods {
    image: String,
    namespace: String,
    claim: String,
    owner_name: String,
    owner_uid: String,
    proxy: String,
    runtime_class: String,
    service_account: String,
    resources: Option<Value>,
    labels: Vec<(String, String)>,
    start_seconds: u64,
    root: PathBuf,
    api: Api,
    /// The uid and gid the pods run as: the executor's own, whose files
    /// the workspaces' volume holds.
    identity: (u32, u32),
}

/// The Kubernetes API as the launcher calls it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Api {
    pub url: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
}

/// What the launcher is given: the API, the pod, how long to wait.
#[derive(Debug, Serialize, Deserialize)]
pub struct Launch {
    pub api: Api,
    pub namespace: String,
    pub pod: Value,
    pub start_seconds: u64,
    pub grace_seconds: u64,
}

impl Pods {
    /// The settings, or what is wrong with them.
    pub fn from_args(args: &PodArgs, root: &Path) -> anyhow::Result<Self> {
        let required = |v: &Option<String>, setting: &str| -> anyhow::Result<String> {
            v.clone()
                .filter(|s| !s.trim().is_empty())
                .ok_or_else(|| anyhow::anyhow!("OMOI_AGENT_SANDBOX=pod needs {setting}"))
        };
        let image = required(&args.agent_pod_image, "OMOI_AGENT_POD_IMAGE")?;
        let claim = required(&args.agent_pod_workspace_claim, "OMOI_AGENT_POD_WORKSPACE_CLAIM")?;
        let owner_name = required(&args.agent_pod_owner_name, "OMOI_AGENT_POD_OWNER_NAME")?;
        let owner_uid = required(&args.agent_pod_owner_uid, "OMOI_AGENT_POD_OWNER_UID")?;
        let proxy_host = required(&args.agent_pod_proxy_host, "OMOI_AGENT_POD_PROXY_HOST")?;
        let namespace = match &args.agent_pod_namespace {
            Some(ns) if !ns.trim().is_empty() => ns.trim().to_owned(),
            _ => {
                let file = args.agent_pod_api_token_file.with_file_name("namespace");
                std::fs::read_to_string(&file)
                    .map(|s| s.trim().to_owned())
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "OMOI_AGENT_POD_NAMESPACE is not set and {} cannot be read: {e}",
                            file.display()
                        )
                    })?
            }
        };
        let url = match &args.agent_pod_api {
            Some(url) if !url.trim().is_empty() => url.trim().trim_end_matches('/').to_owned(),
            _ => match (
                std::env::var("KUBERNETES_SERVICE_HOST"),
                std::env::var("KUBERNETES_SERVICE_PORT"),
            ) {
                (Ok(host), Ok(port)) if host.contains(':') => format!("https://[{host}]:{port}"),
                (Ok(host), Ok(port)) => format!("https://{host}:{port}"),
                _ => anyhow::bail!(
                    "OMOI_AGENT_SANDBOX=pod: no Kubernetes API (OMOI_AGENT_POD_API, or KUBERNETES_SERVICE_HOST in a cluster)"
                ),
            },
        };
        anyhow::ensure!(
            url.starts_with("http://") || url.starts_with("https://"),
            "OMOI_AGENT_POD_API {url:?} is not an http(s) URL"
        );
        let resources = match args.agent_pod_resources.trim() {
            "" => None,
            text => {
                let v: Value = serde_json::from_str(text)
                    .map_err(|e| anyhow::anyhow!("OMOI_AGENT_POD_RESOURCES is not JSON: {e}"))?;
                anyhow::ensure!(
                    v.as_object()
                        .is_some_and(|o| o.keys().all(|k| k == "requests" || k == "limits")),
                    "OMOI_AGENT_POD_RESOURCES must be an object of requests and limits"
                );
                Some(v)
            }
        };
        anyhow::ensure!(
            root.is_absolute(),
            "OMOI_WORKSPACE_ROOT must be an absolute path for pods to mount it"
        );
        let port = args.agent_pod_proxy_addr.port();
        Ok(Self {
            image,
            namespace,
            claim,
            owner_name,
            owner_uid,
            proxy: if proxy_host.contains(':') {
                format!("[{proxy_host}]:{port}")
            } else {
                format!("{proxy_host}:{port}")
            },
            runtime_class: args.agent_pod_runtime_class.trim().to_owned(),
            service_account: args.agent_pod_service_account.trim().to_owned(),
            resources,
            labels: args
                .agent_pod_labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .collect(),
            start_seconds: args.agent_pod_start_seconds.max(1),
            root: root.to_path_buf(),
            api: Api {
                url,
                token_file: args.agent_pod_api_token_file.clone(),
                ca_file: args.agent_pod_api_ca_file.clone(),
            },
            identity: (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw()),
        })
    }

    /// The pod of one attempt: `argv` (its program as found) in `cwd`,
    /// `writable` (the workspace, the home) mounted from the claim, the
    /// proxies reached through `bridges`. The container's environment is
    /// the launcher's to fill in.
    pub fn manifest(&self, attempt: &AttemptPod<'_>) -> Value {
        let name = format!(
            "omoi-attempt-{}-{}-{}",
            &attempt.task_id.simple().to_string()[..12],
            attempt.attempt.max(0),
            &Uuid::new_v4().simple().to_string()[..6]
        );
        let mut labels = serde_json::Map::new();
        for (k, v) in &self.labels {
            labels.insert(k.clone(), json!(v));
        }
        labels.insert("app.kubernetes.io/name".into(), json!("omoi"));
        labels.insert("app.kubernetes.io/component".into(), json!("agent-attempt"));
        labels.insert("omoi.dev/task-id".into(), json!(attempt.task_id.to_string()));
        labels.insert("omoi.dev/attempt".into(), json!(attempt.attempt.to_string()));
        labels.insert(EXECUTOR_LABEL.into(), json!(self.owner_uid));
        let mut command = vec![
            "omoi-executor".to_owned(),
            init::FLAG.to_owned(),
            init::LINES_FLAG.to_owned(),
            "--stdin-env".to_owned(),
            STDIN_ENV.to_owned(),
        ];
        for b in attempt.bridges {
            command.extend(["--bridge".to_owned(), b.arg()]);
        }
        command.push("--".to_owned());
        command.extend(attempt.argv.iter().cloned());
        let mounts: Vec<Value> = attempt
            .writable
            .iter()
            .filter_map(|p| {
                let sub = p.strip_prefix(&self.root).ok()?;
                super::super::runners::plain(sub).then(|| {
                    json!({"name": "workspaces", "mountPath": p.display().to_string(), "subPath": sub.display().to_string()})
                })
            })
            .chain([json!({"name": "tmp", "mountPath": "/tmp"})])
            .collect();
        let (uid, gid) = self.identity;
        let mut container = json!({
            "name": "agent",
            "image": self.image,
            "imagePullPolicy": "IfNotPresent",
            "command": command,
            "workingDir": attempt.cwd.display().to_string(),
            "volumeMounts": mounts,
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "runAsNonRoot": true,
                "runAsUser": uid,
                "runAsGroup": gid,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}
            }
        });
        if let Some(r) = &self.resources {
            container["resources"] = r.clone();
        }
        let mut spec = json!({
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": attempt.grace.as_secs().max(1),
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": uid,
                "runAsGroup": gid,
                "fsGroup": gid,
                "seccompProfile": {"type": "RuntimeDefault"}
            },
            "containers": [container],
            "volumes": [
                {"name": "workspaces", "persistentVolumeClaim": {"claimName": self.claim}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}
            ]
        });
        if !self.runtime_class.is_empty() {
            spec["runtimeClassName"] = json!(self.runtime_class);
        }
        if !self.service_account.is_empty() {
            spec["serviceAccountName"] = json!(self.service_account);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": labels,
                "ownerReferences": [{
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": self.owner_name,
                    "uid": self.owner_uid,
                    "blockOwnerDeletion": false
                }]
            },
            "spec": spec
        })
    }

    /// Writes what the launcher of `pod` is given to `file`, readable by
    /// the executor's user alone (the pod's tokens are in it).
    pub fn write_launch(&self, file: &Path, pod: Value, grace: Duration) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let launch = Launch {
            api: self.api.clone(),
            namespace: self.namespace.clone(),
            pod,
            start_seconds: self.start_seconds,
            grace_seconds: grace.as_secs().max(1),
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(file)?;
        f.write_all(&serde_json::to_vec(&launch)?)
    }

    /// The address attempts' pods reach the proxies at.
    pub fn proxy(&self) -> &str {
        &self.proxy
    }

    /// Deletes the pods an earlier run of this executor left (its container
    /// restarted in the same pod: their launchers died with it).
    pub async fn sweep(&self) -> anyhow::Result<usize> {
        let kube = Kube::new(&self.api)?;
        let path = format!(
            "/api/v1/namespaces/{}/pods?labelSelector={EXECUTOR_LABEL}%3D{}",
            self.namespace, self.owner_uid
        );
        let (status, body) = kube.call(Method::GET, &path, None).await?;
        anyhow::ensure!(status.is_success(), "listing attempts' pods: {status} {body}");
        let list: Value = serde_json::from_str(&body)?;
        let mut swept = 0;
        for pod in list["items"].as_array().into_iter().flatten() {
            if let Some(name) = pod["metadata"]["name"].as_str() {
                kube.delete(&self.namespace, name, 0).await?;
                swept += 1;
            }
        }
        Ok(swept)
    }
}

/// One attempt's pod, as [`Pods::manifest`] makes it.
pub struct AttemptPod<'a> {
    pub task_id: Uuid,
    pub attempt: i32,
    pub argv: &'a [String],
    pub cwd: &'a Path,
    pub writable: &'a [PathBuf],
    pub bridges: &'a [init::Bridge],
    pub grace: Duration,
}

/// The executor's listener for its attempts' pods: each connection starts
/// with a token and a newline, the token names one attempt's proxy (its
/// unix socket), and the rest is spliced to it.
#[derive(Debug, Default)]
pub struct Tokens {
    sockets: Mutex<HashMap<String, PathBuf>>,
}

impl Tokens {
    /// A new token for `socket`, until [`Tokens::forget`].
    pub fn issue(&self, socket: PathBuf) -> String {
        let token = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
        self.lock().insert(token.clone(), socket);
        token
    }

    pub fn forget(&self, token: &str) {
        self.lock().remove(token);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PathBuf>> {
        self.sockets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `listener` for good.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((conn, peer)) = listener.accept().await else {
                continue;
            };
            let tokens = Arc::clone(&self);
            tokio::spawn(async move {
                if let Err(e) = tokens.relay(conn).await {
                    tracing::warn!(%peer, error = %e, "attempt pod's proxy connection refused");
                }
            });
        }
    }

    async fn relay(&self, conn: tokio::net::TcpStream) -> std::io::Result<()> {
        let mut conn = tokio::io::BufReader::new(conn);
        let mut token = String::new();
        {
            let mut head = (&mut conn).take(200);
            tokio::time::timeout(Duration::from_secs(10), head.read_line(&mut token))
                .await
                .map_err(|_| std::io::Error::other("no token within 10 s"))??;
        }
        let socket = self
            .lock()
            .get(token.trim_end())
            .cloned()
            .ok_or_else(|| std::io::Error::other("unknown token"))?;
        let mut proxy = UnixStream::connect(socket).await?;
        // What came after the token is already in the reader's buffer.
        let early = conn.buffer().to_vec();
        tokio::io::AsyncWriteExt::write_all(&mut proxy, &early).await?;
        let mut conn = conn.into_inner();
        tokio::io::copy_bidirectional(&mut conn, &mut proxy).await?;
        Ok(())
    }
}

/// A client of the Kubernetes API (bearer token, the cluster's CA).
struct Kube {
    base: String,
    token: String,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Kube {
    fn new(api: &Api) -> anyhow::Result<Self> {
        let token = std::fs::read_to_string(&api.token_file)
            .map_err(|e| anyhow::anyhow!("the API token {}: {e}", api.token_file.display()))?
            .trim()
            .to_owned();
        let mut roots = rustls::RootCertStore::empty();
        if api.url.starts_with("https://") {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            for cert in CertificateDer::pem_file_iter(&api.ca_file)
                .map_err(|e| anyhow::anyhow!("the API's CA {}: {e}", api.ca_file.display()))?
            {
                roots.add(cert?)?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
        let connector = builder.https_or_http().enable_http1().build();
        Ok(Self {
            base: api.url.clone(),
            token,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    fn request(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Request<Full<Bytes>>> {
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        Ok(Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(body))?)
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<(StatusCode, String)> {
        let res = self.client.request(self.request(method, path, body)?).await?;
        let status = res.status();
        let bytes = res.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }

    async fn delete(&self, namespace: &str, name: &str, grace: u64) -> anyhow::Result<()> {
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
        let body = json!({"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": grace});
        let (status, text) = self.call(Method::DELETE, &path, Some(&body)).await?;
        anyhow::ensure!(
            status.is_success() || status == StatusCode::NOT_FOUND,
            "deleting pod {name}: {status} {text}"
        );
        Ok(())
    }
}

/// How a pod stands, as far as the launcher cares.
enum Phase {
    Waiting,
    Running,
    /// The agent container's exit code.
    Ended(i32),
    /// It will never run (an image that cannot be pulled, a bad spec).
    Stuck(String),
}

fn phase_of(pod: &Value) -> Phase {
    let status = &pod["status"];
    let container = &status["containerStatuses"][0];
    if let Some(code) = container["state"]["terminated"]["exitCode"].as_i64() {
        return Phase::Ended(code as i32);
    }
    if let Some(reason) = container["state"]["waiting"]["reason"].as_str()
        && matches!(
            reason,
            "ErrImagePull"
                | "ImagePullBackOff"
                | "InvalidImageName"
                | "CreateContainerConfigError"
                | "CreateContainerError"
        )
    {
        let message = container["state"]["waiting"]["message"].as_str().unwrap_or_default();
        return Phase::Stuck(format!("{reason}: {message}"));
    }
    match status["phase"].as_str() {
        Some("Running") => Phase::Running,
        // Ended with no container status: evicted, or past its deadline.
        Some("Failed") | Some("Succeeded") => Phase::Stuck(format!(
            "the pod ended ({}): {}",
            status["reason"].as_str().unwrap_or("no reason given"),
            status["message"].as_str().unwrap_or_default()
        )),
        _ => Phase::Waiting,
    }
}

/// The launcher: runs the pod described in the file `args` names, with
/// this process's environment and stdin as the agent's, to its end.
pub fn main(args: impl Iterator<Item = std::ffi::OsString>) -> ExitCode {
    let Some(file) = args.into_iter().next() else {
        return fail("usage: --attempt-pod <file>");
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    match runtime {
        Ok(rt) => rt.block_on(launch(PathBuf::from(file))),
        Err(e) => fail(&format!("cannot start: {e}")),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("omoi attempt pod: {message}");
    ExitCode::from(125)
}

async fn launch(file: PathBuf) -> ExitCode {
    let launch: Launch = match std::fs::read(&file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(l) => l,
        Err(e) => return fail(&format!("{}: {e}", file.display())),
    };
    let kube = match Kube::new(&launch.api) {
        Ok(k) => k,
        Err(e) => return fail(&e.to_string()),
    };
    // The agent's stdin (the runner writes it and closes it) and
    // environment, as this process has them.
    let stdin = tokio::task::spawn_blocking(|| {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text);
        text
    })
    .await
    .unwrap_or_default();
    let mut pod = launch.pod;
    let mut env: Vec<Value> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .filter(|(k, _)| k != STDIN_ENV)
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    env.push(json!({"name": STDIN_ENV, "value": stdin}));
    pod["spec"]["containers"][0]["env"] = Value::Array(env);
    let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let ns = launch.namespace.clone();
    // Caught from before the pod exists, so that a stop never leaves one.
    let mut stop = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot handle SIGTERM: {e}")),
    };
    let pods = format!("/api/v1/namespaces/{ns}/pods");
    match kube.call(Method::POST, &pods, Some(&pod)).await {
        Ok((s, _)) if s.is_success() => {}
        Ok((s, body)) => return fail(&format!("cannot create pod {name}: {s} {body}")),
        Err(e) => return fail(&format!("cannot create pod {name}: {e}")),
    }
    eprintln!("omoi attempt pod: created pod {name} in namespace {ns}");
    let code = tokio::select! {
        code = follow(&kube, &ns, &name, launch.start_seconds) => {
            // Done with: its workspace is on the volume, its log relayed.
            if let Err(e) = kube.delete(&ns, &name, 0).await {
                eprintln!("omoi attempt pod: {e}");
            }
            code
        }
        _ = stop.recv() => {
            // Stopped: the pod's agent gets its own SIGTERM and grace.
            if let Err(e) = kube.delete(&ns, &name, launch.grace_seconds).await {
                eprintln!("omoi attempt pod: {e}");
            }
            143
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// Waits for the pod to start, relays its log, and answers the agent's
/// exit code (125 when it never ran).
async fn follow(kube: &Kube, ns: &str, name: &str, start_seconds: u64) -> i32 {
    let path = format!("/api/v1/namespaces/{ns}/pods/{name}");
    let get = || async {
        let (status, body) = kube.call(Method::GET, &path, None).await?;
        anyhow::ensure!(status.is_success(), "{status} {body}");
        Ok::<_, anyhow::Error>(phase_of(&serde_json::from_str(&body)?))
    };
    let deadline = Instant::now() + Duration::from_secs(start_seconds);
    loop {
        match get().await {
            Ok(Phase::Running) | Ok(Phase::Ended(_)) => break,
            Ok(Phase::Stuck(why)) => {
                eprintln!("omoi attempt pod: pod {name} cannot run: {why}");
                return 125;
            }
            Ok(Phase::Waiting) | Err(_) if Instant::now() < deadline => {}
            Ok(Phase::Waiting) => {
                eprintln!("omoi attempt pod: pod {name} did not start within {start_seconds} s");
                return 125;
            }
            Err(e) => {
                eprintln!("omoi attempt pod: pod {name}: {e}");
                return 125;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Err(e) = relay_log(kube, &format!("{path}/log?container=agent&follow=true")).await {
        eprintln!("omoi attempt pod: the log of pod {name} broke off: {e}");
    }
    // The log ends with the container (or broke off: then the agent runs
    // on unwatched); its status follows. The API may be away for a while.
    let mut unanswered = 0;
    loop {
        match get().await {
            Ok(Phase::Ended(code)) => return code,
            Ok(Phase::Stuck(why)) => {
                eprintln!("omoi attempt pod: pod {name} ended without its agent's status: {why}");
                return 125;
            }
            Ok(_) => unanswered = 0,
            Err(e) => {
                unanswered += 1;
                if unanswered == 120 {
                    eprintln!("omoi attempt pod: pod {name}: {e}");
                    return 125;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Copies the log's lines: the agent's stdout (marked by the init, in
/// base64) to stdout as the bytes it wrote, everything else to stderr.
async fn relay_log(kube: &Kube, path: &str) -> anyhow::Result<()> {
    let res = kube.client.request(kube.request(Method::GET, path, None)?).await?;
    anyhow::ensure!(res.status().is_success(), "{}", res.status());
    let mut body = res.into_body();
    let mut pending: Vec<u8> = Vec::new();
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let mut write = |line: &[u8]| {
        use base64::Engine;
        let piece = line
            .strip_prefix(init::STDOUT_MARK.as_bytes())
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok());
        match piece {
            Some(bytes) => {
                let _ = out.write_all(&bytes);
                let _ = out.flush();
            }
            None => {
                let _ = writeln!(err, "{}", String::from_utf8_lossy(line));
            }
        }
    };
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            write(&line[..line.len() - 1]);
        }
    }
    if !pending.is_empty() {
        write(&pending);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_phase_reads_its_agent_containers_state() {
        let ended =
            json!({"status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 3}}}]}});
        assert!(matches!(phase_of(&ended), Phase::Ended(3)));
        let pulling = json!({"status": {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}]}});
        assert!(matches!(phase_of(&pulling), Phase::Waiting));
        let bad = json!({"status": {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "ErrImagePull", "message": "no such image"}}}]}});
        assert!(matches!(phase_of(&bad), Phase::Stuck(m) if m.contains("no such image")));
        let evicted = json!({"status": {"phase": "Failed", "reason": "Evicted"}});
        assert!(matches!(phase_of(&evicted), Phase::Stuck(m) if m.contains("Evicted")));
        assert!(matches!(
            phase_of(&json!({"status": {"phase": "Running"}})),
            Phase::Running
        ));
    }
}
