//! The agent registry: registration, batched heartbeats, staleness, and
//! per-agent task counts.
//!
//! The `agents` table is shared by design, across the gRPC boundary between
//! the health service and the task queue: the health service is its only
//! writer (everything here but the reads), and the task queue reads it in
//! the statements that need liveness and tasks together — a dispatch
//! round's live agents with what each holds (`round_view`), the running
//! lease's check of who still holds a task (`reclaim_unheld`). Asking the
//! health service over gRPC instead would cost a call per dispatch round
//! and lose the one snapshot those statements judge from; the services
//! share the database anyway (one schema history, one migrator).

use std::time::Duration;

use chrono::{DateTime, Utc};
use omoi_domain::{Agent, AgentStatus, Phase};
use serde_json::{Value, json};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, Row};
use uuid::Uuid;

use omoi_domain::event::{AgentChanged, AgentRegistered, AgentStale};

use crate::codes::{phase_code, phase_of};
use crate::statements::sql;
use omoi_domain::{Envelope, Event};

use crate::events;
use crate::{Result, Store, StoreError};

/// The columns an `AgentRow` reads.
macro_rules! agent_columns {
    () => {
        "id, agent_type, phases, capacity, labels, status, registered_at, last_heartbeat_at,
     running_task_ids, status_changed_at, completed_tasks, failed_tasks"
    };
}

/// An `agents` row.
struct AgentRow(Agent);

impl<'r> FromRow<'r, PgRow> for AgentRow {
    fn from_row(row: &'r PgRow) -> sqlx::Result<Self> {
        let status: String = row.try_get("status")?;
        let phases: Vec<i16> = row.try_get("phases")?;
        Ok(AgentRow(Agent {
            id: row.try_get("id")?,
            agent_type: row.try_get("agent_type")?,
            phases: phases.into_iter().filter_map(phase_of).collect(),
            capacity: row.try_get("capacity")?,
            labels: row.try_get("labels")?,
            status: AgentStatus::parse(&status)
                .ok_or_else(|| sqlx::Error::Decode(format!("agent status {status}").into()))?,
            registered_at: row.try_get("registered_at")?,
            last_heartbeat_at: row.try_get("last_heartbeat_at")?,
            running_task_ids: row.try_get("running_task_ids")?,
            status_changed_at: row.try_get("status_changed_at")?,
            completed_tasks: row.try_get("completed_tasks")?,
            failed_tasks: row.try_get("failed_tasks")?,
        }))
    }
}

/// A registration request, validated.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Re-register under a known id; a new id when None.
    pub id: Option<Uuid>,
    pub agent_type: String,
    pub phases: Vec<Phase>,
    pub capacity: i32,
    pub labels: Value,
}

/// A buffered heartbeat.
#[derive(Debug, Clone)]
pub struct Beat {
    pub agent_id: Uuid,
    pub at: DateTime<Utc>,
    pub running_task_ids: Vec<Uuid>,
}

/// Counts for health statistics.
#[derive(Debug, Clone, Default)]
pub struct AgentStats {
    pub by_status: Vec<(AgentStatus, i64)>,
    pub by_type: Vec<(String, i64)>,
    pub agents: Vec<Agent>,
}

fn agent_event(agent: &Agent, event: fn(AgentChanged) -> Event) -> Envelope {
    Envelope::new(agent.id, None, event(agent.change()))
}

impl Store {
    pub async fn register_agent(&self, r: &Registration) -> Result<Agent> {
        let mut tx = self.pool().begin().await?;
        let phases: Vec<i16> = r.phases.iter().copied().map(phase_code).collect();
        let AgentRow(agent) = sqlx::query_as(sql!(concat!(
            "INSERT INTO agents (id, agent_type, phases, capacity, labels, status)
             VALUES ($1, $2, $3, $4, $5, 'healthy')
             ON CONFLICT (id) DO UPDATE SET agent_type = EXCLUDED.agent_type, phases = EXCLUDED.phases,
                 capacity = EXCLUDED.capacity, labels = EXCLUDED.labels, status = 'healthy',
                 last_heartbeat_at = now(), status_changed_at = now(), running_task_ids = '{}'
             RETURNING ",
            agent_columns!()
        )))
        .bind(r.id.unwrap_or_else(Uuid::now_v7))
        .bind(&r.agent_type)
        .bind(&phases)
        .bind(r.capacity)
        .bind(&r.labels)
        .fetch_one(&mut *tx)
        .await?;
        let registered = Event::AgentRegistered(AgentRegistered {
            agent: agent.change(),
            capacity: agent.capacity,
            phases: agent.phases.clone(),
        });
        events::insert(&mut tx, &[Envelope::new(agent.id, None, registered)]).await?;
        self.commit(tx).await?;
        Ok(agent)
    }

