//! Dispatch: claiming ready tasks for agents' free slots, and putting back
//! what a closed stream never started.

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use omoi_domain::routing::Labels;
use omoi_domain::rules::{self, Revoked};
use omoi_domain::{Entity, EventType, Phase, Task};
use uuid::Uuid;

use super::{TaskRow, task_columns, unwrap_rows};
use crate::codes::phase_code;
use crate::events;
use crate::statements::{built, built_statements, sql};
use crate::{Result, Store};

/// One free place on a connected agent's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub agent_id: Uuid,
    pub session: Uuid,
}

/// The claim: ready tasks of the phases `$3`, highest priority then oldest,
/// onto the slots (`$1` agents, `$2` their sessions, in order), at most
/// `$4`, stamped `$5`, with their TASK_ASSIGNED events (ids `$6`, types
/// `$7`, `$8`) written by the same statement. `$allowed` adds CTEs (each
/// followed by a comma) and `$room` the way a task of a limited key may
/// still be taken.
///
/// `{head}` is the most any phase's head may give (see `plain_claim`).
///
/// The phases are a fixed list (the stored codes of `Phase::ALL`, which
/// `codes.rs` pins) filtered by `$3` rather than `unnest($3)`:
/// its size is then known to the planner without the parameter's value, so
/// that the statement's generic plan costs what its custom plans do and is
/// kept, instead of the statement being planned again on every claim. The
/// filter is `array_position(..) IS NOT NULL`, not `= ANY($3)`: a custom
/// plan would count the phases named in `$3` (three of four: a quarter
/// cheaper than the generic plan's guess, which was then never kept for
/// agents that take some phases only); the planner cannot see through this
/// one and guesses the same for both.
///
/// The requirement sets the labels satisfy (set 0, requiring nothing,
/// always) are read from `requirement_sets`, a handful of rows: each head
/// is then a (phase, set) of the ready index, and tasks requiring labels
/// these agents lack are never walked over, however many wait.
macro_rules! claim_statement {
    ($allowed:literal, $room:literal) => {
        concat!(
            "WITH ",
            $allowed,
            " picked AS MATERIALIZED (
                 -- The head of each (phase taken, requirement met)
                 -- (tasks_ready_phase), merged: the ready work of phases not
                 -- taken, or requiring what the agents lack, is never walked over.
                 SELECT c.id, c.priority, c.seq
                 FROM (VALUES (1::int2), (2::int2), (3::int2), (4::int2)) AS ph(phase)
                 -- As a function, not `<@`: the planner then guesses the
                 -- same share of sets whatever `$9` holds (see above).
                 CROSS JOIN (SELECT id FROM requirement_sets WHERE jsonb_contained(requires, $9::jsonb))
                      AS rq(requirement)
                 CROSS JOIN LATERAL (
                     SELECT id, priority, seq FROM tasks
                     WHERE status = 'pending' AND unmet_deps = 0 AND phase = ph.phase
                       AND requirement = rq.requirement
                       AND next_attempt_at <= now()
                       -- Paused scopes hand out nothing. The first test runs
                       -- once per statement (an init plan), so that with no
                       -- pause at all no row pays for the second.
                       AND (NOT EXISTS (SELECT 1 FROM dispatch_pauses)
                            OR NOT EXISTS (
                                SELECT 1 FROM dispatch_pauses p
                                WHERE (p.phase IS NULL OR p.phase = tasks.phase)
                                  AND (p.ticket_id IS NULL OR p.ticket_id = tasks.ticket_id)))
                       -- A limited key's tasks only within its room, and only
                       -- when its lock is held (a limit set since is honoured).
                       AND (tasks.concurrency_key IS NULL
                            OR NOT EXISTS (SELECT 1 FROM concurrency_limits l WHERE l.key = tasks.concurrency_key) ",
            $room,
            ")
                     ORDER BY priority DESC, seq
                     LIMIT {head}
                     FOR UPDATE SKIP LOCKED
                 ) c
                 WHERE array_position($3, ph.phase) IS NOT NULL
                 ORDER BY c.priority DESC, c.seq
                 -- The most a head gives, not `$4`: the rows the statement
                 -- goes on with are then guessed alike whatever `$4` is
                 -- (the generic plan is kept); `numbered` takes `$4`.
                 LIMIT {head}
             ), numbered AS (
                 SELECT id, ord FROM (
                     SELECT id, row_number() OVER (ORDER BY priority DESC, seq) AS ord FROM picked
                 ) o
                 WHERE ord <= $4
             ), t AS (
                 -- The n-th task to the n-th slot, by subscript: no join
                 -- whose cost a generic plan could misjudge.
                 UPDATE tasks t
                 SET status = 'assigned', attempt = t.attempt + 1, assigned_agent_id = ($1::uuid[])[n.ord],
                     assignment_session = ($2::uuid[])[n.ord], assigned_at = $5, updated_at = now()
                 FROM numbered n
                 WHERE t.id = n.id
                 RETURNING t.*, n.ord AS claim_ord
             ), ev AS (
                 -- TASK_ASSIGNED (`rules::assigned`), in claim order.
                 SELECT ($6::uuid[])[t.claim_ord] AS id, t.claim_ord AS ord, t.id AS entity_id, t.ticket_id,
                        t.trace_context AS trace,
                        json_build_object('attempt', t.attempt, 'agent_id', t.assigned_agent_id,
                                          'priority', t.priority) AS payload
                 FROM t
             ), outbox AS (",
            events::insert_events!("$7", "$8"),
            ")
             SELECT ",
            task_columns!(),
            " FROM t ORDER BY t.priority DESC, t.seq"
        )
    };
}

/// The claims of up to 512 slots (`1 << (HEADS - 1)`) have a statement per power
/// of two, whose phase heads are a constant LIMIT: with `LIMIT $4` a
/// generic plan cannot know the limit and costs it at a tenth of the ready
/// rows, so that on a deep queue (above ~100,000 ready tasks) it never
/// looks as cheap as a custom plan and the claim is planned again on every
/// call — planning then took longer than the claim. With the constant the
/// generic plan costs what the custom ones do and is kept. A head may lock
/// up to twice the rows it hands out; they are let go when the statement
/// commits. Larger claims (rare, and then the planning is a small share)
/// keep the parameter.
const HEADS: usize = 10;

static PLAIN_CLAIMS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let template = claim_statement!("", "");
    (0..=HEADS)
        .map(|b| {
            let head = if b < HEADS {
                (1usize << b).to_string()
            } else {
                "$4".to_owned()
            };
            template.replace("{head}", &head)
        })
        .collect()
});

