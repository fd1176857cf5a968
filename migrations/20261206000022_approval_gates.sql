-- Approval gates: phases of a ticket's plan that wait for a person before
-- they start. While one awaits a decision the ticket is AWAITING_APPROVAL;
-- the task queue holds the phase's dispatch (a pause of the phase and the
-- ticket) until the gate is approved or the ticket ends.
ALTER TABLE tickets DROP CONSTRAINT tickets_status_check;
ALTER TABLE tickets ADD CONSTRAINT tickets_status_check
    CHECK (status IN ('open', 'in_progress', 'paused', 'awaiting_approval', 'completed', 'failed', 'cancelled'));
ALTER TABLE tickets ADD COLUMN approvals smallint[] NOT NULL DEFAULT '{}';

CREATE TABLE ticket_gates (
    ticket_id uuid NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
    phase smallint NOT NULL,
    state text NOT NULL DEFAULT 'waiting'
        CHECK (state IN ('waiting', 'awaiting_approval', 'changes_requested', 'approved')),
    -- How many times approval was asked, and when last.
    rounds integer NOT NULL DEFAULT 0,
    requested_at timestamptz,
    -- What it asked to approve: the tasks whose work the phase builds on.
    review_task_ids uuid[] NOT NULL DEFAULT '{}',
    -- The last decision.
    decided_by text NOT NULL DEFAULT '',
    decided_at timestamptz,
    comment text NOT NULL DEFAULT '',
    -- Each request for changes: [{comment, requested_by, requested_at, task_id}].
    change_requests jsonb NOT NULL DEFAULT '[]',
    -- False while the queue may still hold the phase's dispatch: set once
    -- an approval (or the ticket's end) has released it there.
    released boolean NOT NULL DEFAULT false,
    PRIMARY KEY (ticket_id, phase)
);
CREATE INDEX ticket_gates_held ON ticket_gates (ticket_id) WHERE NOT released;

-- What each completed task said it did (its result's summary), for what a
-- person is asked to approve.
ALTER TABLE ticket_tasks ADD COLUMN summary text NOT NULL DEFAULT '';
