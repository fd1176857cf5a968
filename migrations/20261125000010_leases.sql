-- Running tasks are held by a lease: the first `OMOI_LEASE_SECONDS` after
-- their start, then for as long as their agent's heartbeats list them, or
-- until `lease_expires_at` when ExtendLease set it. A task nobody holds goes
-- back to the queue as a retry.
ALTER TABLE tasks ADD COLUMN lease_expires_at timestamptz;
CREATE INDEX tasks_running_started ON tasks (started_at) WHERE status = 'running';
