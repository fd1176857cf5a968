//! Adding tasks: all of a batch or none, dependencies checked under lock.

use std::collections::{HashMap, HashSet};

use omoi_domain::validate::NewTask;
use omoi_domain::{Task, TaskStatus, graph, rules};
use uuid::Uuid;

use super::select_tasks;
use crate::codes::phase_code;
use crate::events;
use crate::{Result, Store, StoreError};

impl Store {
    /// Adds a batch of validated tasks, all or nothing.
    pub async fn enqueue(&self, tasks: &[NewTask]) -> Result<Vec<Task>> {
        let nodes: Vec<graph::BatchNode> = tasks
            .iter()
            .map(|t| graph::BatchNode {
                id: t.id,
                depends_on: t.depends_on.clone(),
            })
            .collect();
        let external = graph::external_dependencies(&nodes);
        let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();

        let mut tx = self.pool().begin().await?;
        // Locking the dependencies orders this insert against their
        // completion: whichever commits second sees the other.
        let existing: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT id, status FROM tasks WHERE id = ANY($1) ORDER BY id FOR SHARE")
                .bind(&external)
                .fetch_all(&mut *tx)
                .await?;
        let known: HashSet<Uuid> = existing.iter().map(|(id, _)| *id).collect();
        graph::validate_batch("tasks", &nodes, &known)?;
        let completed = completed_dependencies(tasks, &existing)?;
        if let Some(id) = sqlx::query_scalar::<_, Uuid>("SELECT id FROM tasks WHERE id = ANY($1) LIMIT 1")
            .bind(&ids)
            .fetch_optional(&mut *tx)
            .await?
        {
            let i = ids.iter().position(|x| *x == id).unwrap_or(0);
            return Err(StoreError::AlreadyExists(format!(
                "tasks[{i}].id: task {id} already exists"
            )));
        }

        let unmet: Vec<i32> = tasks
            .iter()
            .map(|t| t.depends_on.iter().filter(|d| !completed.contains(d)).count() as i32)
            .collect();
        sqlx::query(
            "INSERT INTO tasks (id, ticket_id, title, description, phase, priority, status,
                                unmet_deps, max_retries, timeout_seconds, trace_context)
             SELECT n.id, n.ticket_id, n.title, n.description, n.phase, n.priority, 'pending',
                    n.unmet, n.max_retries, n.timeout_seconds, $10
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int2[], $6::int4[],
                         $7::int4[], $8::int4[], $9::int4[]) WITH ORDINALITY
                  AS n(id, ticket_id, title, description, phase, priority, unmet, max_retries,
                       timeout_seconds, ord)
             ORDER BY n.ord",
        )
        .bind(&ids)
        .bind(tasks.iter().map(|t| t.ticket_id).collect::<Vec<_>>())
        .bind(tasks.iter().map(|t| t.title.as_str()).collect::<Vec<_>>())
        .bind(tasks.iter().map(|t| t.description.as_str()).collect::<Vec<_>>())
        .bind(tasks.iter().map(|t| phase_code(t.phase)).collect::<Vec<_>>())
        .bind(tasks.iter().map(|t| t.priority).collect::<Vec<_>>())
        .bind(&unmet)
        .bind(tasks.iter().map(|t| t.max_retries).collect::<Vec<_>>())
        .bind(tasks.iter().map(|t| t.timeout_seconds).collect::<Vec<_>>())
        .bind(events::current_trace())
        .execute(&mut *tx)
        .await?;

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
            .execute(&mut *tx)
            .await?;
        }

        let mut rows = select_tasks(&mut tx, &ids).await?;
        let order: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        rows.sort_by_key(|t| order.get(&t.id).copied().unwrap_or(usize::MAX));
        let created: Vec<_> = rows.iter().map(rules::created).collect();
        events::insert(&mut tx, &created).await?;
        self.commit(tx).await?;
        Ok(rows)
    }
}

/// The dependencies already completed; a dependency that ended any other way
/// refuses the batch, naming the field that points at it.
fn completed_dependencies(tasks: &[NewTask], existing: &[(Uuid, String)]) -> Result<HashSet<Uuid>> {
    let mut completed = HashSet::new();
    for (id, status) in existing {
        let status: TaskStatus = status.parse().map_err(StoreError::Corrupt)?;
        if status == TaskStatus::Completed {
            completed.insert(*id);
        } else if status.is_terminal() {
            let field = dependency_field(tasks, *id);
            return Err(StoreError::FailedPrecondition(format!(
                "{field}: dependency {id} is {status} and will never complete"
            )));
        }
    }
    Ok(completed)
}

fn dependency_field(tasks: &[NewTask], dep: Uuid) -> String {
    for (i, t) in tasks.iter().enumerate() {
        if let Some(j) = t.depends_on.iter().position(|d| *d == dep) {
            return format!("tasks[{i}].depends_on[{j}]");
        }
    }
    "tasks".to_owned()
}
