//! When attempts go wrong: retries with stored backoff, permanent
//! failures, timeouts, cancellation, operators' retries.

use super::*;

#[tokio::test]
async fn a_retryable_failure_is_retried_after_a_stored_backoff() {
    let s = setup().await;
    let t = &enqueue(&s.client, vec![new_task("flaky", 1)]).await[0];
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let a1 = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&a1).await.unwrap();
    let before = chrono::Utc::now();
    let retried = agent.fail(&a1, "connection reset by peer", 0).await.unwrap();
    let after = chrono::Utc::now();
    assert_eq!(retried.status, PENDING);
    assert_eq!(retried.retry_count, 1);
    assert_eq!(retried.error_class, RETRYABLE);
    assert!(retried.assigned_agent_id.is_empty());
    // First retry: 1 s ± 25 %, measured from the failure.
    let next = omoi_proto::convert::from_timestamp(retried.next_attempt_at.as_ref().unwrap()).unwrap();
    let (lo, hi) = omoi_domain::backoff::bounds(0);
    assert!(
        next >= before + chrono::Duration::from_std(lo).unwrap() - chrono::Duration::milliseconds(50),
        "{next} too early"
    );
    assert!(
        next <= after + chrono::Duration::from_std(hi).unwrap() + chrono::Duration::milliseconds(50),
        "{next} too late"
    );
    // Not handed out before its time, then handed out again with attempt 2.
    let a2 = agent.next_assignment(WAIT).await.expect("retried");
    let received = chrono::Utc::now();
    assert!(received >= next, "handed out at {received}, before {next}");
    assert_eq!(a2.attempt, 2);
    assert_eq!(a2.task.as_ref().unwrap().id, t.id);
    // The first attempt's reports are now refused.
    let stale = agent.complete(&a1).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    agent.start(&a2).await.unwrap();
    assert_eq!(agent.complete(&a2).await.unwrap().status, COMPLETED);
    s.finish().await;
}

#[tokio::test]
async fn permanent_errors_fail_at_once_and_retries_run_out() {
    let s = setup().await;
    let perm = &enqueue(&s.client, vec![new_task("perm", 2)]).await[0];
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let a = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(a.task.as_ref().unwrap().id, perm.id);
    agent.start(&a).await.unwrap();
    let failed = agent.fail(&a, "Permission denied (publickey)", 0).await.unwrap();
    assert_eq!(
        (failed.status, failed.retry_count, failed.error_class),
        (FAILED, 0, PERMANENT)
    );
    // An explicit class overrides the message.
    let explicit = &enqueue(&s.client, vec![new_task("explicit", 1)]).await[0];
    let a = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(a.task.as_ref().unwrap().id, explicit.id);
    let failed = agent.fail(&a, "connection reset", PERMANENT).await.unwrap();
    assert_eq!(failed.status, FAILED);

    let limited = &enqueue(
        &s.client,
        vec![pb::NewTask {
            max_retries: Some(1),
            ..new_task("twice", 1)
        }],
    )
    .await[0];
    let a1 = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&a1).await.unwrap();
    assert_eq!(
        agent.fail(&a1, "timeout talking to LLM", 0).await.unwrap().status,
        PENDING
    );
    let a2 = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(a2.attempt, 2);
    agent.start(&a2).await.unwrap();
    let out = agent.fail(&a2, "timeout talking to LLM", 0).await.unwrap();
    assert_eq!((out.status, out.retry_count), (FAILED, 1));
    assert_eq!(out.id, limited.id);
    s.finish().await;
}

#[tokio::test]
async fn a_running_task_past_its_deadline_is_cancelled_on_the_stream_and_retried() {
    let s = setup().await;
    let (t, mut agent, a1) = started_with_one_retry(&s, 1).await;
    let cancel = agent.next_cancellation(WAIT).await.expect("cancellation on the stream");
    assert_eq!((cancel.task_id.as_str(), cancel.attempt), (t.id.as_str(), 1));
    assert!(cancel.reason.contains("timed out"), "{}", cancel.reason);
    let late = agent.complete(&a1).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    let a2 = agent.next_assignment(WAIT).await.expect("retried after the timeout");
    assert_eq!(a2.attempt, 2);
    agent.start(&a2).await.unwrap();
    // Out of retries: the second timeout fails the task.
    let cancel = agent.next_cancellation(WAIT).await.unwrap();
    assert_eq!(cancel.attempt, 2);
    let t = eventually(WAIT, "task failed", || async {
        let t = get(&s.client, &t.id).await;
        (t.status == FAILED).then_some(t)
    })
    .await;
    assert!(t.error_message.contains("timed out"));
    let events = events::read_all(&s.infra.nats_url, &s.infra.topology.stream, 9, WAIT)
        .await
        .unwrap();
    assert_eq!(events::history(&events, &t.id), TIMED_OUT_TWICE);
    s.finish().await;
}

