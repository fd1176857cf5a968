//! Upkeep: retention of finished tasks, vacuum where autovacuum is off.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_go_after_their_retention_with_their_ticket_and_dependencies() {
    let infra = Infra::new().await.unwrap();
    let mut config = infra.task_queue_config();
    // Passes every 3 s (a tenth of it).
    config.task_retention_seconds = 30.0;
    let tq = InProcess::start(config).await.unwrap();
    let client = tq.client();
    let ticket = Uuid::now_v7().to_string();
    let with_id = |title: &str| pb::NewTask {
        id: Uuid::now_v7().to_string(),
        ..new_task(title, 1)
    };
    let (lone, young, dep, dependent) = (with_id("lone"), with_id("young"), with_id("dep"), with_id("dependent"));
    let dependent = pb::NewTask {
        depends_on: vec![dep.id.clone()],
        ..dependent
    };
    let in_ticket = |t: pb::NewTask| pb::NewTask {
        ticket_id: ticket.clone(),
        ..t
    };
    let (sibling_done, sibling_open) = (in_ticket(with_id("sibling done")), in_ticket(with_id("sibling open")));
    let all = vec![
        lone.clone(),
        young.clone(),
        dep.clone(),
        dependent.clone(),
        sibling_done.clone(),
        sibling_open.clone(),
    ];
    enqueue(&client, all.clone()).await;
    let pool = infra.db.connect().await.unwrap();
    // Finished an hour ago (or just now, for `young`); the others wait.
    let finish = |ids: Vec<&str>, age: &'static str| {
        let pool = pool.clone();
        let ids: Vec<Uuid> = ids.iter().map(|i| i.parse().unwrap()).collect();
        async move {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE tasks SET status = 'completed', updated_at = now() - interval '{age}' WHERE id = ANY($1)"
            )))
            .bind(ids)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    finish(vec![&lone.id, &dep.id, &sibling_done.id], "1 hour").await;
    finish(vec![&young.id], "0 seconds").await;
    let exists = |id: String| {
        let client = client.clone();
        async move {
            match client.clone().get_task(pb::GetTaskRequest { task_id: id }).await {
                Ok(_) => true,
                Err(s) if s.code() == Code::NotFound => false,
                Err(s) => panic!("GetTask: {s}"),
            }
        }
    };
    const PASSES: Duration = Duration::from_secs(30);
    eventually(PASSES, "the lone task gone", || async {
        (!exists(lone.id.clone()).await).then_some(())
    })
    .await;
    for (t, why) in [
        (&young, "finished within the retention"),
        (&dep, "its dependent is still pending"),
        (&sibling_done, "its ticket has a task still pending"),
    ] {
        assert!(exists(t.id.clone()).await, "{} kept: {why}", t.title);
    }
    finish(vec![&dependent.id, &sibling_open.id], "1 hour").await;
    eventually(PASSES, "the rest of the old tasks gone", || async {
        let mut left = 0;
        for t in [&dep, &dependent, &sibling_done, &sibling_open] {
            left += exists(t.id.clone()).await as usize;
        }
        (left == 0).then_some(())
    })
    .await;
    assert!(exists(young.id.clone()).await);
    assert_eq!(count_rows(&infra, "task_dependencies").await, 0);
    pool.close().await;
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_autovacuum_leaves_alone_are_vacuumed_by_the_service() {
    let infra = Infra::new().await.unwrap();
    let mut config = infra.task_queue_config();
    config.common.database.vacuum_interval_seconds = 0.5;
    let pool = infra.db.connect().await.unwrap();
    let tq = InProcess::start(config).await.unwrap();
    // Whatever the server's setting, the table's own says no autovacuum.
    sqlx::query("ALTER TABLE tasks SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await
        .unwrap();
    let vacuums = || async {
        let n: i64 =
            sqlx::query_scalar("SELECT vacuum_count + analyze_count FROM pg_stat_user_tables WHERE relname = 'tasks'")
                .fetch_one(&pool)
                .await
                .unwrap();
        n
    };
    let before = vacuums().await;
    eventually(WAIT, "tasks vacuumed and analyzed by the service", || async {
        (vacuums().await >= before + 2).then_some(())
    })
    .await;
    pool.close().await;
    tq.stop().await.unwrap();
    infra.cleanup().await.unwrap();
}
