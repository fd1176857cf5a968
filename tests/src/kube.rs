//! A stand-in of the Kubernetes API for an executor that runs each attempt
//! in a pod of its own: it answers the calls the executor and its launcher
//! make (create, read, follow the log of, delete and list pods), checks
//! their bearer token, keeps every pod it was given, and plays the kubelet
//! by running the pod's one container here — its command, environment and
//! working directory as the pod says, its volume mounts checked to be the
//! paths the claim holds here — with stdout and stderr as the pod's log.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

type Body = BoxBody<Bytes, Infallible>;

/// One pod: what it was created as, its log so far, how it ended.
struct Pod {
    manifest: Value,
    log: Arc<Mutex<Vec<u8>>>,
    /// Bumped as the log grows and when the container ends.
    changed: watch::Sender<u64>,
    exit: Arc<Mutex<Option<i32>>>,
    pid: Option<i32>,
}

/// What the stand-in saw.
#[derive(Default)]
pub struct Seen {
    /// Every pod created, as it was sent.
    pub created: Vec<Value>,
    /// The names of the pods deleted, with the grace period asked for.
    pub deleted: Vec<(String, u64)>,
    /// Requests refused for their token.
    pub unauthorized: usize,
}

struct State {
    token: String,
    /// Where the workspaces' claim is mounted here (the executor's root).
    claim_root: PathBuf,
    pods: Mutex<HashMap<String, Pod>>,
    seen: Mutex<Seen>,
}

pub struct Kube {
    pub url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
    _loopback: tokio::sync::OwnedMutexGuard<()>,
}

/// Held by each stand-in while it lives: the pods it runs share this
/// machine's loopback, where their init listens on the proxies' fixed
/// ports (a real pod has a network of its own), so one stand-in at a time.
static LOOPBACK: std::sync::LazyLock<Arc<tokio::sync::Mutex<()>>> = std::sync::LazyLock::new(Arc::default);

impl Drop for Kube {
    fn drop(&mut self) {
        self.task.abort();
        for pod in self.state.pods.lock().unwrap().values() {
            if let Some(pid) = pod.pid {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            }
        }
    }
}

impl Kube {
    /// A stand-in answering `token`, whose pods' claim is `claim_root` here.
    pub async fn start(token: &str, claim_root: PathBuf) -> anyhow::Result<Self> {
        let loopback = Arc::clone(&LOOPBACK).lock_owned().await;
        let state = Arc::new(State {
            token: token.to_owned(),
            claim_root,
            pods: Mutex::default(),
            seen: Mutex::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let s = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let s = Arc::clone(&s);
                        async move { Ok::<_, Infallible>(handle(&s, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            url,
            state,
            task,
            _loopback: loopback,
        })
    }

    /// What it saw so far.
    pub fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.state.seen.lock().unwrap())
    }

    /// The pods that exist now, by name.
    pub fn pods(&self) -> Vec<String> {
        self.state.pods.lock().unwrap().keys().cloned().collect()
    }

    /// Puts a pod in as if created earlier (its container never started).
    pub fn preload(&self, manifest: Value) {
        let name = manifest["metadata"]["name"].as_str().unwrap().to_owned();
        let (changed, _) = watch::channel(0);
        self.state.pods.lock().unwrap().insert(
            name,
            Pod {
                manifest,
                log: Arc::default(),
                changed,
                exit: Arc::default(),
                pid: None,
            },
        );
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status_error(status: StatusCode, message: &str) -> Response<Body> {
    reply(
        status,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": status.as_u16()}),
    )
}

async fn handle(s: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", s.token));
    if !authorized {
        s.seen.lock().unwrap().unauthorized += 1;
        return status_error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    match (method, parts.as_slice()) {
        (Method::POST, ["api", "v1", "namespaces", ns, "pods"]) => {
            let Ok(manifest) = serde_json::from_slice::<Value>(&body) else {
                return status_error(StatusCode::BAD_REQUEST, "not JSON");
            };
            create(s, ns, manifest)
        }
        (Method::GET, ["api", "v1", "namespaces", _, "pods"]) => {
            let selector = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("labelSelector="))
                .map(|v| v.replace("%3D", "="))
                .unwrap_or_default();
            let (key, value) = selector.split_once('=').unwrap_or(("", ""));
            let pods = s.pods.lock().unwrap();
            let items: Vec<Value> = pods
                .values()
                .filter(|p| key.is_empty() || p.manifest["metadata"]["labels"][key] == value)
                .map(|p| p.manifest.clone())
                .collect();
            reply(
                StatusCode::OK,
                json!({"kind": "PodList", "apiVersion": "v1", "items": items}),
            )
        }
        (Method::GET, ["api", "v1", "namespaces", _, "pods", name]) => {
            let pods = s.pods.lock().unwrap();
            match pods.get(*name) {
                Some(p) => reply(StatusCode::OK, with_status(p)),
                None => status_error(StatusCode::NOT_FOUND, "pod not found"),
            }
        }
        (Method::GET, ["api", "v1", "namespaces", _, "pods", name, "log"]) => {
            let pods = s.pods.lock().unwrap();
            match pods.get(*name) {
                Some(p) => follow(p),
                None => status_error(StatusCode::NOT_FOUND, "pod not found"),
            }
        }
        (Method::DELETE, ["api", "v1", "namespaces", _, "pods", name]) => {
            let grace = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|b| b["gracePeriodSeconds"].as_u64())
                .unwrap_or(30);
            let Some(pod) = s.pods.lock().unwrap().remove(*name) else {
                return status_error(StatusCode::NOT_FOUND, "pod not found");
            };
            s.seen.lock().unwrap().deleted.push((name.to_string(), grace));
            if let Some(pid) = pod.pid.filter(|_| pod.exit.lock().unwrap().is_none()) {
                // As the kubelet: SIGTERM, the grace period, SIGKILL.
                let pgid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::SIGTERM);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(grace)).await;
                    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::SIGKILL);
                });
            }
            reply(StatusCode::OK, pod.manifest)
        }
        _ => status_error(StatusCode::NOT_FOUND, "not a path this stand-in serves"),
    }
}

