-- A ticket's own guardian thresholds (CreateTicketRequest.guardian), where
-- they differ from the deployment's.
ALTER TABLE tickets ADD COLUMN guardian jsonb NOT NULL DEFAULT '{}';
