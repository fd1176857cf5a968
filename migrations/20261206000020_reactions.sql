-- Reactions: follow-ups the forge starts on a ticket's pull request (a
-- failing check suite, a mention), at most max_reactions of them.
ALTER TABLE tickets
    ADD COLUMN max_reactions integer NOT NULL DEFAULT 5,
    ADD COLUMN reactions integer NOT NULL DEFAULT 0;

-- One row per reaction started: the delivery it came in (each acted on
-- once, whichever replica gets it, however often it is redelivered) and
-- what it answers (one per check suite's commit, one per comment).
CREATE TABLE ticket_reactions (
    ticket_id uuid NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
    kind text NOT NULL,
    key text NOT NULL,
    delivery_id text NOT NULL UNIQUE,
    url text NOT NULL,
    task_id uuid NOT NULL,
    -- A review's comments, answered (replied) once its follow-up landed.
    pull_number bigint NOT NULL DEFAULT 0,
    reply_to bigint[] NOT NULL DEFAULT '{}',
    replied bigint[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ticket_id, kind, key)
);

CREATE INDEX ticket_reactions_task ON ticket_reactions (task_id);

-- Where a ticket came from when not from CreateTicket: a GitHub issue
-- (`github_issue` and its address).
ALTER TABLE tickets
    ADD COLUMN source_kind text NOT NULL DEFAULT '',
    ADD COLUMN source_url text NOT NULL DEFAULT '';

-- A delivery names the ticket by its pull request or its branch.
CREATE INDEX tickets_pull_request_url ON tickets (pull_request_url) WHERE pull_request_url <> '';
CREATE INDEX tickets_branch ON tickets (branch) WHERE branch <> '';
