-- The reaction a ticket's cap turned away (`kind: url`): the ticket stays
-- PAUSED for a person until its cap is raised past what it used.
ALTER TABLE tickets ADD COLUMN reaction_refused text NOT NULL DEFAULT '';

-- When a push last moved the base of the ticket's pull request: whether it
-- still merges cleanly is to be asked of the forge (until it answers).
ALTER TABLE tickets ADD COLUMN merge_check_since timestamptz;
CREATE INDEX tickets_merge_check ON tickets (merge_check_since) WHERE merge_check_since IS NOT NULL;
