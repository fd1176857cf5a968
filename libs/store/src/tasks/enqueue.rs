//! Adding tasks: all of a batch or none, dependencies checked under lock.

use std::collections::{HashMap, HashSet};

use omoi_domain::validate::NewTask;
use omoi_domain::{Task, TaskStatus, graph, rules};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{TaskRow, task_columns_without_dependencies, unwrap_rows};
use crate::codes::phase_code;
use crate::events;
use crate::{Result, Store, StoreError};

impl Store {
    /// Adds a batch of validated tasks, all or nothing.
    pub async fn enqueue(&self, tasks: &[NewTask]) -> Result<Vec<Task>> {
        let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
        let mut tx = self.pool().begin().await?;
        let met = lock_dependencies(&mut tx, tasks).await?;
        let unmet: Vec<i32> = tasks
            .iter()
            .map(|t| t.depends_on.iter().filter(|d| !met.contains(d)).count() as i32)
            .collect();
        let mut rows = insert_tasks(&mut tx, tasks, &unmet).await?;
        if rows.len() < tasks.len() {
            // Dropping the transaction rolls the rest of the batch back.
            return Err(already_exists(&ids, &rows));
        }
        insert_edges(&mut tx, tasks).await?;
        let order: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        rows.sort_by_key(|t| order.get(&t.id).copied().unwrap_or(usize::MAX));
        // The edges are the batch's own: as given, in the order a read
        // gives them.
        for (row, task) in rows.iter_mut().zip(tasks) {
            row.depends_on = task.depends_on.clone();
            row.depends_on.sort();
        }
        let created: Vec<_> = rows.iter().map(rules::created).collect();
        events::insert(&mut tx, &created).await?;
        self.commit(tx).await?;
        Ok(rows)
    }
}

/// Locks the batch's stored dependencies and checks the batch's graph;
/// returns the dependencies already met. Locking orders this insert against
/// their completion: whichever commits second sees the other.
async fn lock_dependencies(conn: &mut PgConnection, tasks: &[NewTask]) -> Result<HashSet<Uuid>> {
    let nodes: Vec<graph::BatchNode> = tasks
        .iter()
        .map(|t| graph::BatchNode {
            id: t.id,
            depends_on: t.depends_on.clone(),
        })
        .collect();
    let external = graph::external_dependencies(&nodes);
    let existing: Vec<(Uuid, String)> = if external.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as("SELECT id, status FROM tasks WHERE id = ANY($1) ORDER BY id FOR SHARE")
            .bind(&external)
            .fetch_all(&mut *conn)
            .await?
    };
    let known: HashSet<Uuid> = existing.iter().map(|(id, _)| *id).collect();
    graph::validate_batch("tasks", &nodes, &known)?;
    let existing = existing
        .into_iter()
        .map(|(id, status)| Ok((id, status.parse::<TaskStatus>().map_err(StoreError::Corrupt)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(rules::met_dependencies(tasks, &existing)?)
}

/// The batch's first task whose id was taken (the insert skipped it).
fn already_exists(ids: &[Uuid], inserted: &[Task]) -> StoreError {
    let inserted: HashSet<Uuid> = inserted.iter().map(|t| t.id).collect();
    let (i, id) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| !inserted.contains(id))
        .map_or((0, Uuid::nil()), |(i, id)| (i, *id));
    StoreError::AlreadyExists(format!("tasks[{i}].id: task {id} already exists"))
}

/// Inserts the tasks whose ids are free (a taken one is skipped, also when
/// a concurrent batch takes it first) and returns them as stored, without
/// their dependencies.
async fn insert_tasks(conn: &mut PgConnection, tasks: &[NewTask], unmet: &[i32]) -> Result<Vec<Task>> {
    let rows: Vec<TaskRow> = sqlx::query_as(concat!(
        "WITH t AS (
             INSERT INTO tasks (id, ticket_id, title, description, phase, priority, status,
                                unmet_deps, max_retries, timeout_seconds, trace_context, concurrency_key)
             SELECT n.id, n.ticket_id, n.title, n.description, n.phase, n.priority, 'pending',
                    n.unmet, n.max_retries, n.timeout_seconds, $10, n.concurrency_key
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int2[], $6::int4[],
                         $7::int4[], $8::int4[], $9::int4[], $11::text[]) WITH ORDINALITY
                  AS n(id, ticket_id, title, description, phase, priority, unmet, max_retries,
                       timeout_seconds, concurrency_key, ord)
             ORDER BY n.ord
             ON CONFLICT (id) DO NOTHING
             RETURNING *
         )
         SELECT ",
        task_columns_without_dependencies!(),
        " FROM t"
    ))
    .bind(tasks.iter().map(|t| t.id).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.ticket_id).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.title.as_str()).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.description.as_str()).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| phase_code(t.phase)).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.priority).collect::<Vec<_>>())
    .bind(unmet)
    .bind(tasks.iter().map(|t| t.max_retries).collect::<Vec<_>>())
    .bind(tasks.iter().map(|t| t.timeout_seconds).collect::<Vec<_>>())
    .bind(events::current_trace())
    .bind(tasks.iter().map(|t| t.concurrency_key.as_deref()).collect::<Vec<_>>())
    .fetch_all(conn)
    .await?;
    Ok(unwrap_rows(rows))
}

async fn insert_edges(conn: &mut PgConnection, tasks: &[NewTask]) -> Result<()> {
    let (from, to): (Vec<Uuid>, Vec<Uuid>) = tasks
        .iter()
        .flat_map(|t| t.depends_on.iter().map(move |d| (t.id, *d)))
        .unzip();
    if !from.is_empty() {
        sqlx::query(
            "INSERT INTO task_dependencies (task_id, depends_on)
             SELECT * FROM unnest($1::uuid[], $2::uuid[])",
        )
        .bind(&from)
        .bind(&to)
        .execute(conn)
        .await?;
    }
    Ok(())
}
