//! Random and malformed requests to every RPC of every service, through real
//! gRPC: each gets a proper status (never INTERNAL or UNKNOWN), nothing
//! panics (the servers keep answering), and no refused request changes a row.

use std::time::Duration;

use futures::StreamExt;
use omoi_proto::executor::{self as ex, executor_service_client::ExecutorServiceClient};
use omoi_proto::health as hp;
use omoi_proto::taskqueue as tq;
use omoi_proto::ticket as pb;
use omoi_tests::{InProcess, Infra, Mesh};
use tonic::Code;

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }

    fn int(&mut self) -> i32 {
        *self.pick(&[
            0,
            1,
            2,
            3,
            4,
            5,
            7,
            9,
            -1,
            -100,
            1000,
            1001,
            i32::MAX,
            i32::MIN,
            86_400 * 8,
        ])
    }

    fn text(&mut self) -> String {
        match self.next() % 9 {
            0 => String::new(),
            1 => uuid::Uuid::now_v7().to_string(),
            2 => "not-a-uuid".into(),
            3 => "x".repeat(300),
            4 => "d".repeat(70_000),
            5 => "nul\0inside".into(),
            6 => "ünïcødé 🚀 title".into(),
            7 => "../../etc/passwd".into(),
            _ => "  spaced  ".into(),
        }
    }

    fn texts(&mut self) -> Vec<String> {
        (0..self.next() % 3).map(|_| self.text()).collect()
    }
}

/// Codes a refusal may carry; anything else is a defect.
fn proper(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::ResourceExhausted
    )
}

