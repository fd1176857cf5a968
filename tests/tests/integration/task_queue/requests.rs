//! What the API takes and answers: defaults, refusals naming the field,
//! stale reports, listing, statistics and their stream, usage.

use super::*;

#[tokio::test]
async fn a_task_without_a_timeout_gets_the_default_deadline() {
    let s = setup().await;
    let mut timed = new_task("timed", 1);
    timed.timeout_seconds = 5;
    let created = enqueue(&s.client, vec![new_task("untimed", 1), timed]).await;
    let timeouts: Vec<i32> = created.iter().map(|t| t.timeout_seconds).collect();
    assert_eq!(timeouts, [7200, 5], "two hours unless the task says");
    assert_eq!(get(&s.client, &created[0].id).await.timeout_seconds, 7200);
    s.finish().await;

    let s = setup_with(|c| c.default_task_timeout_seconds = 0).await;
    let created = enqueue(&s.client, vec![new_task("untimed", 1)]).await;
    assert_eq!(created[0].timeout_seconds, 0, "0 turns the default off");
    s.finish().await;
}

#[tokio::test]
async fn a_cycle_or_bad_field_is_refused_and_nothing_is_written() {
    let s = setup().await;
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let with = |id: Uuid, deps: &[Uuid]| pb::NewTask {
        id: id.to_string(),
        depends_on: deps.iter().map(ToString::to_string).collect(),
        ..new_task("t", 1)
    };
    let cases: Vec<(Vec<pb::NewTask>, Code, &str)> = vec![
        (
            vec![with(a, &[c]), with(b, &[a]), with(c, &[b])],
            Code::InvalidArgument,
            "cycle",
        ),
        (vec![with(a, &[a])], Code::InvalidArgument, "tasks[0].depends_on[0]"),
        (
            vec![with(a, &[Uuid::now_v7()])],
            Code::InvalidArgument,
            "unknown task id",
        ),
        (
            vec![pb::NewTask {
                title: String::new(),
                ..new_task("", 1)
            }],
            Code::InvalidArgument,
            "tasks[0].title",
        ),
        (
            vec![new_task("ok", 1), new_task("neg", -1)],
            Code::InvalidArgument,
            "tasks[1].priority",
        ),
        (
            vec![pb::NewTask {
                timeout_seconds: -1,
                ..new_task("t", 1)
            }],
            Code::InvalidArgument,
            "timeout_seconds",
        ),
        (
            vec![pb::NewTask {
                max_retries: Some(-2),
                ..new_task("t", 1)
            }],
            Code::InvalidArgument,
            "max_retries",
        ),
        (
            vec![pb::NewTask {
                phase: 0,
                ..new_task("t", 1)
            }],
            Code::InvalidArgument,
            "tasks[0].phase",
        ),
        (
            vec![pb::NewTask {
                id: "nope".into(),
                ..new_task("t", 1)
            }],
            Code::InvalidArgument,
            "tasks[0].id",
        ),
        (
            vec![pb::NewTask {
                ticket_id: "x".into(),
                ..new_task("t", 1)
            }],
            Code::InvalidArgument,
            "ticket_id",
        ),
        (vec![with(a, &[]), with(a, &[])], Code::InvalidArgument, "tasks[1].id"),
        (
            vec![
                new_task("ok", 1),
                pb::NewTask {
                    requires: [("runner".to_string(), String::new())].into(),
                    ..new_task("t", 1)
                },
            ],
            Code::InvalidArgument,
            "tasks[1].requires[runner]",
        ),
        (
            vec![pb::NewTask {
                requires: [("run ner".to_string(), "codex".to_string())].into(),
                ..new_task("t", 1)
            }],
            Code::InvalidArgument,
            "tasks[0].requires",
        ),
        (vec![], Code::InvalidArgument, "tasks"),
        (
            (0..1001).map(|i| new_task(&i.to_string(), 1)).collect(),
            Code::InvalidArgument,
            "tasks",
        ),
    ];
    for (tasks, code, needle) in cases {
        let err = s
            .client
            .clone()
            .enqueue_tasks(pb::EnqueueTasksRequest { tasks })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{needle}: {}", err.message());
        assert!(err.message().contains(needle), "{needle} not in {:?}", err.message());
    }
    assert_eq!(count_rows(&s.infra, "tasks").await, 0);
    assert_eq!(count_rows(&s.infra, "task_dependencies").await, 0);
    // Nothing was published either: the stream holds no event.
    let events = events::read_all(&s.infra.nats_url, &s.infra.topology.stream, 0, Duration::ZERO)
        .await
        .unwrap();
    assert!(events.is_empty(), "{events:?}");
    // A task id that already exists.
    let t = enqueue(&s.client, vec![with(a, &[])]).await;
    let err = s
        .client
        .clone()
        .enqueue_tasks(pb::EnqueueTasksRequest {
            tasks: vec![with(b, &[]), with(a, &[])],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    assert_eq!(count_rows(&s.infra, "tasks").await, 1);
    assert_eq!(t.len(), 1);
    s.finish().await;
}

#[tokio::test]
async fn malformed_requests_to_every_rpc_name_the_field() {
    let s = setup().await;
    let mut c = s.client.clone();
    let missing = Uuid::now_v7().to_string();
    expect(
        c.get_task(pb::GetTaskRequest { task_id: "1".into() }).await,
        Code::InvalidArgument,
        "task_id",
    );
    expect(
        c.get_task(pb::GetTaskRequest {
            task_id: missing.clone(),
        })
        .await,
        Code::NotFound,
        &missing,
    );
    let batch = |ids: Vec<String>| pb::BatchGetTasksRequest { task_ids: ids };
    expect(
        c.batch_get_tasks(batch(vec![])).await,
        Code::InvalidArgument,
        "task_ids",
    );
    expect(
        c.batch_get_tasks(batch(vec![missing.clone(); 1001])).await,
        Code::InvalidArgument,
        "task_ids",
    );
    expect(
        c.batch_get_tasks(batch(vec![missing.clone(), "x".into()])).await,
        Code::InvalidArgument,
        "task_ids[1]",
    );
    expect(
        c.batch_get_tasks(batch(vec![missing.clone()])).await,
        Code::NotFound,
        &missing,
    );
    expect(
        c.list_tasks(pb::ListTasksRequest {
            page_size: -1,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_size",
    );
    expect(
        c.list_tasks(pb::ListTasksRequest {
            page_token: "abc".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_token",
    );
    expect(
        c.list_tasks(pb::ListTasksRequest {
            status: 42,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "status",
    );
    expect(
        c.cancel_task(pb::CancelTaskRequest {
            task_id: String::new(),
            reason: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "task_id",
    );
    expect(
        c.start_task(pb::StartTaskRequest {
            task_id: missing.clone(),
            attempt: 0,
        })
        .await,
        Code::InvalidArgument,
        "attempt",
    );
    expect(
        c.start_task(pb::StartTaskRequest {
            task_id: missing.clone(),
            attempt: 1,
        })
        .await,
        Code::NotFound,
        &missing,
    );
    expect(
        c.complete_task(pb::CompleteTaskRequest {
            task_id: "zz".into(),
            attempt: 1,
            result: None,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "task_id",
    );
    expect(
        c.fail_task(pb::FailTaskRequest {
            task_id: missing.clone(),
            attempt: 1,
            error_message: String::new(),
            error_class: 9,
            timed_out: false,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "error_class",
    );
    for (agent_id, capacity, phases, field) in [
        ("x".to_string(), 1, vec![], "agent_id"),
        (missing.clone(), 0, vec![], "capacity"),
        (missing.clone(), 1001, vec![], "capacity"),
        (missing.clone(), 1, vec![7], "phases[0]"),
    ] {
        expect(
            c.watch_assignments(pb::WatchAssignmentsRequest {
                agent_id,
                phases,
                capacity,
            })
            .await,
            Code::InvalidArgument,
            field,
        );
    }
    assert_eq!(count_rows(&s.infra, "tasks").await, 0);
    assert_eq!(count_rows(&s.infra, "event_batches").await, 0);
    s.finish().await;
}

#[tokio::test]
async fn stale_attempts_and_illegal_reports_are_refused() {
    let s = setup().await;
    enqueue(&s.client, vec![new_task("t", 1)]).await;
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let a = agent.next_assignment(WAIT).await.unwrap();
    // Completing before starting is illegal.
    assert_eq!(agent.complete(&a).await.unwrap_err().code(), Code::FailedPrecondition);
    let wrong = pb::Assignment {
        attempt: a.attempt + 1,
        ..a.clone()
    };
    let err = agent.start(&wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("not current"), "{}", err.message());
    agent.start(&a).await.unwrap();
    // A retried report of the same attempt (its answer was lost) succeeds
    // again and changes nothing.
    assert_eq!(agent.start(&a).await.unwrap().status, RUNNING);
    agent.complete(&a).await.unwrap();
    assert_eq!(agent.complete(&a).await.unwrap().status, COMPLETED);
    assert_eq!(agent.start(&a).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(
        agent.fail(&a, "x", 0).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    let events = events::read_all(&s.infra.nats_url, &s.infra.topology.stream, 4, WAIT)
        .await
        .unwrap();
    let history = events::history(&events, &a.task.as_ref().unwrap().id);
    assert_eq!(
        history,
        ["TASK_CREATED", "TASK_ASSIGNED", "TASK_STARTED", "TASK_COMPLETED"]
    );
    s.finish().await;
}

#[tokio::test]
async fn list_filters_and_pages_and_stats_count() {
    let s = setup().await;
    let ticket = Uuid::now_v7().to_string();
    let mut tasks: Vec<pb::NewTask> = (0..5)
        .map(|i| pb::NewTask {
            ticket_id: ticket.clone(),
            ..new_task(&format!("t{i}"), 1)
        })
        .collect();
    tasks.push(pb::NewTask {
        phase: IMPLEMENTATION,
        ..new_task("other", 1)
    });
    let created = enqueue(&s.client, tasks).await;
    let mut c = s.client.clone();
    // Several by id, in the order asked (one asked twice comes twice).
    let ids = [&created[3], &created[0], &created[5], &created[3]].map(|t| t.id.clone());
    let batch = c
        .batch_get_tasks(pb::BatchGetTasksRequest { task_ids: ids.to_vec() })
        .await
        .unwrap()
        .into_inner();
    let titles: Vec<&str> = batch.tasks.iter().map(|t| t.title.as_str()).collect();
    assert_eq!(titles, ["t3", "t0", "other", "t3"]);
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_tasks(pb::ListTasksRequest {
                ticket_id: ticket.clone(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.tasks.len() <= 2);
        seen.extend(page.tasks.into_iter().map(|t| t.title));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["t0", "t1", "t2", "t3", "t4"]);
    let by_phase = c
        .list_tasks(pb::ListTasksRequest {
            phase: IMPLEMENTATION,
            status: PENDING,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_phase.tasks.len(), 1);
    let stats = c
        .get_queue_stats(pb::GetQueueStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((stats.pending, stats.ready, stats.running), (6, 6, 0));
    assert!(stats.oldest_ready_age_seconds >= 0.0);
    assert_eq!(stats.counts.iter().map(|c| c.count).sum::<i64>(), 6);
    s.finish().await;
}

#[tokio::test]
async fn a_report_with_a_bad_usage_is_refused_and_a_good_one_kept() {
    let s = setup().await;
    let (t, mut agent, a1) = started_with_one_retry(&s, 0).await;
    let spent = omoi_proto::common::Usage {
        input_tokens: 1200,
        output_tokens: 300,
        cost_usd: 0.042,
        model: "claude-sonnet-4-5".into(),
        turns: 3,
        ..Default::default()
    };
    let bad = [
        (
            omoi_proto::common::Usage {
                input_tokens: -5,
                ..spent.clone()
            },
            "usage.input_tokens",
        ),
        (
            omoi_proto::common::Usage {
                cost_usd: f64::INFINITY,
                ..spent.clone()
            },
            "usage.cost_usd",
        ),
    ];
    for (usage, field) in bad {
        let failure = pb::FailTaskRequest {
            error_message: "connection reset".into(),
            usage: Some(usage.clone()),
            ..Default::default()
        };
        let e = agent.send_failure(&a1, failure).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(field), "{}", e.message());
        let completion = pb::CompleteTaskRequest {
            task_id: t.id.clone(),
            attempt: a1.attempt,
            usage: Some(usage),
            ..Default::default()
        };
        let e = agent.client.complete_task(completion).await.unwrap_err();
        assert!(e.message().contains(field), "{}", e.message());
    }
    let unchanged = get(&s.client, &t.id).await;
    assert_eq!((unchanged.status, unchanged.usage), (RUNNING, None));
    let completion = pb::CompleteTaskRequest {
        task_id: t.id.clone(),
        attempt: a1.attempt,
        usage: Some(spent.clone()),
        ..Default::default()
    };
    let done = agent
        .client
        .complete_task(completion)
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!((done.status, done.usage), (COMPLETED, Some(spent)));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_stream_sends_the_queue_again_when_it_changes() {
    use futures::StreamExt;
    let s = setup().await;
    let watch = async || {
        s.client
            .clone()
            .watch_queue_stats(pb::WatchQueueStatsRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    async fn next(stats: &mut tonic::Streaming<pb::WatchQueueStatsResponse>) -> pb::GetQueueStatsResponse {
        tokio::time::timeout(WAIT, stats.next())
            .await
            .expect("stats within the wait")
            .expect("the stream goes on")
            .expect("stats")
            .stats
            .unwrap()
    }
    // The statistics change all the time (the oldest task's age), so a
    // message may come from before the change: wait for one that shows it.
    async fn until(
        stats: &mut tonic::Streaming<pb::WatchQueueStatsResponse>,
        what: &str,
        done: impl Fn(&pb::GetQueueStatsResponse) -> bool,
    ) -> pb::GetQueueStatsResponse {
        let change = async {
            loop {
                let now = next(stats).await;
                if done(&now) {
                    return now;
                }
            }
        };
        tokio::time::timeout(WAIT, change)
            .await
            .unwrap_or_else(|_| panic!("{what} within the wait"))
    }
    let pause = async |reason: &str| {
        s.client
            .clone()
            .pause_dispatch(pb::PauseDispatchRequest {
                reason: reason.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    };
    let mut first = watch().await;
    let empty = next(&mut first).await;
    assert_eq!((empty.pending, empty.ready), (0, 0));

    enqueue(&s.client, vec![new_task("a", 2), new_task("b", 2)]).await;
    until(&mut first, "queued", |q| (q.pending, q.ready) == (2, 2)).await;

    // A watcher joining later (one reader serves both) starts from what
    // the queue is now.
    let mut second = watch().await;
    let joined = next(&mut second).await;
    assert_eq!((joined.pending, joined.ready), (2, 2), "{joined:?}");

    pause("lunch").await;
    for stats in [&mut first, &mut second] {
        let paused = until(stats, "paused", |q| !q.pauses.is_empty()).await;
        assert_eq!(paused.pauses[0].reason, "lunch");
    }

    // When every watcher has gone, the next one is served by a new reader.
    drop((first, second));
    s.client
        .clone()
        .resume_dispatch(pb::ResumeDispatchRequest::default())
        .await
        .unwrap();
    let mut third = watch().await;
    let resumed = next(&mut third).await;
    assert!(resumed.pauses.is_empty(), "{resumed:?}");
    assert_eq!(resumed.pending, 2);
    pause("tea").await;
    let paused = until(&mut third, "paused again", |q| !q.pauses.is_empty()).await;
    assert_eq!(paused.pauses[0].reason, "tea");
    drop(third);
    s.finish().await;
}