#[tokio::test]
async fn a_timeout_the_agent_notices_first_is_still_a_timeout() {
    let s = setup().await;
    let (t, mut agent, a1) = started_with_one_retry(&s, 60).await;
    let retried = agent.timed_out(&a1).await.unwrap();
    assert_eq!((retried.status, retried.retry_count), (PENDING, 1));
    assert!(
        retried.error_message.contains("timed out after 60 s"),
        "{}",
        retried.error_message
    );
    let late = agent.timed_out(&a1).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "a stale attempt changes nothing");
    let a2 = agent.next_assignment(WAIT).await.expect("retried after the timeout");
    agent.start(&a2).await.unwrap();
    let failed = agent.timed_out(&a2).await.unwrap();
    assert_eq!(failed.status, FAILED);
    let events = events::read_all(&s.infra.nats_url, &s.infra.topology.stream, 9, WAIT)
        .await
        .unwrap();
    assert_eq!(events::history(&events, &t.id), TIMED_OUT_TWICE);
    s.finish().await;
}

#[tokio::test]
async fn cancel_works_in_every_open_state_and_not_after() {
    let s = setup().await;
    let ids: Vec<String> = enqueue(&s.client, (0..4).map(|i| new_task(&format!("t{i}"), 10 - i)).collect())
        .await
        .into_iter()
        .map(|t| t.id)
        .collect();
    let cancel = |id: String| {
        let mut c = s.client.clone();
        async move {
            c.cancel_task(pb::CancelTaskRequest {
                task_id: id,
                reason: "no longer needed".into(),
            })
            .await
        }
    };
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 2, vec![]).await.unwrap();
    let running = agent.next_assignment(WAIT).await.unwrap();
    let assigned = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&running).await.unwrap();
    assert_eq!(running.task.as_ref().unwrap().id, ids[0]);
    assert_eq!(assigned.task.as_ref().unwrap().id, ids[1]);

    // Pending: never handed out.
    cancel(ids[3].clone()).await.unwrap();
    // Running and assigned: the agent is told at once, and the freed
    // capacity takes the one task left.
    let t = cancel(ids[0].clone()).await.unwrap().into_inner().task.unwrap();
    assert_eq!(t.status, CANCELLED);
    cancel(ids[1].clone()).await.unwrap();
    let mut cancellations = HashSet::new();
    let mut assignments = Vec::new();
    while let Some(event) = agent.next(QUIET).await {
        match event {
            StreamEvent::Cancellation(c) => {
                assert_eq!((c.attempt, c.reason.as_str()), (1, "no longer needed"));
                cancellations.insert(c.task_id);
            }
            StreamEvent::Assignment(a) => assignments.push(a),
        }
    }
    assert_eq!(cancellations, HashSet::from([ids[0].clone(), ids[1].clone()]));
    assert_eq!(assignments.len(), 1, "only the task still pending: {assignments:?}");
    let next = assignments.remove(0);
    assert_eq!(next.task.as_ref().unwrap().id, ids[2]);
    assert_eq!(
        agent.start(&assigned).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    agent.start(&next).await.unwrap();
    agent.complete(&next).await.unwrap();
    // Terminal states refuse.
    for id in [&ids[0], &ids[2], &ids[3]] {
        assert_eq!(cancel(id.clone()).await.unwrap_err().code(), Code::FailedPrecondition);
    }
    assert_eq!(
        cancel(Uuid::now_v7().to_string()).await.unwrap_err().code(),
        Code::NotFound
    );
    s.finish().await;
}

