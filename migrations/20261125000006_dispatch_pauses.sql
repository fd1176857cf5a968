-- Brakes on dispatch: a paused scope (every task, a phase, a ticket, or a
-- phase of a ticket) hands out none of its tasks until resumed. Paused work
-- stays PENDING; running work finishes. Every replica claims through this
-- table, so a pause holds across replicas and restarts.
CREATE TABLE dispatch_pauses (
    -- NULL: any phase (protobuf value otherwise, as tasks.phase).
    phase     smallint,
    -- NULL: any ticket.
    ticket_id uuid,
    reason    text        NOT NULL DEFAULT '',
    paused_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (phase, ticket_id)
);
