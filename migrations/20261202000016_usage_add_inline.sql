-- `usage_add` split in two so that PostgreSQL can inline it: a SQL function
-- is inlined into the calling statement only when its body is a plain
-- expression, and the old one's list of models needs a subquery, so every
-- call ran as a function call of its own (about 0.1 ms a row: half a
-- completion batch's time, though most calls add to or from nothing). The
-- cheap cases now stay in the statement; only two real usages pay for the
-- call that merges them.
CREATE FUNCTION usage_merge(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'input_tokens', COALESCE((a->>'input_tokens')::bigint, 0) + COALESCE((b->>'input_tokens')::bigint, 0),
        'output_tokens', COALESCE((a->>'output_tokens')::bigint, 0) + COALESCE((b->>'output_tokens')::bigint, 0),
        'cache_read_tokens', COALESCE((a->>'cache_read_tokens')::bigint, 0) + COALESCE((b->>'cache_read_tokens')::bigint, 0),
        'cache_write_tokens', COALESCE((a->>'cache_write_tokens')::bigint, 0) + COALESCE((b->>'cache_write_tokens')::bigint, 0),
        'cost_usd', COALESCE((a->>'cost_usd')::float8, 0) + COALESCE((b->>'cost_usd')::float8, 0),
        'cost_estimated', COALESCE((a->>'cost_estimated')::boolean, false) OR COALESCE((b->>'cost_estimated')::boolean, false),
        'model', (SELECT COALESCE(string_agg(m, ', ' ORDER BY first), '')
                  FROM (SELECT m, min(o) AS first
                        FROM unnest(string_to_array(COALESCE(a->>'model', '') || ', ' || COALESCE(b->>'model', ''), ', '))
                             WITH ORDINALITY AS x(m, o)
                        WHERE m <> ''
                        GROUP BY m) models),
        'turns', COALESCE((a->>'turns')::int, 0) + COALESCE((b->>'turns')::int, 0),
        'duration_ms', COALESCE((a->>'duration_ms')::bigint, 0) + COALESCE((b->>'duration_ms')::bigint, 0))
$$;

-- The sum of two usages (NULL is nothing spent): see usage_merge.
CREATE OR REPLACE FUNCTION usage_add(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN a IS NULL THEN b WHEN b IS NULL THEN a ELSE usage_merge(a, b) END
$$;
