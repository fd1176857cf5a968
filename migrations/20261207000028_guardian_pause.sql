-- Why the guardian paused a ticket (its spending signal tripped), until a
-- person sends it on (a task of it starts again, or the ticket's guardian
-- settings or budget are changed); empty: it did not. While set the ticket
-- is PAUSED with that reason, waiting for a person in the inbox.
ALTER TABLE tickets ADD COLUMN guardian_paused text NOT NULL DEFAULT '';
