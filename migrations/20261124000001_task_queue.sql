-- The task queue. The hot table stays lean: one row per task, readiness kept
-- as a counter of unfinished dependencies so that the ready set is a partial
-- index, never a walk of the graph.
CREATE TABLE tasks (
    id                 uuid PRIMARY KEY,
    -- Insertion order: the tie-breaker among equal priorities ("oldest first")
    -- and the key of list pagination.
    seq                bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    ticket_id          uuid,
    title              text        NOT NULL,
    description        text        NOT NULL DEFAULT '',
    phase              smallint    NOT NULL CHECK (phase BETWEEN 1 AND 4),
    priority           integer     NOT NULL CHECK (priority >= 0),
    status             text        NOT NULL CHECK (status IN
                         ('pending', 'assigned', 'running', 'completed', 'failed', 'timed_out', 'cancelled')),
    unmet_deps         integer     NOT NULL DEFAULT 0 CHECK (unmet_deps >= 0),
    retry_count        integer     NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    max_retries        integer     NOT NULL CHECK (max_retries >= 0),
    timeout_seconds    integer     NOT NULL DEFAULT 0 CHECK (timeout_seconds >= 0),
    -- Bumped on every assignment; reports for any other attempt are refused.
    attempt            integer     NOT NULL DEFAULT 0,
    assigned_agent_id  uuid,
    -- The WatchAssignments stream the current attempt was delivered on: when
    -- that stream ends, its not-yet-started tasks go back to the queue.
    assignment_session uuid,
    error_message      text,
    error_class        text CHECK (error_class IN ('retryable', 'permanent')),
    result             jsonb,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    completed_at       timestamptz,
    deadline_at        timestamptz,
    next_attempt_at    timestamptz NOT NULL DEFAULT now()
);

-- The ready set, in dispatch order.
CREATE INDEX tasks_ready ON tasks (priority DESC, seq) WHERE status = 'pending' AND unmet_deps = 0;
-- When the next backed-off retry becomes ready.
CREATE INDEX tasks_retry_at ON tasks (next_attempt_at) WHERE status = 'pending' AND unmet_deps = 0;
-- Work held by agents (capacity accounting, requeue, stale agents).
CREATE INDEX tasks_held ON tasks (assigned_agent_id) WHERE status IN ('assigned', 'running');
CREATE INDEX tasks_session ON tasks (assignment_session) WHERE status = 'assigned';
-- The timeout monitor.
CREATE INDEX tasks_deadline ON tasks (deadline_at) WHERE status = 'running';
CREATE INDEX tasks_ticket ON tasks (ticket_id, seq);
CREATE INDEX tasks_status ON tasks (status, seq);

CREATE TABLE task_dependencies (
    task_id    uuid NOT NULL REFERENCES tasks (id),
    depends_on uuid NOT NULL REFERENCES tasks (id),
    PRIMARY KEY (task_id, depends_on),
    CHECK (task_id <> depends_on)
);
CREATE INDEX task_dependencies_depends_on ON task_dependencies (depends_on);

-- Events written in the same transaction as the change they describe, and
-- published to JetStream by the relay, which deletes them once acknowledged.
CREATE TABLE event_outbox (
    seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id            uuid        NOT NULL DEFAULT gen_random_uuid(),
    event_type    text        NOT NULL,
    entity_type   text        NOT NULL,
    entity_id     uuid        NOT NULL,
    ticket_id     uuid,
    payload       jsonb       NOT NULL DEFAULT '{}',
    occurred_at   timestamptz NOT NULL DEFAULT now(),
    -- W3C traceparent of the change, carried into the message headers.
    trace_context text
);
