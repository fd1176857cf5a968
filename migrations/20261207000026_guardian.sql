-- The guardian's interventions recorded on a task: the last one (by its
-- attempt and the agent event it tripped at), so a retried report is one
-- event.
ALTER TABLE tasks ADD COLUMN intervened_attempt int NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN intervened_seq bigint NOT NULL DEFAULT -1;