/// The pod with a status as the kubelet would report it.
fn with_status(p: &Pod) -> Value {
    let mut v = p.manifest.clone();
    let state = match *p.exit.lock().unwrap() {
        Some(code) => {
            json!({"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }}})
        }
        None if p.pid.is_some() => json!({"running": {"startedAt": "2026-01-01T00:00:00Z"}}),
        None => json!({"waiting": {"reason": "ContainerCreating"}}),
    };
    let phase = match *p.exit.lock().unwrap() {
        Some(0) => "Succeeded",
        Some(_) => "Failed",
        None if p.pid.is_some() => "Running",
        None => "Pending",
    };
    v["status"] = json!({"phase": phase, "containerStatuses": [{"name": "agent", "state": state}]});
    v
}

/// The log from its start, then as it grows, until the container ended.
fn follow(p: &Pod) -> Response<Body> {
    let (log, exit, mut changed) = (Arc::clone(&p.log), Arc::clone(&p.exit), p.changed.subscribe());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    tokio::spawn(async move {
        let mut sent = 0;
        loop {
            let ended = exit.lock().unwrap().is_some();
            let chunk = log.lock().unwrap()[sent..].to_vec();
            if !chunk.is_empty() {
                sent += chunk.len();
                if tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.is_err() {
                    return;
                }
            }
            if ended {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), changed.changed()).await;
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

/// Checks the pod as an API server would, then runs its container here.
fn create(s: &Arc<State>, ns: &str, manifest: Value) -> Response<Body> {
    s.seen.lock().unwrap().created.push(manifest.clone());
    let name = manifest["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    if name.is_empty() || manifest["metadata"]["namespace"] != ns {
        return status_error(StatusCode::UNPROCESSABLE_ENTITY, "name and namespace required");
    }
    if s.pods.lock().unwrap().contains_key(&name) {
        return status_error(StatusCode::CONFLICT, "pod exists");
    }
    let spec = &manifest["spec"];
    let container = &spec["containers"][0];
    let claim = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "workspaces")
        .and_then(|v| v["persistentVolumeClaim"]["claimName"].as_str());
    if claim.is_none() {
        return status_error(StatusCode::UNPROCESSABLE_ENTITY, "no workspaces claim");
    }
    // Mounted where the claim's files are here: the container sees what
    // the executor wrote there.
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        if m["name"] == "workspaces" {
            let here = s.claim_root.join(m["subPath"].as_str().unwrap_or_default());
            if m["mountPath"].as_str() != Some(here.to_str().unwrap()) {
                return status_error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &format!("mount {m} is not the claim's path here"),
                );
            }
        }
    }
    let command: Vec<String> = container["command"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    let Some(program) = command.first() else {
        return status_error(StatusCode::UNPROCESSABLE_ENTITY, "no command");
    };
    // The image's binary is this build's.
    let program = crate::process::binary(program.rsplit('/').next().unwrap_or(program));
    let mut child = tokio::process::Command::new(program);
    child
        .args(&command[1..])
        .env_clear()
        .current_dir(container["workingDir"].as_str().unwrap_or("/"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for e in container["env"].as_array().into_iter().flatten() {
        if let (Some(k), Some(v)) = (e["name"].as_str(), e["value"].as_str()) {
            child.env(k, v);
        }
    }
    let mut child = match child.spawn() {
        Ok(c) => c,
        Err(e) => return status_error(StatusCode::UNPROCESSABLE_ENTITY, &format!("cannot start: {e}")),
    };
    let (changed, _) = watch::channel(0u64);
    let pod = Pod {
        manifest: manifest.clone(),
        log: Arc::default(),
        changed: changed.clone(),
        exit: Arc::default(),
        pid: child.id().map(|p| p as i32),
    };
    let (log, exit) = (Arc::clone(&pod.log), Arc::clone(&pod.exit));
    let pumps: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    .map(|mut stream| {
        let (log, changed) = (Arc::clone(&log), changed.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                log.lock().unwrap().extend_from_slice(&buf[..n]);
                changed.send_modify(|n| *n += 1);
            }
        })
    })
    .collect();
    tokio::spawn(async move {
        let status = child.wait().await;
        for p in pumps {
            let _ = p.await;
        }
        let code = status
            .ok()
            .map(|s| {
                use std::os::unix::process::ExitStatusExt;
                s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
            })
            .unwrap_or(128);
        *exit.lock().unwrap() = Some(code);
        changed.send_modify(|n| *n += 1);
    });
    s.pods.lock().unwrap().insert(name, pod);
    reply(StatusCode::CREATED, manifest)
}
