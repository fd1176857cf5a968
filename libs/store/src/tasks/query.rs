//! Reading tasks: one, a page, and the queue's statistics.

use std::time::Duration;

use omoi_domain::routing::Labels;
use omoi_domain::{Phase, Task, TaskStatus};
use uuid::Uuid;

use super::{TaskRow, select_tasks, task_columns, unwrap_rows};
use crate::codes::{phase_code, phase_of};
use crate::statements::sql;
use crate::{Result, Store, StoreError};

/// A healthy agent `a` carrying the labels `$requires` and taking the
/// phase `$phase` (SQL expressions): one that may be handed such a task.
macro_rules! agent_takes {
    ($requires:literal, $phase:literal) => {
        concat!(
            "a.status = 'healthy' AND a.labels @> ",
            $requires,
            " AND (a.phases = '{}' OR ",
            $phase,
            " = ANY(a.phases))"
        )
    };
}

/// Filters of `list`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub ticket_id: Option<Uuid>,
    pub status: Option<TaskStatus>,
    pub phase: Option<Phase>,
}

/// Pending tasks of one phase requiring labels no healthy agent taking
/// that phase carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Unsatisfied {
    pub requires: Labels,
    pub phase: Phase,
    pub tasks: i64,
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// (status, phase, count), non-zero only.
    pub counts: Vec<(TaskStatus, Phase, i64)>,
    pub ready: i64,
    pub oldest_ready_age: Duration,
}

impl Store {
    pub async fn get(&self, id: Uuid) -> Result<Task> {
        let mut conn = self.pool().acquire().await?;
        select_tasks(&mut conn, &[id])
            .await?
            .pop()
            .ok_or(StoreError::NotFound { entity: "task", id })
    }

    /// The tasks `ids` names, in that order (an id named twice, twice);
    /// NotFound for the first that does not exist.
    pub async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<Task>> {
        let mut conn = self.pool().acquire().await?;
        let found: std::collections::HashMap<Uuid, Task> = select_tasks(&mut conn, ids)
            .await?
            .into_iter()
            .map(|t| (t.id, t))
            .collect();
        ids.iter()
            .map(|id| {
                found.get(id).cloned().ok_or(StoreError::NotFound {
                    entity: "task",
                    id: *id,
                })
            })
            .collect()
    }

    /// A page of tasks in insertion order after `after_seq`; the second value
    /// is the cursor of the next page, if there is one.
    pub async fn list(&self, filter: &ListFilter, page_size: i64, after_seq: i64) -> Result<(Vec<Task>, Option<i64>)> {
        let rows: Vec<TaskRow> = sqlx::query_as(sql!(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks t
             WHERE ($1::uuid IS NULL OR t.ticket_id = $1)
               AND ($2::text IS NULL OR t.status = $2)
               AND ($3::int2 IS NULL OR t.phase = $3)
               AND t.seq > $4
             ORDER BY t.seq LIMIT $5"
        )))
        .bind(filter.ticket_id)
        .bind(filter.status.map(TaskStatus::as_str))
        .bind(filter.phase.map(phase_code))
        .bind(after_seq)
        .bind(page_size + 1)
        .fetch_all(self.pool())
        .await?;
        Ok(crate::page(unwrap_rows(rows), page_size, |t| t.seq))
    }

    pub async fn stats(&self) -> Result<Stats> {
        let rows: Vec<(String, i16, i64)> = sqlx::query_as(sql!(
            "SELECT status, phase, count(*) FROM tasks GROUP BY status, phase ORDER BY 1, 2"
        ))
        .fetch_all(self.pool())
        .await?;
        let mut counts = Vec::with_capacity(rows.len());
        for (status, phase, n) in rows {
            let status: TaskStatus = status.parse().map_err(StoreError::Corrupt)?;
            let phase = phase_of(phase).ok_or_else(|| StoreError::Corrupt(format!("phase {phase}")))?;
            counts.push((status, phase, n));
        }
        let (ready, age): (i64, Option<f64>) = sqlx::query_as(sql!(
            "SELECT count(*), extract(epoch FROM now() - min(next_attempt_at))::float8 FROM tasks
             WHERE status = 'pending' AND unmet_deps = 0 AND next_attempt_at <= now()"
        ))
        .fetch_one(self.pool())
        .await?;
        Ok(Stats {
            counts,
            ready,
            oldest_ready_age: Duration::from_secs_f64(age.unwrap_or(0.0).max(0.0)),
        })
    }

    /// Whether a healthy agent could take a task of `phase` requiring
    /// `requires` (e.g. judge a step's candidates).
    pub async fn can_take(&self, requires: &Labels, phase: Phase) -> Result<bool> {
        let requires = serde_json::to_value(requires).expect("labels always serialize");
        Ok(sqlx::query_scalar(sql!(concat!(
            "SELECT EXISTS (SELECT 1 FROM agents a WHERE ",
            agent_takes!("$1::jsonb", "$2::int2"),
            ")"
        )))
        .bind(requires)
        .bind(phase_code(phase))
        .fetch_one(self.pool())
        .await?)
    }

    /// Pending tasks no healthy agent can take — none carries the labels
    /// they require and takes their phase — counted by requirement and
    /// phase. The tasks are grouped first (from their index), and each
    /// group is checked against the agents once.
    pub async fn unsatisfied(&self) -> Result<Vec<Unsatisfied>> {
        let rows: Vec<(serde_json::Value, i16, i64)> = sqlx::query_as(sql!(concat!(
            "WITH g AS (
                 SELECT requirement, phase, count(*) AS n FROM tasks
                 WHERE status = 'pending' AND requirement <> 0
                 GROUP BY requirement, phase
             )
             SELECT s.requires, g.phase, g.n FROM g JOIN requirement_sets s ON s.id = g.requirement
             WHERE NOT EXISTS (SELECT 1 FROM agents a WHERE ",
            agent_takes!("s.requires", "g.phase"),
            ")
             ORDER BY g.n DESC, g.phase"
        )))
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(requires, phase, tasks)| {
                Ok(Unsatisfied {
                    requires: serde_json::from_value(requires)
                        .map_err(|e| StoreError::Corrupt(format!("a requirement set: {e}")))?,
                    phase: phase_of(phase).ok_or_else(|| StoreError::Corrupt(format!("phase {phase}")))?,
                    tasks,
                })
            })
            .collect()
    }
}
