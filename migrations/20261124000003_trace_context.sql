-- The W3C trace context of the request that enqueued a task: its
-- assignment, run and events continue that trace.
ALTER TABLE tasks ADD COLUMN trace_context text;
