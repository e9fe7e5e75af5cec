-- 0004: time to first token of streamed calls, and cheaper inserts for the per-call tables.
--
-- Same rules as 0001-0003: `{db}` is the configured database, a `;` at the end of a line ends a
-- statement, every statement is idempotent, on chDB and on a ClickHouse server alike.

-- first_token_ms: CallCompleted.first_token_ms of a streamed call (upstream request sent ->
-- first content delta received by the forwarder). `max` folds redeliveries of the one event.
ALTER TABLE {db}.call_parts
    ADD COLUMN IF NOT EXISTS first_token_ms SimpleAggregateFunction(max, Nullable(Float64))
    COMMENT 'Streamed calls: ms from sending the upstream request to the first content delta.';

ALTER TABLE {db}.call_records
    ADD COLUMN IF NOT EXISTS first_token_ms Nullable(Float64)
    COMMENT 'Streamed calls: time to first token, ms from sending the upstream request to the first content delta (NULL when not streamed).'
    AFTER blocked_tools;

-- The recorder inserts a few thousand rows per batch. In the Wide part format every column (and
-- every element of every tuple, every null map) is its own file: creating ~100 files per insert
-- cost more than the rows themselves. Parts stay Compact (one file) until merges make them larger
-- than 256 MB, where the Wide format pays off for reads.
ALTER TABLE {db}.call_parts MODIFY SETTING min_bytes_for_wide_part = 268435456;

ALTER TABLE {db}.call_records MODIFY SETTING min_bytes_for_wide_part = 268435456;
