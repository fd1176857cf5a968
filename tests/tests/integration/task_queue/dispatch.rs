//! Dispatch: ready work goes out by priority and age to agents whose
//! phases match, within their capacity, as soon as it is ready; what an
//! agent drops or never starts goes back.

use super::*;

#[tokio::test]
async fn ready_tasks_go_out_by_priority_then_age() {
    let s = setup().await;
    // Across phases too: an agent taking them all gets one order.
    let in_phase = |title: &str, priority: i32, phase: i32| pb::NewTask {
        phase,
        ..new_task(title, priority)
    };
    let tasks = enqueue(
        &s.client,
        vec![
            in_phase("low", 1, 3),
            in_phase("high-old", 5, 2),
            in_phase("mid", 3, 1),
            in_phase("high-new", 5, 4),
        ],
    )
    .await;
    assert!(tasks.iter().all(|t| t.status == PENDING && t.attempt == 0));
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        let a = agent.next_assignment(WAIT).await.expect("assignment");
        let t = a.task.clone().unwrap();
        assert_eq!(a.attempt, 1);
        assert_eq!(t.status, ASSIGNED);
        order.push(t.title.clone());
        // Capacity 1: nothing more arrives until this one is done.
        assert!(
            agent.next(QUIET).await.is_none() || order.len() == 4,
            "capacity exceeded"
        );
        agent.start(&a).await.unwrap();
        let done = agent.complete(&a).await.unwrap();
        assert_eq!(done.status, COMPLETED);
    }
    assert_eq!(order, ["high-old", "high-new", "mid", "low"]);
    s.finish().await;
}

#[tokio::test]
async fn agents_only_get_their_phases_and_never_more_than_capacity() {
    let s = setup().await;
    let mut tasks = Vec::new();
    for i in 0..3 {
        tasks.push(new_task(&format!("initial {i}"), 1));
        tasks.push(pb::NewTask {
            phase: IMPLEMENTATION,
            ..new_task(&format!("impl {i}"), 1)
        });
    }
    enqueue(&s.client, tasks).await;
    let mut implementer = ScriptedAgent::connect(&s.client, &s.agents, 2, vec![IMPLEMENTATION])
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(a) = implementer.next_assignment(QUIET).await {
        got.push(a.task.unwrap());
    }
    assert_eq!(got.len(), 2, "capacity 2");
    assert!(got.iter().all(|t| t.phase == IMPLEMENTATION));
    s.finish().await;
}

#[tokio::test]
async fn completion_releases_dependents_and_failure_cascades() {
    let s = setup().await;
    let (a, b, c, d) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let with = |id: Uuid, title: &str, deps: &[Uuid]| pb::NewTask {
        id: id.to_string(),
        depends_on: deps.iter().map(ToString::to_string).collect(),
        max_retries: Some(0),
        ..new_task(title, 1)
    };
    // a <- b <- c, and d depends on a and c.
    let created = enqueue(
        &s.client,
        vec![
            with(a, "a", &[]),
            with(b, "b", &[a]),
            with(c, "c", &[b]),
            with(d, "d", &[a, c]),
        ],
    )
    .await;
    assert_eq!(
        created.iter().map(|t| t.unmet_dependencies).collect::<Vec<_>>(),
        [0, 1, 1, 2]
    );
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 4, vec![]).await.unwrap();
    let first = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(first.task.as_ref().unwrap().title, "a");
    assert!(agent.next(QUIET).await.is_none(), "b must wait for a");
    agent.start(&first).await.unwrap();
    agent.complete(&first).await.unwrap();
    let second = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(second.task.as_ref().unwrap().title, "b");
    assert_eq!(get(&s.client, &d.to_string()).await.unmet_dependencies, 1);
    // b fails for good: c and, through c, d are cancelled with the reason.
    agent.start(&second).await.unwrap();
    let failed = agent.fail(&second, "syntax error in main.rs", 0).await.unwrap();
    assert_eq!(failed.status, FAILED);
    assert_eq!(failed.error_class, PERMANENT);
    for id in [c, d] {
        let t = get(&s.client, &id.to_string()).await;
        assert_eq!(t.status, CANCELLED, "{}", t.title);
        assert!(t.error_message.contains(&b.to_string()), "{}", t.error_message);
    }
    assert!(agent.next(QUIET).await.is_none());
    // A new task cannot depend on a failed one.
    let err = s
        .client
        .clone()
        .enqueue_tasks(pb::EnqueueTasksRequest {
            tasks: vec![with(Uuid::now_v7(), "late", &[b])],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("tasks[0].depends_on[0]"), "{}", err.message());
    s.finish().await;
}

