-- When the current attempt was handed out: a stale agent's work is taken
-- back only if it was assigned before the agent went silent.
ALTER TABLE tasks ADD COLUMN assigned_at timestamptz;

-- The agent registry. Heartbeats are buffered in memory and written here in
-- batches, so a heartbeat never waits on a row lock.
CREATE TABLE agents (
    id                uuid PRIMARY KEY,
    seq               bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    agent_type        text        NOT NULL,
    -- Phases the agent accepts (protobuf values); empty = all.
    phases            smallint[]  NOT NULL DEFAULT '{}',
    capacity          integer     NOT NULL CHECK (capacity > 0),
    labels            jsonb       NOT NULL DEFAULT '{}',
    status            text        NOT NULL CHECK (status IN ('healthy', 'stale', 'deregistered')),
    registered_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now(),
    running_task_ids  uuid[]      NOT NULL DEFAULT '{}',
    status_changed_at timestamptz NOT NULL DEFAULT now(),
    completed_tasks   bigint      NOT NULL DEFAULT 0,
    failed_tasks      bigint      NOT NULL DEFAULT 0
);
CREATE INDEX agents_heartbeat ON agents (last_heartbeat_at) WHERE status = 'healthy';

CREATE TABLE tickets (
    id           uuid PRIMARY KEY,
    seq          bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    title        text        NOT NULL,
    description  text        NOT NULL DEFAULT '',
    priority     smallint    NOT NULL CHECK (priority BETWEEN 1 AND 4),
    status       text        NOT NULL CHECK (status IN ('open', 'in_progress', 'completed', 'failed', 'cancelled')),
    repository   text        NOT NULL DEFAULT '',
    labels       jsonb       NOT NULL DEFAULT '{}',
    -- Idempotency key of the create request.
    request_id   text UNIQUE,
    -- False until the task queue has the ticket's tasks; the ticket service
    -- keeps trying until it does.
    tasks_enqueued boolean   NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tickets_status ON tickets (status, seq);
CREATE INDEX tickets_unenqueued ON tickets (seq) WHERE NOT tasks_enqueued;

-- A ticket's plan, and what task events told about each task.
CREATE TABLE ticket_tasks (
    ticket_id   uuid     NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
    task_id     uuid     NOT NULL UNIQUE,
    position    integer  NOT NULL,
    title       text     NOT NULL,
    description text     NOT NULL,
    phase       smallint NOT NULL,
    priority    integer  NOT NULL,
    depends_on  integer[] NOT NULL DEFAULT '{}',
    max_retries integer  NOT NULL,
    timeout_seconds integer NOT NULL,
    started     boolean  NOT NULL DEFAULT false,
    outcome     text CHECK (outcome IN ('completed', 'failed', 'cancelled')),
    PRIMARY KEY (ticket_id, position)
);

-- Events a durable consumer already applied, so that a redelivery changes
-- nothing twice.
CREATE TABLE processed_events (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX processed_events_age ON processed_events (processed_at);
