-- A ticket's work on git. A ticket that names a repository works on one
-- branch (`branch`, fixed at creation) started from `base_ref` (empty: the
-- remote's HEAD); `head_commit` is the last commit a task of it reported.
-- With `pull_request`, the branch ends in a pull request (`pull_request_url`
-- once opened, `pull_request_error` while it cannot be).
ALTER TABLE tickets
    ADD COLUMN base_ref text NOT NULL DEFAULT '',
    ADD COLUMN branch text NOT NULL DEFAULT '',
    ADD COLUMN head_commit text NOT NULL DEFAULT '',
    ADD COLUMN pull_request boolean NOT NULL DEFAULT false,
    ADD COLUMN pull_request_url text NOT NULL DEFAULT '',
    ADD COLUMN pull_request_error text NOT NULL DEFAULT '';

-- What a task's completed attempt left on its ticket's branch (the fields
-- of omoi_domain::GitChange); NULL without a repository.
ALTER TABLE tasks ADD COLUMN git jsonb;
