//! Adding tasks: all of a batch or none, dependencies checked under lock.

use std::collections::{HashMap, HashSet};

use omoi_domain::validate::NewTask;
use omoi_domain::{Entity, EventType, Task, TaskStatus, graph, rules};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{TaskRow, requires_json, task_columns_without_dependencies, unwrap_rows};
use crate::codes::phase_code;
use crate::events;
use crate::statements::sql;
use crate::{Result, Store, StoreError};

impl Store {
    /// Adds a batch of validated tasks and their events, all or nothing. A
    /// batch without dependencies is one statement; one with dependencies
    /// is a transaction (they are locked and checked first, the edges
    /// stored after).
    pub async fn enqueue(&self, tasks: &[NewTask]) -> Result<Vec<Task>> {
        let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
        let inserted = if tasks.iter().any(|t| !t.depends_on.is_empty()) {
            let mut tx = self.pool().begin().await?;
            match insert_batch(&mut tx, tasks).await? {
                Some(rows) => {
                    self.commit(tx).await?;
                    Some(rows)
                }
                // Dropping the transaction rolls the rest of the batch back.
                None => None,
            }
        } else {
            let mut conn = self.pool().acquire().await?;
            let rows = insert_batch(&mut conn, tasks).await?;
            if rows.is_some() {
                self.wrote();
            }
            rows
        };
        let Some(mut rows) = inserted else {
            return Err(self.already_exists(&ids).await);
        };
        let order: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        rows.sort_by_key(|t| order.get(&t.id).copied().unwrap_or(usize::MAX));
        // The edges are the batch's own: as given, in the order a read
        // gives them.
        for (row, task) in rows.iter_mut().zip(tasks) {
            row.depends_on = sorted(&task.depends_on);
        }
        Ok(rows)
    }

    /// The refusal of a batch one of whose ids was taken: the first such.
    async fn already_exists(&self, ids: &[Uuid]) -> StoreError {
        let taken: HashSet<Uuid> = match sqlx::query_scalar(sql!("SELECT id FROM tasks WHERE id = ANY($1)"))
            .bind(ids)
            .fetch_all(self.pool())
            .await
        {
            Ok(taken) => taken.into_iter().collect(),
            Err(e) => return e.into(),
        };
        match ids.iter().enumerate().find(|(_, id)| taken.contains(id)) {
            Some((i, id)) => StoreError::AlreadyExists(format!("tasks[{i}].id: task {id} already exists")),
            None => StoreError::AlreadyExists("tasks: a task id is already taken".into()),
        }
    }
}

/// Stores a batch: dependencies checked (and locked, when stored ones are
/// named), the tasks and their events, the edges. None when one of the ids
/// is taken (nothing of the batch is stored then, once the caller's
/// transaction ends).
async fn insert_batch(conn: &mut PgConnection, tasks: &[NewTask]) -> Result<Option<Vec<Task>>> {
    let met = lock_dependencies(conn, tasks).await?;
    let unmet: Vec<i32> = tasks
        .iter()
        .map(|t| t.depends_on.iter().filter(|d| !met.contains(d)).count() as i32)
        .collect();
    let requirements = requirement_sets(conn, tasks).await?;
    let Some(rows) = insert_tasks(conn, tasks, &unmet, &requirements).await? else {
        return Ok(None);
    };
    insert_edges(conn, tasks).await?;
    Ok(Some(rows))
}

fn sorted(ids: &[Uuid]) -> Vec<Uuid> {
    let mut ids = ids.to_vec();
    ids.sort();
    ids
}

/// Locks the batch's stored dependencies, marks them as depended on, and
/// checks the batch's graph; returns the dependencies already met. Locking
/// orders this insert against their completion: whichever commits second
/// sees the other (a completion waiting on the lock then finds the mark and
/// releases its dependents). The lock is taken for update at once, not
/// shared and then raised by the edges' trigger: two enqueues raising
/// their shared locks on one task would deadlock.
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
        sqlx::query_as(sql!(
            "WITH l AS (
                 SELECT id, status, has_dependents FROM tasks WHERE id = ANY($1)
                 ORDER BY id FOR NO KEY UPDATE
             ), marked AS (
                 UPDATE tasks t SET has_dependents = true FROM l WHERE t.id = l.id AND NOT l.has_dependents
             )
             SELECT id, status FROM l"
        ))
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