    pub async fn get_agent(&self, id: Uuid) -> Result<Agent> {
        let mut conn = self.pool().acquire().await?;
        select_agent(&mut conn, id).await
    }

    pub async fn agent_status(&self, id: Uuid) -> Result<Option<AgentStatus>> {
        let status: Option<String> = sqlx::query_scalar(sql!("SELECT status FROM agents WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        Ok(status.as_deref().and_then(AgentStatus::parse))
    }

    pub async fn list_agents(&self, status: Option<AgentStatus>) -> Result<Vec<Agent>> {
        let rows = sqlx::query_as(sql!(concat!(
            "SELECT ",
            agent_columns!(),
            " FROM agents WHERE ($1::text IS NULL OR status = $1) ORDER BY seq"
        )))
        .bind(status.map(AgentStatus::as_str))
        .fetch_all(self.pool())
        .await?;
        Ok(unwrap_rows(rows))
    }

    pub async fn deregister_agent(&self, id: Uuid) -> Result<Agent> {
        let mut tx = self.pool().begin().await?;
        let before = select_agent(&mut tx, id).await?;
        if before.status == AgentStatus::Deregistered {
            return Err(StoreError::FailedPrecondition(format!(
                "agent {id} is already deregistered"
            )));
        }
        let AgentRow(agent) = sqlx::query_as(sql!(concat!(
            "UPDATE agents SET status = 'deregistered', status_changed_at = now(), running_task_ids = '{}'
             WHERE id = $1 RETURNING ",
            agent_columns!()
        )))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        events::insert(&mut tx, &[agent_event(&agent, Event::AgentDeregistered)]).await?;
        self.commit(tx).await?;
        Ok(agent)
    }

    /// Writes buffered heartbeats in one transaction. A stale agent that
    /// heartbeats is recovered (AGENT_RECOVERED); deregistered and unknown
    /// agents are left out. Returns the agents written with their status now.
    pub async fn flush_heartbeats(&self, beats: &[Beat]) -> Result<Vec<(Uuid, AgentStatus)>> {
        if beats.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = beats.iter().map(|b| b.agent_id).collect();
        let ats: Vec<DateTime<Utc>> = beats.iter().map(|b| b.at).collect();
        let running: Vec<String> = beats.iter().map(|b| json!(b.running_task_ids).to_string()).collect();
        let mut tx = self.pool().begin().await?;
        let rows: Vec<(Uuid, String)> = sqlx::query_as(sql!(
            "WITH beat AS (
                 SELECT DISTINCT ON (b.id) b.id, b.at, b.running
                 FROM unnest($1::uuid[], $2::timestamptz[], $3::text[]) AS b(id, at, running)
                 ORDER BY b.id, b.at DESC
             ), prev AS (
                 SELECT a.id, a.status FROM agents a JOIN beat ON beat.id = a.id
                 WHERE a.status <> 'deregistered' ORDER BY a.id FOR UPDATE OF a
             )
             UPDATE agents a
             SET last_heartbeat_at = greatest(a.last_heartbeat_at, beat.at),
                 running_task_ids = ARRAY(SELECT jsonb_array_elements_text(beat.running::jsonb)::uuid),
                 status = 'healthy',
                 status_changed_at = CASE WHEN prev.status = 'stale' THEN now() ELSE a.status_changed_at END
             FROM beat, prev
             WHERE a.id = beat.id AND prev.id = a.id
             RETURNING a.id, prev.status"
        ))
        .bind(&ids)
        .bind(&ats)
        .bind(&running)
        .fetch_all(&mut *tx)
        .await?;
        let recovered: Vec<Uuid> = rows
            .iter()
            .filter(|(_, prev)| prev == "stale")
            .map(|(id, _)| *id)
            .collect();
        if !recovered.is_empty() {
            let agents = sqlx::query_as::<_, AgentRow>(sql!(concat!(
                "SELECT ",
                agent_columns!(),
                " FROM agents WHERE id = ANY($1) ORDER BY seq"
            )))
            .bind(&recovered)
            .fetch_all(&mut *tx)
            .await?;
            let agents = unwrap_rows(agents);
            let evs: Vec<Envelope> = agents.iter().map(|a| agent_event(a, Event::AgentRecovered)).collect();
            events::insert(&mut tx, &evs).await?;
        }
        self.commit(tx).await?;
        Ok(rows.into_iter().map(|(id, _)| (id, AgentStatus::Healthy)).collect())
    }

    /// Marks healthy agents silent for longer than `stale_after` as stale,
    /// with an AGENT_STALE event each. Safe with several replicas: each
    /// agent turns stale once.
    pub async fn mark_stale(&self, stale_after: Duration) -> Result<Vec<Agent>> {
        let mut tx = self.pool().begin().await?;
        let agents = sqlx::query_as::<_, AgentRow>(sql!(concat!(
            "UPDATE agents SET status = 'stale', status_changed_at = now()
             WHERE id IN (SELECT id FROM agents
                          WHERE status = 'healthy'
                            AND last_heartbeat_at < now() - make_interval(secs => $1)
                          ORDER BY id FOR UPDATE SKIP LOCKED)
             RETURNING ",
            agent_columns!()
        )))
        .bind(stale_after.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
        let agents = unwrap_rows(agents);
        let evs: Vec<Envelope> = agents
            .iter()
            .map(|a| {
                let stale = AgentStale {
                    agent: a.change(),
                    stale_at: a.status_changed_at,
                    stale_after_seconds: stale_after.as_secs_f64(),
                };
                Envelope::new(a.id, None, Event::AgentStale(stale))
            })
            .collect();
        events::insert(&mut tx, &evs).await?;
        self.commit(tx).await?;
        Ok(agents)
    }

    /// Forgets up to `batch` agents deregistered or stale for longer than
    /// `retention`, so that listings stay readable; how many went.
    pub async fn prune_agents(&self, retention: Duration, batch: i64) -> Result<u64> {
        let done = sqlx::query(sql!(
            "DELETE FROM agents WHERE id IN (
                 SELECT id FROM agents
                 WHERE status IN ('deregistered', 'stale')
                   AND status_changed_at < now() - make_interval(secs => $1)
                 ORDER BY seq LIMIT $2
                 FOR UPDATE SKIP LOCKED)"
        ))
        .bind(retention.as_secs_f64())
        .bind(batch)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Counts task outcomes for the agents that held them, each event once,
    /// in one statement: `(event id, agent, completed)` per event (a failure
    /// when not completed). Events already counted (redelivered) change
    /// nothing.
    pub async fn count_agent_outcomes(&self, consumer: &str, outcomes: &[(Uuid, Uuid, bool)]) -> Result<()> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = outcomes.iter().map(|o| o.0).collect();
        let agents: Vec<Uuid> = outcomes.iter().map(|o| o.1).collect();
        let completed: Vec<bool> = outcomes.iter().map(|o| o.2).collect();
        sqlx::query(sql!(
            "WITH e AS (
                 SELECT DISTINCT ON (id) id, agent, completed
                 FROM unnest($2::uuid[], $3::uuid[], $4::bool[]) AS e(id, agent, completed)
             ), fresh AS (
                 INSERT INTO processed_events (consumer, event_id)
                 SELECT $1, id FROM e
                 ON CONFLICT DO NOTHING
                 RETURNING event_id
             ), counts AS (
                 SELECT e.agent, count(*) FILTER (WHERE e.completed) AS done,
                        count(*) FILTER (WHERE NOT e.completed) AS failed
                 FROM e JOIN fresh ON fresh.event_id = e.id
                 GROUP BY e.agent
             )
             UPDATE agents a
             SET completed_tasks = a.completed_tasks + counts.done, failed_tasks = a.failed_tasks + counts.failed
             FROM counts WHERE a.id = counts.agent"
        ))
        .bind(consumer)
        .bind(&ids)
        .bind(&agents)
        .bind(&completed)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Agents by status (one aggregate; cheap enough for a metrics sampler).
    pub async fn agent_status_counts(&self) -> Result<Vec<(AgentStatus, i64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(sql!(
            "SELECT status, count(*) FROM agents GROUP BY status ORDER BY status"
        ))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(s, n)| AgentStatus::parse(&s).map(|s| (s, n)))
            .collect())
    }

    pub async fn agent_stats(&self) -> Result<AgentStats> {
        let by_type: Vec<(String, i64)> = sqlx::query_as(sql!(
            "SELECT agent_type, count(*) FROM agents GROUP BY agent_type ORDER BY agent_type"
        ))
        .fetch_all(self.pool())
        .await?;
        Ok(AgentStats {
            by_status: self.agent_status_counts().await?,
            by_type,
            agents: self.list_agents(None).await?,
        })
    }
}

async fn select_agent(conn: &mut PgConnection, id: Uuid) -> Result<Agent> {
    sqlx::query_as(sql!(concat!("SELECT ", agent_columns!(), " FROM agents WHERE id = $1")))
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(|AgentRow(a)| a)
        .ok_or(StoreError::NotFound { entity: "agent", id })
}

fn unwrap_rows(rows: Vec<AgentRow>) -> Vec<Agent> {
    rows.into_iter().map(|AgentRow(a)| a).collect()
}

/// The channel the agents table's trigger announces a committed change of
/// what an agent list shows on.
pub const CHANGED_CHANNEL: &str = "omoi_agents_changed";
