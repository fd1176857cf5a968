-- The task whose failure or cancellation cancelled this one (transitively):
-- an operator's retry of that task brings this one back with it.
ALTER TABLE tasks ADD COLUMN cancelled_by uuid;
CREATE INDEX tasks_cancelled_by ON tasks (cancelled_by) WHERE status = 'cancelled';