/// Inserts the tasks with their events (one outbox batch) in one
/// statement and returns them as stored, without their dependencies; None
/// when one of the ids is taken (also by a concurrent batch that took it
/// first), when nothing was stored.
async fn insert_tasks(
    conn: &mut PgConnection,
    tasks: &[NewTask],
    unmet: &[i32],
    requirements: &[i32],
) -> Result<Option<Vec<Task>>> {
    let payloads: Vec<String> = tasks
        .iter()
        .zip(unmet)
        .map(|(t, unmet)| {
            rules::creation_event(&t.title, t.phase, t.priority, sorted(&t.depends_on), *unmet)
                .payload()
                .to_string()
        })
        .collect();
    // Marked as they are stored (the edges' trigger would mark them after).
    let depended_on: HashSet<Uuid> = tasks.iter().flat_map(|t| t.depends_on.iter().copied()).collect();
    let inserted = sqlx::query_as::<_, TaskRow>(sql!(concat!(
        "WITH n AS (
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int2[], $6::int4[],
                                  $7::int4[], $8::int4[], $9::int4[], $11::text[], $12::uuid[], $13::text[],
                                  $16::bool[], $17::text[], $18::text[], $19::int4[],
                                  $20::uuid[], $21::int2[], $22::bool[])
                      WITH ORDINALITY
                      AS n(id, ticket_id, title, description, phase, priority, unmet, max_retries,
                           timeout_seconds, concurrency_key, event_id, event_payload, has_dependents, session,
                           requires, requirement, candidate_of, candidate, lands_candidate, ord)
         ), t AS (
             INSERT INTO tasks (id, ticket_id, title, description, phase, priority, status,
                                unmet_deps, max_retries, timeout_seconds, trace_context, concurrency_key,
                                has_dependents, session, requires, requirement, candidate_of, candidate,
                                lands_candidate)
             SELECT n.id, n.ticket_id, n.title, n.description, n.phase, n.priority, 'pending',
                    n.unmet, n.max_retries, n.timeout_seconds, $10, n.concurrency_key, n.has_dependents,
                    n.session::jsonb, n.requires::jsonb, n.requirement, n.candidate_of, n.candidate,
                    n.lands_candidate
             FROM n ORDER BY n.ord
             RETURNING *
         ), ev AS (
             -- Every task of the batch is stored, or the statement fails.
             SELECT n.event_id AS id, n.ord, n.id AS entity_id, n.ticket_id,
                    n.event_payload::json AS payload, $10 AS trace
             FROM n
         ), outbox AS (",
        events::insert_events!("$14", "$15"),
        ")
         SELECT ",
        task_columns_without_dependencies!(),
        " FROM t"
    )))
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
    .bind(events::event_ids(tasks.len()))
    .bind(&payloads)
    .bind(EventType::TaskCreated.as_str())
    .bind(Entity::Task.as_str())
    .bind(tasks.iter().map(|t| depended_on.contains(&t.id)).collect::<Vec<_>>())
    .bind(
        tasks
            .iter()
            .map(|t| t.session.as_ref().map(|s| json!(s).to_string()))
            .collect::<Vec<_>>(),
    )
    .bind(tasks.iter().map(|t| requires_json(&t.requires)).collect::<Vec<_>>())
    .bind(requirements)
    .bind(tasks.iter().map(|t| t.candidate.map(|(of, _)| of)).collect::<Vec<_>>())
    .bind(
        tasks
            .iter()
            .map(|t| t.candidate.map(|(_, n)| n as i16))
            .collect::<Vec<_>>(),
    )
    .bind(tasks.iter().map(|t| t.lands_candidate).collect::<Vec<_>>())
    .fetch_all(conn)
    .await;
    match inserted {
        Ok(rows) => Ok(Some(unwrap_rows(rows))),
        Err(sqlx::Error::Database(e))
            if e.code().as_deref() == Some("23505") && e.constraint() == Some("tasks_pkey") =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The number of each task's set of required labels (0: none), the sets
/// not yet known stored first. Usually one read; a new set costs an insert
/// and a second read, which (a new statement) also sees a set another
/// enqueue stored meanwhile, whose insert this one's skipped.
async fn requirement_sets(conn: &mut PgConnection, tasks: &[NewTask]) -> Result<Vec<i32>> {
    let wanted: Vec<String> = tasks
        .iter()
        .filter_map(|t| requires_json(&t.requires))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if wanted.is_empty() {
        return Ok(vec![0; tasks.len()]);
    }
    let mut known = known_sets(&mut *conn, &wanted).await?;
    if known.len() < wanted.len() {
        let missing: Vec<&String> = wanted.iter().filter(|w| !known.contains_key(*w)).collect();
        sqlx::query(sql!(
            "INSERT INTO requirement_sets (requires) SELECT w::jsonb FROM unnest($1::text[]) w
             ON CONFLICT (requires) DO NOTHING"
        ))
        .bind(missing)
        .execute(&mut *conn)
        .await?;
        known = known_sets(&mut *conn, &wanted).await?;
    }
    tasks
        .iter()
        .map(|t| match requires_json(&t.requires) {
            None => Ok(0),
            Some(r) => known
                .get(&r)
                .copied()
                .ok_or_else(|| StoreError::Corrupt(format!("requirement set {r} was not stored"))),
        })
        .collect()
}

/// The numbers of those of the `wanted` sets (as JSON text) stored.
async fn known_sets(conn: &mut PgConnection, wanted: &[String]) -> Result<HashMap<String, i32>> {
    let known: Vec<(String, i32)> = sqlx::query_as(sql!(
        "SELECT w, s.id FROM unnest($1::text[]) w JOIN requirement_sets s ON s.requires = w::jsonb"
    ))
    .bind(wanted)
    .fetch_all(conn)
    .await?;
    Ok(known.into_iter().collect())
}

async fn insert_edges(conn: &mut PgConnection, tasks: &[NewTask]) -> Result<()> {
    let (from, to): (Vec<Uuid>, Vec<Uuid>) = tasks
        .iter()
        .flat_map(|t| t.depends_on.iter().map(move |d| (t.id, *d)))
        .unzip();
    if !from.is_empty() {
        sqlx::query(sql!(
            "INSERT INTO task_dependencies (task_id, depends_on)
             SELECT * FROM unnest($1::uuid[], $2::uuid[])"
        ))
        .bind(&from)
        .bind(&to)
        .execute(conn)
        .await?;
    }
    Ok(())
}
