//! The bearer token across the mesh: every service refuses calls without
//! it (and does nothing), and the services and an executor present it to
//! each other so that a ticket still runs through.

use std::time::Duration;

use omoi_proto::executor::{self as ex, executor_service_client::ExecutorServiceClient};
use omoi_proto::health as hp;
use omoi_proto::taskqueue as tq;
use omoi_proto::ticket as pb;
use omoi_tests::{InProcess, Infra, eventually};
use tonic::Code;
use tonic::metadata::MetadataValue;

const TOKEN: &str = "mesh-token-4f1c";

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let v: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    r.metadata_mut().insert("authorization", v);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_requires_the_token_and_presents_it_to_the_others() {
    let infra = Infra::new().await.unwrap();
    let secure = |host: &mut omoi_runtime::config::HostArgs| host.auth_token = Some(TOKEN.into());
    let mut qc = infra.task_queue_config();
    secure(&mut qc.common.host);
    let queue = InProcess::start(qc).await.unwrap();
    let mut hc = infra.health_config();
    secure(&mut hc.common.host);
    let health = InProcess::health(hc).await.unwrap();
    let mut tc = infra.ticket_config(&queue.url);
    secure(&mut tc.common.host);
    let ticket = InProcess::ticket(tc).await.unwrap();
    let mut ec = infra.executor_config(&queue.url, &health.url, &ticket.url);
    ec.host.auth_token = Some(TOKEN.into());
    let executor = InProcess::spawn(move |incoming, stop| omoi_executor::serve(ec, incoming, stop))
        .await
        .unwrap();

    let tickets = omoi_tests::ticket_client(&ticket.url);
    let agents = omoi_tests::health_client(&health.url);
    let q = queue.client();
    let mut exec = ExecutorServiceClient::new(omoi_tests::channel(&executor.url));
    let create = || pb::CreateTicketRequest {
        title: "guarded".into(),
        ..Default::default()
    };

    // Without the token, or with a wrong one: refused, nothing done.
    for token in [None, Some("wrong"), Some("")] {
        let req = match token {
            Some(t) => with_token(create(), t),
            None => tonic::Request::new(create()),
        };
        assert_eq!(
            tickets.clone().create_ticket(req).await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
    assert_eq!(
        agents
            .clone()
            .list_agents(hp::ListAgentsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        q.clone()
            .get_queue_stats(tq::GetQueueStatsRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        exec.list_executions(ex::ListExecutionsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let pool = infra.db.connect().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tickets")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "refused calls wrote nothing");

    // With it, a ticket runs end to end: ticket -> queue, executor -> health,
    // queue and ticket all carry the token.
    let created = tickets
        .clone()
        .create_ticket(with_token(create(), TOKEN))
        .await
        .unwrap()
        .into_inner();
    let id = created.ticket.unwrap().id;
    eventually(Duration::from_secs(30), "ticket completed", || async {
        let t = tickets
            .clone()
            .get_ticket(with_token(
                pb::GetTicketRequest {
                    ticket_id: id.clone(),
                    ..Default::default()
                },
                TOKEN,
            ))
            .await
            .ok()?
            .into_inner();
        (t.ticket?.status == 3).then_some(())
    })
    .await;
    let runs = exec
        .list_executions(with_token(ex::ListExecutionsRequest::default(), TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(runs.executions.len(), 4);
    pool.close().await;
    executor.stop().await.unwrap();
    ticket.stop().await.unwrap();
    health.stop().await.unwrap();
    queue.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_one_connection_gets_answers_and_the_server_stays_up() {
    let infra = Infra::new().await.unwrap();
    let mut config = infra.task_queue_config();
    config.common.host.max_concurrent_requests_per_connection = 8;
    let queue = InProcess::start(config).await.unwrap();
    let c = queue.client();
    let mut calls = Vec::new();
    for i in 0..2000 {
        let mut c = c.clone();
        calls.push(tokio::spawn(async move {
            if i % 2 == 0 {
                c.get_queue_stats(tq::GetQueueStatsRequest {}).await.map(|_| ())
            } else {
                c.get_task(tq::GetTaskRequest { task_id: "junk".into() })
                    .await
                    .map(|_| ())
            }
        }));
    }
    let mut ok = 0;
    for (i, call) in calls.into_iter().enumerate() {
        match call.await.unwrap() {
            Ok(()) => ok += 1,
            Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "call {i}: {s:?}"),
        }
    }
    assert_eq!(ok, 1000);
    assert!(
        omoi_tests::wait_serving(&queue.url, Duration::from_secs(5))
            .await
            .is_ok()
    );
    queue.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