/// With the dispatcher's sweep out of the picture, each completion's own
/// wake-up hands out what it made possible: a dependent it released (no
/// agent was short of capacity), or ready work that was waiting for the
/// capacity it freed.
#[tokio::test]
async fn each_completion_dispatches_what_it_makes_possible_without_a_sweep() {
    let s = setup_with(|c| c.dispatch_sweep_ms = 600_000).await;
    let title = |a: &pb::Assignment| a.task.as_ref().unwrap().title.clone();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let with = |id: Uuid, name: &str, deps: &[Uuid]| pb::NewTask {
        id: id.to_string(),
        depends_on: deps.iter().map(ToString::to_string).collect(),
        ..new_task(name, 1)
    };
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 2, vec![]).await.unwrap();
    enqueue(&s.client, vec![with(a, "a", &[]), with(b, "b", &[a])]).await;
    // A slot stays free: nothing waits for capacity.
    let first = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(title(&first), "a");
    agent.start(&first).await.unwrap();
    agent.complete(&first).await.unwrap();
    let second = agent
        .next_assignment(WAIT)
        .await
        .expect("the released dependent goes out");
    assert_eq!(title(&second), "b");

    // b holds one slot; of three more, one fits and two wait for capacity.
    enqueue(&s.client, vec![new_task("c", 3), new_task("d", 2), new_task("e", 1)]).await;
    let third = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(title(&third), "c");
    assert!(agent.next(QUIET).await.is_none(), "capacity 2");
    let mut held = vec![second, third];
    for expected in ["d", "e"] {
        let done = held.remove(0);
        agent.start(&done).await.unwrap();
        agent.complete(&done).await.unwrap();
        let next = agent.next_assignment(WAIT).await.expect("freed capacity is filled");
        assert_eq!(title(&next), expected);
        held.push(next);
    }
    s.finish().await;
}

#[tokio::test]
async fn a_dropped_stream_requeues_its_unstarted_tasks_at_once() {
    let s = setup().await;
    enqueue(&s.client, (0..3).map(|i| new_task(&format!("t{i}"), 1)).collect()).await;
    let mut first = ScriptedAgent::connect(&s.client, &s.agents, 3, vec![]).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(first.next_assignment(WAIT).await.unwrap());
    }
    first.start(&got[0]).await.unwrap();
    let started_id = got[0].task.as_ref().unwrap().id.clone();
    drop(first);
    let mut second = ScriptedAgent::connect(&s.client, &s.agents, 3, vec![]).await.unwrap();
    let mut again = HashSet::new();
    for _ in 0..2 {
        let a = second.next_assignment(WAIT).await.expect("requeued task");
        assert_eq!(a.attempt, 2, "a new attempt");
        again.insert(a.task.unwrap().id);
    }
    let expected: HashSet<String> = got[1..].iter().map(|a| a.task.as_ref().unwrap().id.clone()).collect();
    assert_eq!(again, expected);
    // The started task stays with its agent (stale detection takes it back).
    assert!(second.next(QUIET).await.is_none());
    assert_eq!(get(&s.client, &started_id).await.status, RUNNING);
    s.finish().await;
}

#[tokio::test]
async fn an_assignment_not_started_within_its_lease_goes_back_to_the_queue() {
    let s = setup_with(|c| c.start_timeout_seconds = 1.0).await;
    let t = enqueue(&s.client, vec![new_task("lost", 1)]).await.remove(0);
    // An agent that takes the task and never says a word about it.
    let mut silent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let a1 = silent.next_assignment(WAIT).await.unwrap();
    assert_eq!(a1.attempt, 1);
    let revoked = silent.next_cancellation(WAIT).await.expect("told to drop it");
    assert_eq!((revoked.task_id.as_str(), revoked.attempt), (t.id.as_str(), 1));
    assert!(revoked.reason.contains("not started within 1 s"), "{}", revoked.reason);
    // Back in the queue for whoever takes it next; the lost attempt's late
    // start is refused.
    let late = silent.start(&a1).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    let a2 = silent.next_assignment(WAIT).await.expect("assigned again");
    assert_eq!(a2.attempt, 2);
    silent.start(&a2).await.unwrap();
    let done = silent.complete(&a2).await.unwrap();
    assert_eq!(
        (done.status, done.retry_count),
        (COMPLETED, 0),
        "a lapsed lease spends no retry"
    );
    let events = events::read_all(&s.infra.nats_url, &s.infra.topology.stream, 6, WAIT)
        .await
        .unwrap();
    assert_eq!(
        events::history(&events, &t.id),
        [
            "TASK_CREATED",
            "TASK_ASSIGNED",
            "TASK_REQUEUED",
            "TASK_ASSIGNED",
            "TASK_STARTED",
            "TASK_COMPLETED"
        ]
    );
    s.finish().await;
}
