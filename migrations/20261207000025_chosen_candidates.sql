-- A person's choice of another candidate of a best-of-N step: a task that
-- lands the candidate it depends on in place of the one chosen.
ALTER TABLE tasks ADD COLUMN lands_candidate boolean NOT NULL DEFAULT false;
ALTER TABLE ticket_tasks ADD COLUMN lands_candidate boolean NOT NULL DEFAULT false;
