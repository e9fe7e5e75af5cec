-- 0002: blocked tool commands, response masking choices, and an index for find-secret.
--
-- Same rules as 0001: `{db}` is the configured database, a `;` at the end of a line ends a
-- statement, and every statement is idempotent (IF NOT EXISTS, OR REPLACE), so a migration
-- interrupted halfway is simply run again, on chDB and on a server alike.

-- blocked_tools: the tool_use blocks the forwarder's command guardrails stopped
-- (CallCompleted.blocked_tools), one named tuple per block.
--
-- groupUniqArrayArray, like masked_fingerprints: folding the same CallCompleted twice (a
-- redelivery) keeps one entry per block, and rows without blocks (every other event) add
-- nothing. Named tuple elements query naturally:
--   SELECT call_id FROM calls WHERE arrayExists(b -> b.rule_id = 'destructive-shell', blocked_tools)
ALTER TABLE {db}.call_parts
    ADD COLUMN IF NOT EXISTS blocked_tools SimpleAggregateFunction(groupUniqArrayArray, Array(Tuple(
        tool_use_id String,
        tool String,
        rule_id String,
        reason String,
        action String)))
    COMMENT 'Tool_use blocks the forwarder blocked (CallCompleted.blocked_tools).';

-- response_mask: which detector types the latest decision told the forwarder to mask in the
-- response, for the caller (upstream) and for the record. Led by the decision time, so `max`
-- picks the same CallDecided as `decided` (a call held for approval is decided twice).
ALTER TABLE {db}.call_parts
    ADD COLUMN IF NOT EXISTS response_mask SimpleAggregateFunction(max, Tuple(
        at DateTime64(6, 'UTC'),
        upstream Array(String),
        record Array(String)))
    COMMENT 'CallDecided.response_mask_upstream / response_mask_record of the latest decision.';

-- find-secret looks a fingerprint up with has(masked_fingerprints, ...) on call_parts; without
-- an index that reads every row. A bloom filter per granule skips the granules that cannot hold
-- it. Rows are ordered by call id (time), so a filter covers a few thousand calls.
ALTER TABLE {db}.call_parts
    ADD INDEX IF NOT EXISTS idx_masked_fingerprints masked_fingerprints TYPE bloom_filter(0.001) GRANULARITY 1;

-- Parts written before the index existed get it too (a background mutation; merges build it for
-- new parts anyway). Running it again only rebuilds the same index.
ALTER TABLE {db}.call_parts MATERIALIZE INDEX idx_masked_fingerprints;