async fn counts(pool: &sqlx::PgPool) -> Vec<i64> {
    let mut out = Vec::new();
    for table in [
        "tasks",
        "task_dependencies",
        "tickets",
        "ticket_tasks",
        "agents",
        "concurrency_limits",
        "event_batches",
    ] {
        out.push(
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(pool)
                .await
                .unwrap(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_proper_statuses_and_change_nothing() {
    let infra = Infra::new().await.unwrap();
    let mesh = Mesh::start(&infra, |_| {}).await.unwrap();
    let ec = infra.executor_config(&mesh.task_queue.url, &mesh.health.url, &mesh.ticket.url);
    let executor = InProcess::spawn(move |incoming, stop| omoi_executor::serve(ec, incoming, stop))
        .await
        .unwrap();
    let (mut q, mut t, mut h) = (mesh.queue(), mesh.tickets(), mesh.agents());
    let mut e = ExecutorServiceClient::new(omoi_tests::channel(&executor.url));
    let pool = infra.db.connect().await.unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_0042);
    let mut accepted = 0;
    let mut refused = 0;

    for round in 0..300 {
        let before = counts(&pool).await;
        let rpc = rng.next() % 35;
        let result: Result<(), tonic::Status> = match rpc {
            0 => q
                .enqueue_tasks(tq::EnqueueTasksRequest {
                    tasks: (0..rng.next() % 3)
                        .map(|_| tq::NewTask {
                            id: rng.text(),
                            ticket_id: rng.text(),
                            title: rng.text(),
                            description: rng.text(),
                            phase: rng.int(),
                            priority: rng.int(),
                            depends_on: rng.texts(),
                            max_retries: Some(rng.int()),
                            timeout_seconds: rng.int(),
                            concurrency_key: rng.text(),
                            requires: [(rng.text(), rng.text())].into(),
                            candidate_of: rng.text(),
                            candidate: rng.int(),
                            lands_candidate: rng.next().is_multiple_of(2),
                            session: rng.next().is_multiple_of(2).then(|| omoi_proto::common::AgentSession {
                                runner: rng.text(),
                                session_id: rng.text(),
                                checkpoint: rng.text(),
                                resumed_from_task_id: rng.text(),
                                attempt: rng.int(),
                                ..Default::default()
                            }),
                        })
                        .collect(),
                })
                .await
                .map(|_| ()),
            1 => q.get_task(tq::GetTaskRequest { task_id: rng.text() }).await.map(|_| ()),
            2 => q
                .list_tasks(tq::ListTasksRequest {
                    ticket_id: rng.text(),
                    status: rng.int(),
                    phase: rng.int(),
                    page_size: rng.int(),
                    page_token: rng.text(),
                })
                .await
                .map(|_| ()),
            3 => q
                .cancel_task(tq::CancelTaskRequest {
                    task_id: rng.text(),
                    reason: rng.text(),
                })
                .await
                .map(|_| ()),
            4 => q
                .start_task(tq::StartTaskRequest {
                    task_id: rng.text(),
                    attempt: rng.int(),
                })
                .await
                .map(|_| ()),
            5 => q
                .complete_task(tq::CompleteTaskRequest {
                    task_id: rng.text(),
                    attempt: rng.int(),
                    result: None,
                    git: rng.next().is_multiple_of(2).then(|| omoi_proto::common::GitChange {
                        branch: rng.text(),
                        base_commit: rng.text(),
                        commit: rng.text(),
                        files_changed: rng.int(),
                        insertions: i64::from(rng.int()),
                        deletions: i64::from(rng.int()),
                        patch: rng.text(),
                        patch_truncated: false,
                        branch_diff: rng.next().is_multiple_of(2).then(|| omoi_proto::common::BranchDiff {
                            merge_base: rng.text(),
                            files_changed: rng.int(),
                            patch: rng.text(),
                            ..Default::default()
                        }),
                    }),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            6 => q
                .fail_task(tq::FailTaskRequest {
                    task_id: rng.text(),
                    attempt: rng.int(),
                    error_message: rng.text(),
                    error_class: rng.int(),
                    timed_out: rng.int() % 2 == 0,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            7 => q.get_queue_stats(tq::GetQueueStatsRequest {}).await.map(|_| ()),
            8 => match q
                .watch_assignments(tq::WatchAssignmentsRequest {
                    agent_id: rng.text(),
                    phases: vec![rng.int()],
                    capacity: rng.int(),
                })
                .await
            {
                // A stream that opened: close it at once.
                Ok(s) => {
                    drop(s);
                    Ok(())
                }
                Err(s) => Err(s),
            },
            9 => match q
                .stream_task_output(tq::StreamTaskOutputRequest {
                    task_id: rng.text(),
                    follow: false,
                })
                .await
            {
                Ok(s) => {
                    let _: Vec<_> = s.into_inner().take(1).collect().await;
                    Ok(())
                }
                Err(s) => Err(s),
            },
            10 => t
                .create_ticket(pb::CreateTicketRequest {
                    title: rng.text(),
                    description: rng.text(),
                    priority: rng.int(),
                    repository: rng.text(),
                    base_ref: rng.text(),
                    pull_request: rng.next().is_multiple_of(2),
                    request_id: rng.text(),
                    plan: (0..rng.next() % 3)
                        .map(|_| pb::TaskSpec {
                            title: rng.text(),
                            description: rng.text(),
                            phase: rng.int(),
                            priority: Some(rng.int()),
                            depends_on: vec![rng.int()],
                            max_retries: Some(rng.int()),
                            timeout_seconds: rng.int(),
                            concurrency_key: rng.text(),
                            requires: [(rng.text(), rng.text())].into(),
                            candidates: rng.next().is_multiple_of(2).then(|| pb::Candidates {
                                count: rng.int(),
                                requires: vec![pb::LabelSet {
                                    labels: [(rng.text(), rng.text())].into(),
                                }],
                                judge: [(rng.text(), rng.text())].into(),
                            }),
                        })
                        .collect(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            11 => t
                .get_ticket(pb::GetTicketRequest {
                    ticket_id: rng.text(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            12 => t
                .list_tickets(pb::ListTicketsRequest {
                    page_size: rng.int(),
                    page_token: rng.text(),
                    status: rng.int(),
                })
                .await
                .map(|_| ()),
            13 => t
                .cancel_ticket(pb::CancelTicketRequest {
                    ticket_id: rng.text(),
                    reason: rng.text(),
                })
                .await
                .map(|_| ()),
            14 => match t.watch_ticket(pb::WatchTicketRequest { ticket_id: rng.text() }).await {
                Ok(s) => {
                    drop(s);
                    Ok(())
                }
                Err(s) => Err(s),
            },
            15 => h
                .register_agent(hp::RegisterAgentRequest {
                    agent_type: rng.text(),
                    phase: rng.int(),
                    capacity: rng.int(),
                    phases: vec![rng.int()],
                    agent_id: rng.text(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            16 => h
                .heartbeat(hp::HeartbeatRequest {
                    agent_id: rng.text(),
                    running_task_ids: rng.texts(),
                })
                .await
                .map(|_| ()),
            17 => h
                .deregister_agent(hp::DeregisterAgentRequest { agent_id: rng.text() })
                .await
                .map(|_| ()),
            18 => h
                .get_agent(hp::GetAgentRequest { agent_id: rng.text() })
                .await
                .map(|_| ()),
            19 => h
                .list_agents(hp::ListAgentsRequest { status: rng.int() })
                .await
                .map(|_| ()),
            20 => h
                .get_health_statistics(hp::GetHealthStatisticsRequest {})
                .await
                .map(|_| ()),
            21 => e
                .list_executions(ex::ListExecutionsRequest { limit: rng.int() })
                .await
                .map(|_| ()),
            22 => e
                .cancel_execution(ex::CancelExecutionRequest {
                    task_id: rng.text(),
                    reason: rng.text(),
                })
                .await
                .map(|_| ()),
            23 => q
                .retry_task(tq::RetryTaskRequest {
                    task_id: rng.text(),
                    reason: rng.text(),
                    fresh: rng.next().is_multiple_of(2),
                })
                .await
                .map(|_| ()),
            24 => t
                .retry_ticket(pb::RetryTicketRequest {
                    ticket_id: rng.text(),
                    reason: rng.text(),
                })
                .await
                .map(|_| ()),
            25 => q
                .pause_dispatch(tq::PauseDispatchRequest {
                    phase: rng.int(),
                    ticket_id: rng.text(),
                    reason: rng.text(),
                })
                .await
                .map(|_| ()),
            26 => q
                .resume_dispatch(tq::ResumeDispatchRequest {
                    phase: rng.int(),
                    ticket_id: rng.text(),
                })
                .await
                .map(|_| ()),
            27 => t
                .update_ticket(pb::UpdateTicketRequest {
                    ticket: if rng.next().is_multiple_of(4) {
                        None
                    } else {
                        Some(pb::Ticket {
                            id: rng.text(),
                            priority: rng.int(),
                            labels: [(rng.text(), rng.text())].into(),
                            max_cost_usd: Some(f64::from(rng.int()) / 3.0),
                            guardian: Some(pb::GuardianSettings {
                                repeat: Some(rng.int()),
                                budget_share: Some(f64::from(rng.int()) / 7.0),
                                review_seconds: Some(rng.int()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                    },
                    update_mask: Some(prost_types::FieldMask {
                        paths: (0..rng.next() % 3)
                            .map(|_| {
                                rng.pick(&["priority", "labels", "max_cost_usd", "guardian", "title"])
                                    .to_string()
                            })
                            .collect(),
                    }),
                })
                .await
                .map(|_| ()),
            28 => q
                .extend_lease(tq::ExtendLeaseRequest {
                    task_id: rng.text(),
                    attempt: rng.int(),
                    seconds: rng.int(),
                })
                .await
                .map(|_| ()),
            29 => q
                .set_concurrency_limit(tq::SetConcurrencyLimitRequest {
                    key: rng.text(),
                    max_running: rng.int(),
                    clear: rng.next().is_multiple_of(2),
                })
                .await
                .map(|_| ()),
            30 => match t.watch_tickets(pb::WatchTicketsRequest { page_size: rng.int() }).await {
                Ok(s) => {
                    drop(s);
                    Ok(())
                }
                Err(s) => Err(s),
            },
            31 => match h.watch_agents(hp::WatchAgentsRequest { status: rng.int() }).await {
                Ok(s) => {
                    drop(s);
                    Ok(())
                }
                Err(s) => Err(s),
            },
            32 => t
                .choose_candidate(pb::ChooseCandidateRequest {
                    task_id: rng.text(),
                    candidate: rng.int(),
                    comment: rng.text(),
                })
                .await
                .map(|_| ()),
            33 => q
                .record_intervention(tq::RecordInterventionRequest {
                    task_id: rng.text(),
                    attempt: rng.int(),
                    signal: rng.text(),
                    action: rng.text(),
                    reason: rng.text(),
                    evidence: vec![tq::InterventionEvidence {
                        seq: i64::from(rng.int()),
                        text: rng.text(),
                        attempt: rng.int(),
                    }],
                    seq: i64::from(rng.int()),
                })
                .await
                .map(|_| ()),
            _ => e
                .stream_execution_output(ex::StreamExecutionOutputRequest { task_id: rng.text() })
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => accepted += 1,
            Err(s) => {
                refused += 1;
                assert!(proper(s.code()), "round {round}, rpc {rpc}: improper status {s:?}");
                // Let buffered heartbeats and relays settle before comparing.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let after = counts(&pool).await;
                // The outbox drains on its own; compare the tables that hold state.
                assert_eq!(
                    before[..6],
                    after[..6],
                    "round {round}, rpc {rpc}: a refused request changed rows"
                );
            }
        }
    }
    assert!(refused > 100 && accepted > 10, "refused {refused}, accepted {accepted}");
    // Everything still answers.
    for url in [&mesh.task_queue.url, &mesh.ticket.url, &mesh.health.url, &executor.url] {
        omoi_tests::wait_serving(url, Duration::from_secs(5)).await.unwrap();
    }
    pool.close().await;
    executor.stop().await.unwrap();
    mesh.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
