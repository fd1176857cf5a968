-- Every change of a task's status writes a new row version, and each
-- version gets an entry in every index whose predicate it meets: a task
-- going through enqueue, claim, start and completion wrote 23 index
-- entries. Indexes that only ever answer for some rows now hold only those
-- rows, with the same answers to the queries that use them.

-- Only tasks with a timeout have a deadline; the timeout monitor's
-- `deadline_at < now()` finds no other.
DROP INDEX tasks_deadline;
CREATE INDEX tasks_deadline ON tasks (deadline_at)
    WHERE status = 'running' AND deadline_at IS NOT NULL;

-- When the next backed-off task becomes ready: only a task whose start was
-- put off (a retry's backoff, a dependency released later) is ever ready
-- later than it was created. A new task is ready at once and has no entry.
DROP INDEX tasks_retry_at;
CREATE INDEX tasks_retry_at ON tasks (next_attempt_at)
    WHERE status = 'pending' AND unmet_deps = 0 AND next_attempt_at > created_at;
-- The count of ready tasks and the oldest one's age (the queue's
-- statistics) were read from tasks_retry_at alone; the ready index carries
-- the time instead, so that they still come from an index, without a
-- second entry per task.
DROP INDEX tasks_ready_phase;
CREATE INDEX tasks_ready_phase ON tasks (phase, priority DESC, seq) INCLUDE (next_attempt_at)
    WHERE status = 'pending' AND unmet_deps = 0;

-- The stream an assignment went out on, next to its agent, in the index of
-- held work: a claim writes one entry there instead of two.
DROP INDEX tasks_session;
DROP INDEX tasks_held;
CREATE INDEX tasks_held ON tasks (assigned_agent_id, assignment_session)
    WHERE status IN ('assigned', 'running');

-- A ticket's tasks; a task of no ticket is never looked up by it.
DROP INDEX tasks_ticket;
CREATE INDEX tasks_ticket ON tasks (ticket_id, seq) WHERE ticket_id IS NOT NULL;

-- Listing by status: most tasks end completed, and those are listed in
-- insertion order (tasks_seq_key) with the status as a filter that nearly
-- every row passes; assigned and running tasks are few and all in
-- tasks_held. Pending tasks and the other ends keep an index of their own.
DROP INDEX tasks_status;
CREATE INDEX tasks_pending ON tasks (seq) WHERE status = 'pending';
CREATE INDEX tasks_ended ON tasks (status, seq) WHERE status IN ('failed', 'timed_out', 'cancelled');
