//! W3C trace context across the mesh: every service exports spans over OTLP
//! to a collector inside this test, and one trace, started by the client's
//! `traceparent`, links CreateTicket → EnqueueTasks → dispatch → the
//! executor's run → StartTask / CompleteTask → the ticket's status change,
//! through gRPC metadata, assignments and NATS headers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use omoi_proto::ticket::{self as pb};
use omoi_tests::mesh::{Options, ProcessMesh};
use omoi_tests::{Infra, wait_ticket};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Seen {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
}

/// The OTLP trace service, keeping every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Seen>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Seen {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Collector {
    fn trace(&self, trace_id: &str) -> Vec<Seen> {
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }
}

/// The spans of `trace` named `name` exported by `service`.
fn named<'a>(trace: &'a [Seen], service: &str, name: &str) -> Vec<&'a Seen> {
    trace
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect()
}

fn ids(spans: &[&Seen]) -> Vec<String> {
    spans.iter().map(|s| s.span_id.clone()).collect()
}

/// Every span in `children` has its parent among `parents`.
fn parented(what: &str, children: &[&Seen], parents: &[&Seen]) {
    assert!(!children.is_empty(), "no {what} spans");
    let parents = ids(parents);
    for c in children {
        assert!(
            parents.contains(&c.parent),
            "{what}: {c:?} has a parent outside {parents:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_ticket_through_every_service() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let infra = Infra::new().await.unwrap();
    let options = Options {
        executors: 1,
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
        ..Options::default()
    };
    let mesh = ProcessMesh::start(&infra, options).await.unwrap();

    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let client_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(pb::CreateTicketRequest {
        title: "traced".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01").parse().unwrap(),
    );
    let created = mesh.tickets().create_ticket(request).await.unwrap().into_inner();
    let ticket_id = created.ticket.unwrap().id;
    let tasks = created.tasks.len();
    wait_ticket(
        &mesh.tickets(),
        &ticket_id,
        omoi_proto::common::TicketStatus::Completed as i32,
    )
    .await;

    // Spans are exported in batches, each process on its own clock: wait
    // for the last link of the chain in each (an executor's run span ends
    // after its CompleteTask and the ticket's status change).
    let status_span = "omoi-ticket-status TASK_COMPLETED";
    let complete_name = "/omoi.taskqueue.v1.TaskQueueService/CompleteTask";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let trace = loop {
        let trace = collector.trace(&trace_id);
        if named(&trace, "omoi-ticket", status_span).len() == tasks
            && named(&trace, "omoi-task-queue", complete_name).len() == tasks
            && named(&trace, "omoi-executor", "run").len() == tasks
        {
            break trace;
        }
        if tokio::time::Instant::now() > deadline {
            let all = collector.spans.lock().unwrap().clone();
            let summary: Vec<String> = all
                .iter()
                .map(|s| format!("{} {} {} {}<-{}", s.service, s.name, s.trace_id, s.span_id, s.parent))
                .collect();
            panic!(
                "trace {trace_id} incomplete; {} spans seen:\n{}",
                all.len(),
                summary.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let create = named(&trace, "omoi-ticket", "/omoi.ticket.v1.TicketService/CreateTicket");
    assert_eq!(create.len(), 1, "{trace:#?}");
    assert_eq!(
        create[0].parent, client_span,
        "CreateTicket continues the caller's trace"
    );
    let enqueue = named(
        &trace,
        "omoi-task-queue",
        "/omoi.taskqueue.v1.TaskQueueService/EnqueueTasks",
    );
    parented("EnqueueTasks", &enqueue, &create);
    let dispatch = named(&trace, "omoi-task-queue", "dispatch");
    assert_eq!(dispatch.len(), tasks, "one dispatch per task");
    parented("dispatch", &dispatch, &enqueue);
    let run = named(&trace, "omoi-executor", "run");
    assert_eq!(run.len(), tasks, "one run per task");
    parented("run", &run, &dispatch);
    parented(
        "StartTask",
        &named(
            &trace,
            "omoi-task-queue",
            "/omoi.taskqueue.v1.TaskQueueService/StartTask",
        ),
        &run,
    );
    let complete = named(&trace, "omoi-task-queue", complete_name);
    parented("CompleteTask", &complete, &run);
    // The ticket service heard of each completion through NATS, in the
    // trace of the CompleteTask that caused it.
    parented("ticket status", &named(&trace, "omoi-ticket", status_span), &complete);

    // And the events on the stream say so in their headers, up to the
    // ticket's own TICKET_COMPLETED.
    let nats = async_nats::connect(&infra.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let stream = js.get_stream(&infra.topology.stream).await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut messages = consumer.fetch().max_messages(1000).messages().await.unwrap();
    let mut by_type: HashMap<String, Vec<String>> = HashMap::new();
    while let Some(Ok(m)) = messages.next().await {
        let headers = m.headers.clone().unwrap_or_default();
        let kind = headers
            .get("Omoi-Event-Type")
            .map(|v| v.to_string())
            .unwrap_or_default();
        let tp = headers.get("traceparent").map(|v| v.to_string()).unwrap_or_default();
        by_type.entry(kind).or_default().push(tp);
    }
    for kind in [
        "TICKET_CREATED",
        "TASK_CREATED",
        "TASK_ASSIGNED",
        "TASK_COMPLETED",
        "TICKET_COMPLETED",
    ] {
        let tps = by_type
            .get(kind)
            .unwrap_or_else(|| panic!("no {kind} events: {by_type:?}"));
        for tp in tps {
            assert!(
                tp.contains(&trace_id),
                "{kind} carries traceparent {tp:?}, not trace {trace_id}"
            );
        }
    }

    mesh.stop().await.unwrap();
    server.abort();
    infra.cleanup().await.unwrap();
}
