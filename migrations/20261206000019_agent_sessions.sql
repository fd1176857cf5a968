-- The agent session a task's attempts last recorded (runner, the agent's
-- own session id, the latest checkpoint in the OMOI_SESSIONS object
-- store), read by the next attempt to resume the conversation.
ALTER TABLE tasks ADD COLUMN session jsonb;

-- A follow-up is one more task on a ticket, added after the plan: it
-- resumes the session of the task named in `resumes`. A reopened ticket is
-- judged by its follow-ups. `enqueued` is false until the task queue holds
-- the follow-up's task (the ticket service retries until it does).
ALTER TABLE ticket_tasks
    ADD COLUMN follow_up boolean NOT NULL DEFAULT false,
    ADD COLUMN resumes uuid,
    ADD COLUMN enqueued boolean NOT NULL DEFAULT true,
    ADD COLUMN added_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX ticket_tasks_unenqueued ON ticket_tasks (ticket_id) WHERE NOT enqueued;
