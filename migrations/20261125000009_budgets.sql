-- Budgets: a ticket may cap what its agents spend (USD over all attempts).
-- Once its usage reaches the cap it is PAUSED (why in paused_reason): the
-- task queue dispatches none of its tasks until the cap is raised.
ALTER TABLE tickets DROP CONSTRAINT tickets_status_check;
ALTER TABLE tickets ADD CONSTRAINT tickets_status_check
    CHECK (status IN ('open', 'in_progress', 'paused', 'completed', 'failed', 'cancelled'));
ALTER TABLE tickets
    ADD COLUMN max_cost_usd float8 CHECK (max_cost_usd > 0),
    ADD COLUMN paused_reason text NOT NULL DEFAULT '';