/// The claim under concurrency limits (rarely set): the heads keep the
/// parameter.
static LIMITED_CLAIM: LazyLock<String> = LazyLock::new(|| {
    let template = claim_statement!(
        "allowed AS (
             -- Of each locked key ($10), as many ready tasks these agents
             -- may take as it has room for.
             SELECT r.id FROM concurrency_limits l
             CROSS JOIN LATERAL (
                 SELECT r.id FROM tasks r
                 WHERE r.concurrency_key = l.key AND r.status = 'pending' AND r.unmet_deps = 0
                   AND r.next_attempt_at <= now() AND r.phase = ANY($3)
                   AND r.requirement IN (SELECT id FROM requirement_sets WHERE jsonb_contained(requires, $9::jsonb))
                 ORDER BY r.priority DESC, r.seq
                 LIMIT greatest(l.max_running - (
                     SELECT count(*) FROM tasks h
                     WHERE h.concurrency_key = l.key AND h.status IN ('assigned', 'running')), 0)
             ) r
             WHERE l.key = ANY($10::text[])
         ),",
        "OR tasks.id IN (SELECT id FROM allowed)"
    );
    template.replace("{head}", "$4")
});

built_statements!(CLAIMS, || {
    PLAIN_CLAIMS.iter().chain([&*LIMITED_CLAIM]).cloned().collect()
});

/// The claim statement for this many slots (`PLAIN_CLAIMS`).
fn plain_claim(slots: usize) -> &'static str {
    let bucket = (slots.next_power_of_two().trailing_zeros() as usize).min(HEADS);
    &PLAIN_CLAIMS[bucket]
}