#[tokio::test]
async fn an_operator_retries_a_failed_task_and_its_cancelled_dependents_come_back() {
    let s = setup().await;
    let root = enqueue(&s.client, vec![new_task("root", 1)]).await.remove(0);
    let child = pb::NewTask {
        depends_on: vec![root.id.clone()],
        ..new_task("child", 1)
    };
    let child = enqueue(&s.client, vec![child]).await.remove(0);
    let grandchild = pb::NewTask {
        depends_on: vec![child.id.clone()],
        ..new_task("grandchild", 1)
    };
    let grandchild = enqueue(&s.client, vec![grandchild]).await.remove(0);
    let retry = |task_id: &str| {
        let mut c = s.client.clone();
        let request = pb::RetryTaskRequest {
            task_id: task_id.to_owned(),
            reason: "the disk is back".into(),
            fresh: false,
        };
        async move { c.retry_task(request).await }
    };
    // Not finished: nothing to retry.
    assert_eq!(retry(&root.id).await.unwrap_err().code(), Code::FailedPrecondition);
    let mut agent = ScriptedAgent::connect(&s.client, &s.agents, 1, vec![]).await.unwrap();
    let a1 = agent.next_assignment(WAIT).await.unwrap();
    agent.start(&a1).await.unwrap();
    agent.fail(&a1, "No space left on device", PERMANENT).await.unwrap();
    assert_eq!(get(&s.client, &grandchild.id).await.status, CANCELLED);
    // A dependent waits for its dependency: that one goes round first.
    let refused = retry(&child.id).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains(&root.id), "{}", refused.message());

    let retried = retry(&root.id).await.unwrap().into_inner();
    let task = retried.task.unwrap();
    assert_eq!((task.status, task.retry_count, task.attempt), (PENDING, 0, 1));
    assert_eq!(task.error_message, "");
    assert_eq!(retried.restored_dependents, [child.id.clone(), grandchild.id.clone()]);
    for t in [&child, &grandchild] {
        assert_eq!(get(&s.client, &t.id).await.status, PENDING);
    }
    // Round again, to the end.
    for want in [&root, &child, &grandchild] {
        let a = agent.next_assignment(WAIT).await.unwrap();
        assert_eq!(a.task.as_ref().unwrap().id, want.id);
        agent.start(&a).await.unwrap();
        agent.complete(&a).await.unwrap();
    }
    let events = events::read_all(&s.infra.nats_url, &s.infra.topology.stream, 20, WAIT)
        .await
        .unwrap();
    assert_eq!(
        events::history(&events, &root.id),
        [
            "TASK_CREATED",
            "TASK_ASSIGNED",
            "TASK_STARTED",
            "TASK_FAILED",
            "TASK_RETRIED",
            "TASK_ASSIGNED",
            "TASK_STARTED",
            "TASK_COMPLETED"
        ]
    );
    assert_eq!(
        events::history(&events, &child.id),
        [
            "TASK_CREATED",
            "TASK_CANCELLED",
            "TASK_RETRIED",
            "TASK_ASSIGNED",
            "TASK_STARTED",
            "TASK_COMPLETED"
        ]
    );
    // Finished well: nothing to retry.
    assert_eq!(retry(&root.id).await.unwrap_err().code(), Code::FailedPrecondition);
    s.finish().await;
}

#[tokio::test]
async fn a_failure_that_says_when_a_retry_can_help_waits_that_long() {
    let s = setup().await;
    let (_, mut agent, a1) = started_with_one_retry(&s, 0).await;
    let failure = |seconds: i64| pb::FailTaskRequest {
        error_message: "rate limited".into(),
        error_class: RETRYABLE,
        retry_after: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..Default::default()
    };
    let bad = agent.send_failure(&a1, failure(-1)).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("retry_after"), "{}", bad.message());
    let before = std::time::SystemTime::now();
    let retried = agent.send_failure(&a1, failure(30)).await.unwrap();
    assert_eq!(retried.status, PENDING);
    let next = retried.next_attempt_at.unwrap();
    let wait = std::time::UNIX_EPOCH + Duration::new(next.seconds as u64, next.nanos as u32);
    assert!(
        wait.duration_since(before).unwrap() >= Duration::from_secs(29),
        "retried at {wait:?}"
    );
    assert!(agent.next_assignment(QUIET).await.is_none(), "not before its time");
    s.finish().await;
}
