-- WatchAgents: a write that changes what an agent list shows (an agent
-- registered, deregistered, gone stale or forgotten, a heartbeat flush) is
-- announced once per statement when it commits. Statement-level, and not
-- for the outcome counters, so a batch of heartbeats costs one announcement
-- and finishing tasks none.
CREATE FUNCTION omoi_agents_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('omoi_agents_changed', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER agents_changed
    AFTER INSERT OR DELETE OR UPDATE OF status, last_heartbeat_at, running_task_ids, capacity, phases, labels
    ON agents FOR EACH STATEMENT EXECUTE FUNCTION omoi_agents_changed();
