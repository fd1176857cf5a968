//! What every omoi server offers besides its API: health that follows its
//! dependencies, reflection v1 and v1alpha, bearer-token auth, size limits.

use std::time::Duration;

use futures::StreamExt;
use omoi_proto::taskqueue::{self as pb};
use omoi_tests::process::PrivateNats;
use omoi_tests::{InProcess, Infra, client, eventually};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const WAIT: Duration = Duration::from_secs(30);

async fn health(url: &str, service: &str) -> i32 {
    let mut h = HealthClient::new(omoi_tests::channel(url));
    h.check(HealthCheckRequest {
        service: service.to_owned(),
    })
    .await
    .map(|r| r.into_inner().status)
    .unwrap_or(-1)
}

/// A task-queue served at once, not waiting until it is SERVING (as
/// `InProcess` does): its URL, its stop and its end.
async fn serve_unready(
    config: omoi_task_queue::Config,
) -> (
    String,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let incoming = omoi_runtime::grpc::incoming(listener);
    let server = tokio::spawn(omoi_task_queue::serve(config, incoming, shutdown.clone()));
    (url, shutdown, server)
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_the_services() {
    let infra = Infra::new().await.unwrap();
    let tq = InProcess::start(infra.task_queue_config()).await.unwrap();
    let channel = omoi_tests::channel(&tq.url);

    use tonic_reflection::pb::v1 as r1;
    let mut c1 = r1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut resp = c1
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(msg)) = resp.next().await else {
        panic!("no reflection answer")
    };
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected answer")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["omoi.taskqueue.v1.TaskQueueService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    // Only what this server serves is listed.
    assert!(!names.iter().any(|n| n.starts_with("omoi.ticket")), "{names:?}");

    use tonic_reflection::pb::v1alpha as ra;
    let mut ca = ra::server_reflection_client::ServerReflectionClient::new(channel);
    let req = ra::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(ra::server_reflection_request::MessageRequest::FileContainingSymbol(
            "omoi.taskqueue.v1.TaskQueueService".into(),
        )),
    };
    let mut resp = ca
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(msg)) = resp.next().await else {
        panic!("no v1alpha answer")
    };
    match msg.message_response {
        Some(ra::server_reflection_response::MessageResponse::FileDescriptorResponse(fd)) => {
            assert!(!fd.file_descriptor_proto.is_empty())
        }
        other => panic!("unexpected v1alpha answer {other:?}"),
    }
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test]
async fn with_a_token_every_rpc_needs_it_but_health_and_nothing_is_done_without() {
    let infra = Infra::new().await.unwrap();
    let mut config = infra.task_queue_config();
    config.common.host.auth_token = Some("s3cret-token".into());
    let tq = InProcess::start(config).await.unwrap();
    assert_eq!(
        health(&tq.url, "omoi.taskqueue.v1.TaskQueueService").await,
        ServingStatus::Serving as i32
    );

    let req = || pb::EnqueueTasksRequest {
        tasks: vec![pb::NewTask {
            title: "t".into(),
            phase: 1,
            ..Default::default()
        }],
    };
    let mut anonymous = client(&tq.url);
    let err = anonymous.enqueue_tasks(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = anonymous
        .get_queue_stats(pb::GetQueueStatsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut wrong = tonic::Request::new(req());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer s3cret-tokem".parse().unwrap());
    assert_eq!(
        anonymous.enqueue_tasks(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let pool = infra.db.connect().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "a refused request wrote nothing");

    let mut right = tonic::Request::new(req());
    right
        .metadata_mut()
        .insert("authorization", "Bearer s3cret-token".parse().unwrap());
    assert_eq!(
        anonymous.enqueue_tasks(right).await.unwrap().into_inner().tasks.len(),
        1
    );
    pool.close().await;
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_server_stays_up() {
    let infra = Infra::new().await.unwrap();
    let mut config = infra.task_queue_config();
    config.common.host.max_message_bytes = 64 * 1024;
    let tq = InProcess::start(config).await.unwrap();
    let mut c = tq.client();
    let big = pb::EnqueueTasksRequest {
        tasks: vec![pb::NewTask {
            title: "big".into(),
            description: "x".repeat(100 * 1024),
            phase: 1,
            ..Default::default()
        }],
    };
    let err = c.enqueue_tasks(big).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{err:?}"
    );
    assert!(c.get_queue_stats(pb::GetQueueStatsRequest {}).await.is_ok());
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_until_nats_is_reachable_then_serving() {
    let mut nats = PrivateNats::start().await.unwrap();
    nats.stop().await.unwrap();
    let mut infra = Infra::new().await.unwrap();
    infra.nats_url = nats.url();
    let (url, shutdown, server) = serve_unready(infra.task_queue_config()).await;
    eventually(WAIT, "NOT_SERVING reported", || async {
        (health(&url, "").await == ServingStatus::NotServing as i32).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        health(&url, "omoi.taskqueue.v1.TaskQueueService").await,
        ServingStatus::NotServing as i32
    );
    // Liveness stays SERVING: an outage must not get the pod restarted.
    assert_eq!(health(&url, "liveness").await, ServingStatus::Serving as i32);
    nats.restart().await.unwrap();
    eventually(WAIT, "SERVING once NATS is up", || async {
        (health(&url, "omoi.taskqueue.v1.TaskQueueService").await == ServingStatus::Serving as i32).then_some(())
    })
    .await;
    shutdown.cancel();
    server.await.unwrap().unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_before_the_schema_is_migrated_are_unavailable_never_internal() {
    let infra = Infra::new().await.unwrap();
    // A table in the way of the first migration: it fails until the table
    // goes, and the service keeps retrying it meanwhile.
    let pool = infra.db.connect().await.unwrap();
    sqlx::query("CREATE TABLE tasks (x int)").execute(&pool).await.unwrap();
    let (url, shutdown, server) = serve_unready(infra.task_queue_config()).await;
    let mut c = client(&url);
    let refused = eventually(WAIT, "the server answering", || {
        let mut c = c.clone();
        async move {
            match c.get_queue_stats(pb::GetQueueStatsRequest {}).await {
                Err(s) if s.code() == Code::Unavailable && s.message().contains("not migrated") => Some(s),
                Err(s) if s.code() == Code::Unavailable => None,
                other => panic!("before its migration the service answered {other:?}"),
            }
        }
    })
    .await;
    assert!(refused.message().contains("omoi-task-queue"), "{refused:?}");
    let enqueue = c
        .enqueue_tasks(pb::EnqueueTasksRequest {
            tasks: vec![pb::NewTask {
                title: "early".into(),
                phase: omoi_proto::common::Phase::Initial.into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(enqueue.code(), Code::Unavailable, "{enqueue:?}");
    sqlx::query("DROP TABLE tasks").execute(&pool).await.unwrap();
    eventually(WAIT, "served once migrated", || {
        let mut c = c.clone();
        async move { c.get_queue_stats(pb::GetQueueStatsRequest {}).await.ok() }
    })
    .await;
    let listed = c
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.tasks.is_empty(), "the refused enqueue wrote nothing: {listed:?}");
    pool.close().await;
    shutdown.cancel();
    server.await.unwrap().unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_streams_keep_what_they_are_told_and_a_changed_retention_is_applied() {
    let infra = Infra::new().await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(&infra.nats_url).await.unwrap());
    let mut topology = infra.topology.clone();
    topology.events_max_age = Duration::from_secs(3600);
    topology.output_max_age = Duration::from_secs(600);
    let mut events = omoi_bus::ensure_stream(&js, &topology).await.unwrap();
    let mut output = omoi_bus::ensure_output_stream(&js, &topology).await.unwrap();
    assert_eq!(events.info().await.unwrap().config.max_age, Duration::from_secs(3600));
    assert_eq!(output.info().await.unwrap().config.max_age, Duration::from_secs(600));
    // A restart with another retention changes the existing streams.
    topology.events_max_age = Duration::from_secs(7200);
    topology.output_max_age = Duration::from_secs(1200);
    let mut events = omoi_bus::ensure_stream(&js, &topology).await.unwrap();
    let mut output = omoi_bus::ensure_output_stream(&js, &topology).await.unwrap();
    let info = events.info().await.unwrap().config.clone();
    assert_eq!(info.max_age, Duration::from_secs(7200));
    assert_eq!(info.duplicate_window, Duration::from_secs(120), "the rest as it was");
    let info = output.info().await.unwrap().config.clone();
    assert_eq!(info.max_age, Duration::from_secs(1200));
    assert_eq!(info.max_messages_per_subject, 10_000, "the rest as it was");
    infra.cleanup().await.unwrap();
}

/// A batch consumer hands its handler what arrives within its gather
/// window as one batch, also when events come one at a time: the first
/// pull of the stream ends with what is pending when it comes (under a
/// trickle, a single event), and the gather goes on with a pull that waits
/// out the time left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_consumer_gathers_a_trickle_of_events_into_few_batches() {
    use omoi_domain::event::{Event as Domain, TaskStarted};
    use prost::Message as _;
    use std::sync::{Arc, Mutex};

    const EVENTS: usize = 60;
    let infra = Infra::new().await.unwrap();
    let client = async_nats::connect(&infra.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    omoi_bus::ensure_stream(&js, &infra.topology).await.unwrap();
    let batches = Arc::new(Mutex::new(Vec::<usize>::new()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let consumer = tokio::spawn(omoi_bus::consumer::consume_batches(
        client.clone(),
        infra.topology.clone(),
        "gathers".to_owned(),
        infra.topology.event_filter(omoi_domain::EventType::TaskStarted),
        shutdown.clone(),
        {
            let batches = Arc::clone(&batches);
            move |batch| {
                batches.lock().unwrap().push(batch.len());
                async { Ok(()) }
            }
        },
    ));
    // One event every 2 ms: each is alone on the stream when it comes.
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    for _ in 0..EVENTS {
        tick.tick().await;
        let task = uuid::Uuid::now_v7();
        let started = Domain::TaskStarted(TaskStarted {
            attempt: 1,
            agent_id: None,
        });
        let event = omoi_proto::events::Event {
            id: uuid::Uuid::now_v7().to_string(),
            event_type: "TASK_STARTED".into(),
            entity_type: "task".into(),
            entity_id: task.to_string(),
            ticket_id: String::new(),
            occurred_at: None,
            payload: Some(omoi_proto::convert::json_to_struct(&started.payload())),
        };
        let subject = infra.topology.event_subject("task", "TASK_STARTED", None);
        js.publish(subject, event.encode_to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    eventually(WAIT, "every event handled", || async {
        (batches.lock().unwrap().iter().sum::<usize>() == EVENTS).then_some(())
    })
    .await;
    shutdown.cancel();
    consumer.await.unwrap();
    let batches = batches.lock().unwrap().clone();
    // 120 ms of events in 50 ms gathers: three or four batches, a few more
    // on a loaded machine; one per event if each pull ended the gather.
    assert!(batches.len() <= EVENTS / 6, "{} batches: {batches:?}", batches.len());
    infra.cleanup().await.unwrap();
}
