//! Operators' controls: pauses that hold across restarts, concurrency
//! limits across replicas.

use super::*;

#[tokio::test]
async fn paused_work_waits_across_a_restart_until_resumed() {
    let Setup {
        infra,
        tq,
        client,
        health,
        agents,
    } = setup().await;
    let pause = |c: &TaskQueueClient, phase: i32, reason: &str| {
        let mut c = c.clone();
        let request = pb::PauseDispatchRequest {
            phase,
            ticket_id: String::new(),
            reason: reason.to_owned(),
        };
        async move { c.pause_dispatch(request).await }
    };
    let resume = |c: &TaskQueueClient, phase: i32| {
        let mut c = c.clone();
        async move {
            c.resume_dispatch(pb::ResumeDispatchRequest {
                phase,
                ticket_id: String::new(),
            })
            .await
        }
    };
    pause(&client, INITIAL, "deploy freeze").await.unwrap();
    let again = pause(&client, INITIAL, "deploy freeze, day two")
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.pause.unwrap().reason, "deploy freeze, day two");
    let bad = pause(&client, 99, "").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("phase"), "{}", bad.message());
    assert_eq!(
        resume(&client, IMPLEMENTATION).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    let held = enqueue(&client, vec![new_task("held", 1)]).await.remove(0);
    let mut free = new_task("free", 1);
    free.phase = IMPLEMENTATION;
    let free = enqueue(&client, vec![free]).await.remove(0);
    let mut agent = ScriptedAgent::connect(&client, &agents, 2, vec![]).await.unwrap();
    let a = agent.next_assignment(WAIT).await.unwrap();
    assert_eq!(a.task.as_ref().unwrap().id, free.id, "other phases go on");
    agent.start(&a).await.unwrap();
    agent.complete(&a).await.unwrap();
    assert!(agent.next_assignment(QUIET).await.is_none(), "the paused phase waits");
    let stats = client
        .clone()
        .get_queue_stats(pb::GetQueueStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.pauses.len(), 1);
    assert_eq!(
        (stats.pauses[0].phase, stats.pauses[0].reason.as_str()),
        (INITIAL, "deploy freeze, day two")
    );

    // A restarted replica keeps the pause.
    drop(agent);
    tq.stop().await.unwrap();
    let tq = InProcess::start(infra.task_queue_config()).await.unwrap();
    let client = tq.client();
    let mut agent = ScriptedAgent::connect(&client, &agents, 2, vec![]).await.unwrap();
    assert!(
        agent.next_assignment(QUIET).await.is_none(),
        "still paused after a restart"
    );
    let lifted = resume(&client, 0).await.unwrap().into_inner();
    assert_eq!(lifted.resumed.len(), 1);
    let a = agent.next_assignment(WAIT).await.expect("resumed");
    assert_eq!(a.task.unwrap().id, held.id);
    let events = events::read_all(&infra.nats_url, &infra.topology.stream, 8, WAIT)
        .await
        .unwrap();
    let types: Vec<&str> = events
        .iter()
        .filter(|e| e.entity_type == "queue")
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(types, ["QUEUE_PAUSED", "QUEUE_RESUMED"], "one event per change");
    health.stop().await.unwrap();
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

fn keyed(title: &str, priority: i32, key: &str) -> pb::NewTask {
    pb::NewTask {
        concurrency_key: key.to_owned(),
        ..new_task(title, priority)
    }
}

async fn set_limit(
    client: &TaskQueueClient,
    key: &str,
    max_running: i32,
    clear: bool,
) -> Result<pb::SetConcurrencyLimitResponse, tonic::Status> {
    client
        .clone()
        .set_concurrency_limit(pb::SetConcurrencyLimitRequest {
            key: key.to_owned(),
            max_running,
            clear,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Every assignment the agents receive until all of them stay quiet.
async fn assignments(agents: &mut [&mut ScriptedAgent]) -> Vec<(usize, pb::Assignment)> {
    let mut got = Vec::new();
    loop {
        let before = got.len();
        for (i, agent) in agents.iter_mut().enumerate() {
            while let Some(a) = agent.next_assignment(QUIET).await {
                got.push((i, a));
            }
        }
        if got.len() == before {
            return got;
        }
    }
}

fn with_key<'a>(got: &'a [(usize, pb::Assignment)], key: &str) -> Vec<&'a (usize, pb::Assignment)> {
    got.iter()
        .filter(|(_, a)| a.task.as_ref().unwrap().concurrency_key == key)
        .collect()
}

#[tokio::test]
async fn a_concurrency_limit_caps_its_key_on_every_replica_and_nothing_else() {
    let Setup {
        infra,
        tq,
        client,
        health,
        agents,
    } = setup().await;
    let other = InProcess::start(infra.task_queue_config()).await.unwrap();
    let bad = set_limit(&client, "", 1, false).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("key"), "{}", bad.message());
    let bad = set_limit(&client, "repo-a", -1, false).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("max_running"), "{}", bad.message());
    assert_eq!(
        set_limit(&client, "repo-a", 0, true).await.unwrap_err().code(),
        Code::NotFound
    );
    let mut bad_task = keyed("bad", 1, "line\nbreak");
    bad_task.title = "bad".into();
    let refused = client
        .clone()
        .enqueue_tasks(pb::EnqueueTasksRequest { tasks: vec![bad_task] })
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("tasks[0].concurrency_key"),
        "{}",
        refused.message()
    );

    let limit = set_limit(&client, "repo-a", 2, false).await.unwrap().limit.unwrap();
    assert_eq!((limit.key.as_str(), limit.max_running, limit.held), ("repo-a", 2, 0));
    // The keyed tasks come first by priority; without the cap they would
    // fill every slot.
    let mut batch: Vec<_> = (0..8).map(|i| keyed(&format!("a{i}"), 5, "repo-a")).collect();
    batch.extend((0..4).map(|i| new_task(&format!("free{i}"), 1)));
    enqueue(&client, batch).await;
    let mut first = ScriptedAgent::connect(&client, &agents, 6, vec![]).await.unwrap();
    let mut second = ScriptedAgent::connect(&other.client(), &agents, 6, vec![])
        .await
        .unwrap();
    let got = assignments(&mut [&mut first, &mut second]).await;
    assert_eq!(with_key(&got, "repo-a").len(), 2, "two of the key at once: {got:?}");
    assert_eq!(with_key(&got, "").len(), 4, "unrelated work goes on");
    let stats = other
        .client()
        .get_queue_stats(pb::GetQueueStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.limits.len(), 1);
    assert_eq!((stats.limits[0].max_running, stats.limits[0].held), (2, 2));

    // One of the key ends: one more of it goes out, and no more.
    let (who, done) = with_key(&got, "repo-a")[0].clone();
    let agent = if who == 0 { &mut first } else { &mut second };
    agent.start(&done).await.unwrap();
    agent.complete(&done).await.unwrap();
    let got = assignments(&mut [&mut first, &mut second]).await;
    assert_eq!(with_key(&got, "repo-a").len(), 1, "{got:?}");

    // Raised (through the other replica): two more.
    set_limit(&other.client(), "repo-a", 4, false).await.unwrap();
    let got = assignments(&mut [&mut first, &mut second]).await;
    assert_eq!(with_key(&got, "repo-a").len(), 2, "{got:?}");

    // Setting the same cap again changes nothing and says nothing.
    set_limit(&client, "repo-a", 4, false).await.unwrap();
    // Removed: the rest go out as slots free up.
    set_limit(&client, "repo-a", 0, true).await.unwrap();
    let got = assignments(&mut [&mut first, &mut second]).await;
    assert_eq!(
        with_key(&got, "repo-a").len(),
        3,
        "every task of the key left goes out: {got:?}"
    );
    let events = events::read_all(&infra.nats_url, &infra.topology.stream, 4, WAIT)
        .await
        .unwrap();
    let limits: Vec<Option<f64>> = events
        .iter()
        .filter(|e| e.event_type == "QUEUE_LIMIT_SET")
        .map(|e| {
            let fields = &e.payload.as_ref().unwrap().fields;
            fields.get("max_running").and_then(|v| match v.kind {
                Some(prost_types::value::Kind::NumberValue(n)) => Some(n),
                _ => None,
            })
        })
        .collect();
    assert_eq!(limits, [Some(2.0), Some(4.0), None], "one event per change");
    other.stop().await.unwrap();
    health.stop().await.unwrap();
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_racing_on_two_replicas_never_exceed_a_concurrency_limit() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const TASKS: usize = 60;
    const LIMIT: usize = 3;
    let Setup {
        infra,
        tq,
        client,
        health,
        agents,
    } = setup().await;
    let other = InProcess::start(infra.task_queue_config()).await.unwrap();
    set_limit(&client, "shared", LIMIT as i32, false).await.unwrap();
    enqueue(
        &client,
        (0..TASKS).map(|i| keyed(&format!("t{i}"), 1, "shared")).collect(),
    )
    .await;
    let out = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    // The most ever out at once; the first tasks wait until the cap was
    // reached, so that it is shown usable in full, not only never passed.
    let (most, reached) = tokio::sync::watch::channel(0usize);
    let most = Arc::new(most);
    let mut workers = Vec::new();
    for i in 0..6 {
        let replica = if i % 2 == 0 { client.clone() } else { other.client() };
        let (out, done, most, mut reached) = (Arc::clone(&out), Arc::clone(&done), Arc::clone(&most), reached.clone());
        let agents = agents.clone();
        workers.push(tokio::spawn(async move {
            let mut agent = ScriptedAgent::connect(&replica, &agents, 1, vec![]).await.unwrap();
            while let Some(a) = agent.next_assignment(Duration::from_secs(2)).await {
                // Counted from delivery to just before completion: never more
                // than the queue itself holds out.
                let now = out.fetch_add(1, Ordering::SeqCst) + 1;
                most.send_modify(|m| *m = (*m).max(now));
                agent.start(&a).await.unwrap();
                tokio::time::timeout(WAIT, reached.wait_for(|m| *m >= LIMIT))
                    .await
                    .expect("the cap is reached")
                    .unwrap();
                out.fetch_sub(1, Ordering::SeqCst);
                agent.complete(&a).await.unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), TASKS, "every task ran");
    assert_eq!(*most.borrow(), LIMIT, "the cap, never passed");
    other.stop().await.unwrap();
    health.stop().await.unwrap();
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
