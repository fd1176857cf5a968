-- `usage_add` split in two so that PostgreSQL can inline it: a SQL function
-- is inlined into the calling statement only when its body is a plain
-- expression, and the old one's list of models needs a subquery, so every
-- call ran as a function call of its own (about 0.1 ms a row: half a
-- completion batch's time, though most calls add to or from nothing). The
-- old function, unchanged, becomes `usage_merge`; the new `usage_add` keeps
-- the cheap cases in the statement, so that only two real usages pay for
-- the call that merges them.
ALTER FUNCTION usage_add(jsonb, jsonb) RENAME TO usage_merge;

-- The sum of two usages (NULL is nothing spent): see usage_merge.
CREATE FUNCTION usage_add(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN a IS NULL THEN b WHEN b IS NULL THEN a ELSE usage_merge(a, b) END
$$;
