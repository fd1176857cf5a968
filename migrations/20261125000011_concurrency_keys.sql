-- Concurrency keys: tasks sharing a key (a ticket's tasks default to its
-- repository) are never more ASSIGNED or RUNNING at once than the key's
-- limit. A claim that may hand out a limited key's tasks first locks the
-- key's row in concurrency_limits, so replicas count and claim one after
-- the other for that key only; keys without a limit cost nothing.
ALTER TABLE tasks ADD COLUMN concurrency_key text;
ALTER TABLE ticket_tasks ADD COLUMN concurrency_key text;

CREATE TABLE concurrency_limits (
    key         text        PRIMARY KEY,
    max_running integer     NOT NULL CHECK (max_running >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- How many of a key's tasks are out, counted under the key's lock.
CREATE INDEX tasks_key_held ON tasks (concurrency_key)
    WHERE status IN ('assigned', 'running') AND concurrency_key IS NOT NULL;
-- A key's ready tasks in claim order.
CREATE INDEX tasks_key_ready ON tasks (concurrency_key, priority DESC, seq)
    WHERE status = 'pending' AND unmet_deps = 0 AND concurrency_key IS NOT NULL;