-- calls: 0001's view, every column kept, plus blocked_tools, response_mask_upstream and
-- response_mask_record.
CREATE OR REPLACE VIEW {db}.calls AS
SELECT
    call_id,
    p_session_id AS session_id,
    tupleElement(p_ident, 'subject') AS subject,
    tupleElement(p_ident, 'issuer') AS issuer,
    tupleElement(p_ident, 'username') AS username,
    tupleElement(p_ident, 'email') AS email,
    tupleElement(p_ident, 'groups') AS groups,
    tupleElement(p_ident, 'client_id') AS client_id,
    tupleElement(p_ident, 'token_id') AS token_id,
    coalesce(tupleElement(p_request, 'model'), tupleElement(p_terminal, 'response_model')) AS model,
    tupleElement(p_request, 'mode') AS mode,
    tupleElement(p_request, 'stream') AS stream,
    tupleElement(p_request, 'method') AS method,
    tupleElement(p_request, 'path') AS path,
    tupleElement(p_request, 'client_ip') AS client_ip,
    tupleElement(p_request, 'user_agent') AS user_agent,
    p_submitted_at AS submitted_at,
    if(p_decided_known, tupleElement(p_decided, 'at'), NULL) AS decided_at,
    if(p_terminal_state, tupleElement(p_state, 'at'), NULL) AS completed_at,
    if(p_decided_known, tupleElement(p_decided, 'decision'), NULL) AS decision,
    if(p_decided_known, tupleElement(p_decided, 'reason'), NULL) AS reason,
    tupleElement(p_decided, 'rule_ids') AS rule_ids,
    tupleElement(p_decided, 'tags') AS tags,
    tupleElement(p_decided, 'bundle_version') AS bundle_version,
    if(p_decided_known, tupleElement(p_decided, 'fail_open'), NULL) AS fail_open,
    coalesce(
        tupleElement(p_terminal, 'upstream'),
        nullIf(tupleElement(p_decided, 'upstream'), ''),
        tupleElement(p_request, 'upstream')) AS upstream,
    if(tupleElement(p_state, 'rank') = 0, 'unknown', tupleElement(p_state, 'name')) AS state,
    if(p_terminal_state, tupleElement(p_state, 'status'), NULL) AS status,
    tupleElement(p_decided, 'request_body') AS request_body,
    tupleElement(p_terminal, 'response_body') AS response_body,
    coalesce(
        tupleElement(p_terminal, 'error_type'),
        if(p_refused, tupleElement(p_decided, 'error_type'), NULL)) AS error_type,
    coalesce(
        tupleElement(p_terminal, 'error_message'),
        if(p_refused, tupleElement(p_decided, 'reason'), NULL)) AS error_message,
    tupleElement(p_terminal, 'stage') AS error_stage,
    tupleElement(p_terminal, 'attempts') AS attempts,
    tupleElement(p_terminal, 'attempts_detail') AS attempts_detail,
    tupleElement(p_terminal, 'input_tokens') AS input_tokens,
    tupleElement(p_terminal, 'output_tokens') AS output_tokens,
    tupleElement(p_terminal, 'latency_ms') AS latency_ms,
    if(p_terminal_state AND p_submitted_at IS NOT NULL,
        (toUnixTimestamp64Micro(tupleElement(p_state, 'at')) - toUnixTimestamp64Micro(p_submitted_at)) / 1000.0,
        NULL) AS total_ms,
    tupleElement(p_terminal, 'upstream_request_id') AS upstream_request_id,
    tupleElement(p_terminal, 'stop_reason') AS stop_reason,
    tupleElement(p_terminal, 'response_model') AS response_model,
    p_approval_id AS approval_id,
    p_approval_decisions AS approval_decisions,
    p_masked_types AS masked_types,
    p_masked_fingerprints AS masked_fingerprints,
    p_first_event_at AS first_event_at,
    p_last_event_at AS last_event_at,
    p_blocked_tools AS blocked_tools,
    tupleElement(p_response_mask, 'upstream') AS response_mask_upstream,
    tupleElement(p_response_mask, 'record') AS response_mask_record
FROM
(
    SELECT
        call_id,
        max(session_id) AS p_session_id,
        max(ident) AS p_ident,
        max(request) AS p_request,
        min(submitted_at) AS p_submitted_at,
        min(first_event_at) AS p_first_event_at,
        max(last_event_at) AS p_last_event_at,
        max(decided) AS p_decided,
        max(state) AS p_state,
        max(terminal) AS p_terminal,
        max(approval_id) AS p_approval_id,
        arraySort(groupUniqArrayArray(approval_decisions)) AS p_approval_decisions,
        arraySort(groupUniqArrayArray(masked_types)) AS p_masked_types,
        arraySort(groupUniqArrayArray(masked_fingerprints)) AS p_masked_fingerprints,
        arraySort(groupUniqArrayArray(blocked_tools)) AS p_blocked_tools,
        max(response_mask) AS p_response_mask,
        toUnixTimestamp64Micro(tupleElement(max(decided), 'at')) > 0 AS p_decided_known,
        tupleElement(max(state), 'rank') >= 90 AS p_terminal_state,
        tupleElement(max(state), 'name') IN ('denied', 'rate_limited') AS p_refused
    FROM {db}.call_parts
    GROUP BY call_id
)
COMMENT 'One row per call: identity, request, decision, outcome. Bodies are the masked records.';