impl Store {
    /// Hands ready tasks to the given slots, highest priority then oldest
    /// first, one task per slot. `phases` = None accepts every phase; only
    /// tasks whose required labels are all among `labels` are taken. Rows
    /// locked by another dispatcher are skipped, so replicas never hand out
    /// the same task.
    /// `stamp` becomes the tasks' `assigned_at`: when the statement's answer
    /// is lost, `assigned_in_round` finds what it did. `limits`: whether any
    /// concurrency limit may exist (a round's `Round::limits`); without one
    /// the keys are not locked, and a limit set meanwhile still holds, since
    /// the claim hands out a limited key's tasks only under its lock.
    pub async fn assign(
        &self,
        phases: Option<&[Phase]>,
        labels: &Labels,
        slots: &[Slot],
        stamp: DateTime<Utc>,
        limits: bool,
    ) -> Result<Vec<Task>> {
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        // Every phase when none is named: one statement shape either way.
        let phases: Vec<i16> = phases.unwrap_or(&Phase::ALL).iter().copied().map(phase_code).collect();
        let agents: Vec<Uuid> = slots.iter().map(|s| s.agent_id).collect();
        let sessions: Vec<Uuid> = slots.iter().map(|s| s.session).collect();
        let event_ids = events::event_ids(slots.len());
        let limit = slots.len() as i64;
        let labels = serde_json::to_string(labels).expect("labels always serialize");
        // Used once, by whichever statement runs.
        let bind = move |query: sqlx::query::QueryAs<'static, _, TaskRow, _>| {
            query
                .bind(agents)
                .bind(sessions)
                .bind(phases)
                .bind(limit)
                .bind(stamp)
                .bind(event_ids)
                .bind(EventType::TaskAssigned.as_str())
                .bind(Entity::Task.as_str())
                .bind(labels)
        };
        let rows = if limits {
            let mut tx = self.pool().begin().await?;
            // The limited keys with ready work, locked: a replica claiming
            // for one of them waits here for another doing the same, and
            // then (a new statement, a new snapshot) counts what that one
            // handed out.
            let locked: Vec<String> = sqlx::query_scalar(sql!(
                "SELECT l.key FROM concurrency_limits l
                 WHERE EXISTS (SELECT 1 FROM tasks r
                               WHERE r.concurrency_key = l.key AND r.status = 'pending' AND r.unmet_deps = 0
                                 AND r.next_attempt_at <= now())
                 ORDER BY l.key FOR UPDATE"
            ))
            .fetch_all(&mut *tx)
            .await?;
            let rows = bind(sqlx::query_as(built(LIMITED_CLAIM.as_str())))
                .bind(locked)
                .fetch_all(&mut *tx)
                .await?;
            self.commit(tx).await?;
            rows
        } else {
            // Without limits the claim and its events are one statement,
            // committed on its own.
            let rows = bind(sqlx::query_as(built(plain_claim(slots.len()))))
                .fetch_all(self.pool())
                .await?;
            self.wrote();
            rows
        };
        Ok(unwrap_rows(rows))
    }

    /// The tasks an `assign` with this stamp handed to these sessions and
    /// that are still waiting to start.
    pub async fn assigned_in_round(&self, stamp: DateTime<Utc>, sessions: &[Uuid]) -> Result<Vec<Task>> {
        let rows: Vec<TaskRow> = sqlx::query_as(sql!(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks t
             WHERE t.status = 'assigned' AND t.assigned_at = $1 AND t.assignment_session = ANY($2)"
        )))
        .bind(stamp)
        .bind(sessions)
        .fetch_all(self.pool())
        .await?;
        Ok(unwrap_rows(rows))
    }

    /// What a dispatch round starts from, in one statement: of the given
    /// agents, those that may take work — registered, healthy, and heard
    /// from within `silent_seconds` — with the tasks each holds (assigned or
    /// running) and the labels it registered with; whether any concurrency limit exists; and when the earliest
    /// backed-off task becomes ready. An agent gone quiet gets nothing new
    /// well before the health service declares it stale.
    pub async fn round_view(&self, agents: &[Uuid], silent_seconds: f64) -> Result<Round> {
        let rows: Vec<RoundRow> = sqlx::query_as(sql!(
            "WITH live AS (
                 SELECT a.id, a.labels, (SELECT count(*) FROM tasks t
                               WHERE t.assigned_agent_id = a.id AND t.status IN ('assigned', 'running')) AS held
                 FROM agents a
                 WHERE a.id = ANY($1) AND a.status = 'healthy'
                   AND a.last_heartbeat_at > now() - make_interval(secs => $2)
             ), facts AS (
                 SELECT EXISTS (SELECT 1 FROM concurrency_limits) AS limits,
                        (SELECT min(next_attempt_at) FROM tasks
                         -- Stated as tasks_retry_at's predicate (a task ready in
                         -- the future was put off since its creation).
                         WHERE status = 'pending' AND unmet_deps = 0 AND next_attempt_at > now()
                           AND next_attempt_at > created_at) AS next_retry
             )
             SELECT live.id, live.held, live.labels, facts.limits, facts.next_retry
             FROM facts LEFT JOIN live ON true"
        ))
        .bind(agents)
        .bind(silent_seconds)
        .fetch_all(self.pool())
        .await?;
        let mut round = Round::default();
        for (id, held, labels, limits, next_retry) in rows {
            round.limits = limits;
            round.next_retry = next_retry;
            if let (Some(id), Some(held)) = (id, held) {
                let labels: Labels = labels
                    .map(serde_json::from_value)
                    .transpose()
                    .map_err(|e| crate::StoreError::Corrupt(format!("agent {id}'s labels: {e}")))?
                    .unwrap_or_default();
                round.held.insert(id, held);
                round.labels.insert(id, labels);
            }
        }
        Ok(round)
    }

    /// Puts back the tasks delivered on an assignment stream that were not
    /// started; their attempt stays spent, so a late StartTask is refused.
    pub async fn requeue_session(&self, session: Uuid) -> Result<Vec<Uuid>> {
        let put_back = self.requeue_where(Unstarted::OnStream(session)).await?;
        Ok(put_back.into_iter().map(|r| r.task_id).collect())
    }

    /// Puts back an agent's assigned tasks delivered on any stream but
    /// `current` (an earlier connection that is gone).
    pub async fn requeue_agent_except(&self, agent_id: Uuid, current: Uuid) -> Result<Vec<Uuid>> {
        let put_back = self.requeue_where(Unstarted::OtherStreams(agent_id, current)).await?;
        Ok(put_back.into_iter().map(|r| r.task_id).collect())
    }

    /// Puts back the tasks assigned more than `seconds` ago and still not
    /// started (the start lease lapsed: the assignment was lost, or its
    /// agent or replica went away without a word); their holders are to be
    /// told.
    pub async fn requeue_unstarted(&self, seconds: f64) -> Result<Vec<Revoked>> {
        self.requeue_where(Unstarted::Lapsed(seconds)).await
    }

    async fn requeue_where(&self, which: Unstarted) -> Result<Vec<Revoked>> {
        // The statement per case, so that each uses its own index.
        let (query, reason) = match which {
            Unstarted::OnStream(session) => (
                sqlx::query_as(sql!(requeue_statement!("t.assignment_session = $1"))).bind(session),
                "stream closed".to_owned(),
            ),
            Unstarted::OtherStreams(agent, session) => (
                sqlx::query_as(sql!(requeue_statement!(
                    "t.assignment_session IS DISTINCT FROM $1 AND t.assigned_agent_id = $2"
                )))
                .bind(session)
                .bind(agent),
                "agent reconnected".to_owned(),
            ),
            Unstarted::Lapsed(seconds) => (
                sqlx::query_as(sql!(requeue_statement!(
                    "t.assigned_at < now() - make_interval(secs => $1)"
                )))
                .bind(seconds),
                rules::start_lapsed(seconds),
            ),
        };
        let mut tx = self.pool().begin().await?;
        let rows: Vec<PutBack> = query.fetch_all(&mut *tx).await?;
        let (evs, traces): (Vec<_>, Vec<_>) = rows
            .iter()
            .map(|(id, ticket, attempt, trace, _)| (rules::requeued(*id, *ticket, *attempt, &reason), trace.clone()))
            .unzip();
        events::insert_traced(&mut tx, &evs, &traces).await?;
        self.commit(tx).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(task_id, _, attempt, _, agent)| {
                agent.map(|agent_id| Revoked {
                    agent_id,
                    task_id,
                    attempt,
                    reason: reason.clone(),
                })
            })
            .collect())
    }
}

