-- Whether anything depends on a task. A completion must release its task's
-- dependents in a statement of its own, inside the completion's
-- transaction: that statement's snapshot has to include the dependents
-- enqueued by transactions the completion waited for. A task nothing
-- depends on needs neither, and its completion is one autocommit
-- statement that skips any task with the flag set.
--
-- The flag is set on the dependency's row by the transaction that adds the
-- dependent, before it commits: an enqueue sets it where it locks the
-- stored dependencies, and the trigger sets it for every edge inserted
-- (whatever inserts it). A completion that meets the row locked waits, and
-- then sees the flag on the row's latest version.
ALTER TABLE tasks ADD COLUMN has_dependents boolean NOT NULL DEFAULT false;

CREATE FUNCTION omoi_dependents_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasks t SET has_dependents = true
    FROM (SELECT DISTINCT depends_on FROM added) a
    WHERE t.id = a.depends_on AND NOT t.has_dependents;
    RETURN NULL;
END
$$;

CREATE TRIGGER task_dependencies_added AFTER INSERT ON task_dependencies
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION omoi_dependents_added();

-- Edges stored before the trigger existed (the trigger's lock on the table
-- keeps new ones from slipping in between).
UPDATE tasks SET has_dependents = true
WHERE id IN (SELECT depends_on FROM task_dependencies) AND NOT has_dependents;
