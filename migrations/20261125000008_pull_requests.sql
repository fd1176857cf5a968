-- Opening a completed ticket's pull request: when the next attempt is due
-- ('-infinity': at once; 'infinity': never again, the forge refused) and
-- how many were made. Any replica of the ticket service may take a due
-- ticket (FOR UPDATE SKIP LOCKED), so each is worked by one at a time.
ALTER TABLE tickets
    ADD COLUMN pull_request_next_at timestamptz NOT NULL DEFAULT '-infinity',
    ADD COLUMN pull_request_attempts int NOT NULL DEFAULT 0;

CREATE INDEX tickets_pull_requests_due ON tickets (pull_request_next_at)
    WHERE pull_request AND pull_request_url = '' AND status = 'completed';
