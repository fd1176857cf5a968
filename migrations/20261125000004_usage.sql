-- What agents spent (tokens, money, turns, time) as reported per attempt:
-- a task keeps the sum over its attempts, a ticket over its tasks'. The
-- JSON object has the fields of omoi_domain::Usage; absent fields are zero.
ALTER TABLE tasks ADD COLUMN usage jsonb;
ALTER TABLE tickets ADD COLUMN usage jsonb;

-- The sum of two usages (NULL is nothing spent). Counts and costs add up;
-- the cost is estimated if either part was; models are kept as a list of
-- the distinct names, joined by ', '.
CREATE FUNCTION usage_add(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN a IS NULL THEN b
        WHEN b IS NULL THEN a
        ELSE jsonb_build_object(
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
    END
$$;