/// A row of `round_view`: an agent that may take work (none when no agent
/// may), what it holds and its labels, then the facts every row repeats.
type RoundRow = (
    Option<Uuid>,
    Option<i64>,
    Option<serde_json::Value>,
    bool,
    Option<DateTime<Utc>>,
);

/// What a dispatch round starts from (`Store::round_view`).
#[derive(Debug, Default)]
pub struct Round {
    /// The agents that may take work, with the tasks each holds.
    pub held: HashMap<Uuid, i64>,
    /// Their labels (what tasks they may take).
    pub labels: HashMap<Uuid, Labels>,
    /// Whether any concurrency limit exists.
    pub limits: bool,
    /// When the earliest backed-off task becomes ready.
    pub next_retry: Option<DateTime<Utc>>,
}

/// A task put back: id, ticket, attempt, trace context, and the agent that
/// held it.
type PutBack = (Uuid, Option<Uuid>, i32, Option<String>, Option<Uuid>);

/// Puts back the assigned, unstarted tasks `$filter` selects.
macro_rules! requeue_statement {
    ($filter:literal) => {
        concat!(
            "WITH held AS (
                 SELECT t.id, t.assigned_agent_id FROM tasks t
                 WHERE t.status = 'assigned' AND ",
            $filter,
            "
                 ORDER BY t.seq FOR UPDATE SKIP LOCKED
             )
             UPDATE tasks t
             SET status = 'pending', assigned_agent_id = NULL, assignment_session = NULL,
                 updated_at = now(), next_attempt_at = now()
             FROM held WHERE t.id = held.id
             RETURNING t.id, t.ticket_id, t.attempt, t.trace_context, held.assigned_agent_id"
        )
    };
}
use requeue_statement;

/// Which assigned, unstarted tasks go back to the queue.
#[derive(Debug, Clone, Copy)]
enum Unstarted {
    /// Those delivered on this stream.
    OnStream(Uuid),
    /// The agent's, delivered on any stream but this one.
    OtherStreams(Uuid, Uuid),
    /// Any assigned more than this many seconds ago.
    Lapsed(f64),
}
