-- The reaction a ticket's cap turned away (`kind: url`): the ticket stays
-- PAUSED for a person until its cap is raised past what it used.
ALTER TABLE tickets ADD COLUMN reaction_refused text NOT NULL DEFAULT '';
