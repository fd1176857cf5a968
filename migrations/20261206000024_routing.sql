-- Routing by capability: a task may require labels an agent must carry.
--
-- Each distinct set of required labels is stored once and numbered; set 0
-- requires nothing (and every agent satisfies it). The ready index leads
-- with the phase and then the set, so that a claim walks the head of each
-- (phase, set) its agents satisfy and never steps over tasks they cannot
-- take, however many of those wait ahead.
CREATE TABLE requirement_sets (
    id integer PRIMARY KEY,
    requires jsonb NOT NULL UNIQUE
);
INSERT INTO requirement_sets (id, requires) VALUES (0, '{}');
CREATE SEQUENCE requirement_sets_id OWNED BY requirement_sets.id;
ALTER TABLE requirement_sets ALTER COLUMN id SET DEFAULT nextval('requirement_sets_id');

-- The labels as given (NULL: none) and their set's number.
ALTER TABLE tasks ADD COLUMN requires jsonb;
ALTER TABLE tasks ADD COLUMN requirement integer NOT NULL DEFAULT 0;

DROP INDEX tasks_ready_phase;
CREATE INDEX tasks_ready_phase ON tasks (phase, requirement, priority DESC, seq) INCLUDE (next_attempt_at)
    WHERE status = 'pending' AND unmet_deps = 0;

-- Pending tasks with a requirement, for the queue's statistics (which of
-- them no agent can take); a task requiring nothing has no entry.
CREATE INDEX tasks_pending_required ON tasks (requirement, phase)
    WHERE status = 'pending' AND requirement <> 0;

-- A ticket's plan keeps each task's requirement for its re-enqueues.
ALTER TABLE ticket_tasks ADD COLUMN requires jsonb;

-- Known to hold a row or so: the claim's plan counts on few sets.
ANALYZE requirement_sets;

-- A ticket's own check, run by the executor after each agent's work.
ALTER TABLE tickets ADD COLUMN check_command text NOT NULL DEFAULT '';

-- Best-of-N: a candidate attempt at another task (which depends on it),
-- numbered from 1; a plan keeps them by position.
ALTER TABLE tasks ADD COLUMN candidate_of uuid;
ALTER TABLE tasks ADD COLUMN candidate smallint;
ALTER TABLE ticket_tasks ADD COLUMN candidate_of integer;
ALTER TABLE ticket_tasks ADD COLUMN candidate smallint;
-- The candidates of a choosing task (looked up when either goes round again).
CREATE INDEX tasks_candidate_of ON tasks (candidate_of) WHERE candidate_of IS NOT NULL;
