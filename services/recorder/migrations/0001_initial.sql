-- 0001: the audit store's first schema.
--
-- Runs unchanged on embedded chDB and on a ClickHouse server: `{db}` is replaced by the configured
-- database name, statements are separated by a `;` at the end of a line, and every statement is
-- idempotent (IF NOT EXISTS) because ClickHouse DDL is not transactional: a migration interrupted
-- halfway is simply run again.

-- events: the raw log of every skillgate topic, one row per event.
--
-- ReplacingMergeTree keyed on (call_id, event_id): a redelivered event (same event id) collapses
-- into one row. The recorder also skips event ids it already stored before inserting, so plain
-- counts are exact in practice; `FINAL` makes them exact in every case.
-- Why this ORDER BY: call ids are UUIDv7 (time-ordered), so sorting by call id keeps the table in
-- arrival order (time-range scans read contiguous granules, pruned by the minmax index on `time`
-- and the monthly partitions) while one call's events sit together for call lookups. The event
-- time is deliberately not part of the key: a service that reprocesses a message re-emits the same
-- event id with a new time, and that copy must still collapse.
-- `payload` is the event as JSON without any bytes field (bodies, dead-letter values): the raw
-- bodies are either unmasked or caller-facing and never enter the store (DESIGN.md invariant 3).
CREATE TABLE IF NOT EXISTS {db}.events
(
    event_id String COMMENT 'Unique event id; inserts are idempotent on it.',
    topic LowCardinality(String) COMMENT 'Kafka topic the event was read from.',
    event_type LowCardinality(String) COMMENT 'Schema name: CallSubmitted, CallDecided, ...',
    call_id String COMMENT 'Call the event belongs to (UUIDv7); empty for events about no call.',
    session_id String COMMENT 'Session of the call (the Kafka key).',
    time DateTime64(6, 'UTC') COMMENT 'When the event was created.',
    subject String COMMENT 'OIDC subject of the actor (caller, approver or publisher).',
    issuer LowCardinality(String) COMMENT 'OIDC issuer of the actor.',
    username Nullable(String) COMMENT 'preferred_username of the actor.',
    email Nullable(String) COMMENT 'E-mail of the actor.',
    groups Array(LowCardinality(String)) COMMENT 'Groups of the actor.',
    client_id Nullable(String) COMMENT 'OAuth client of the token.',
    token_id Nullable(String) COMMENT 'jti of the token (never the token).',
    bundle_version LowCardinality(Nullable(String)) COMMENT 'Policy bundle version that applied.',
    kafka_partition Int32 COMMENT 'Partition the event was read from.',
    kafka_offset Int64 COMMENT 'Offset it had (of the first copy stored).',
    payload String CODEC(ZSTD(3)) COMMENT 'The event as JSON, without bodies or other bytes fields.',
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6) COMMENT 'When the recorder stored it.',
    INDEX idx_time time TYPE minmax GRANULARITY 1,
    INDEX idx_session session_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_subject subject TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_event_id event_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(time)
ORDER BY (call_id, event_id)
COMMENT 'Every event of every skillgate topic (bodies excluded). Deduplicated on event_id; use FINAL for exact counts.';

-- call_parts: one partial row per call event; merges fold them into one row per call.
--
-- Each event fills only what it knows; the rest of its row holds the neutral value of the column's
-- aggregate (NULL, an empty array, or a tuple that sorts first). Every aggregate is max/min/
-- groupUniqArray, so folding the same event twice changes nothing: redelivery is harmless here
-- without any deduplication. Groups of fields that must come from the same event are tuples
-- compared by a leading rank or time, so `max` picks the whole winning event at once:
--   ident    the caller (CallSubmitted > CallDecided > CallCompleted/CallFailed by `prio`);
--   request  what was asked (CallSubmitted > CallDecided);
--   decided  the latest CallDecided (a call held for approval is decided twice);
--   state    lifecycle rank: terminal states outrank running ones, and an authoritative event
--            (CallCompleted, CallFailed, CallDecided) beats a hint (CallReply, ForwarderClaim);
--   terminal the CallCompleted or CallFailed (completed outranks failed).
-- Read it through the `calls` view, which groups by call_id with the same functions, so results
-- are right before, during and after background merges.
CREATE TABLE IF NOT EXISTS {db}.call_parts
(
    call_id String,
    call_month UInt32 COMMENT 'YYYYMM from the UUIDv7 call id (0 for other ids): one partition per call.',
    session_id SimpleAggregateFunction(max, String),
    ident SimpleAggregateFunction(max, Tuple(
        prio UInt8,
        subject Nullable(String),
        issuer Nullable(String),
        username Nullable(String),
        email Nullable(String),
        groups Array(String),
        client_id Nullable(String),
        token_id Nullable(String))),
    request SimpleAggregateFunction(max, Tuple(
        prio UInt8,
        model Nullable(String),
        mode Nullable(String),
        stream Nullable(Bool),
        method Nullable(String),
        path Nullable(String),
        upstream Nullable(String),
        client_ip Nullable(String),
        user_agent Nullable(String),
        ingress_instance Nullable(String))),
    submitted_at SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    first_event_at SimpleAggregateFunction(min, DateTime64(6, 'UTC')),
    last_event_at SimpleAggregateFunction(max, DateTime64(6, 'UTC')),
    decided SimpleAggregateFunction(max, Tuple(
        at DateTime64(6, 'UTC'),
        decision String,
        reason String,
        rule_ids Array(String),
        tags Array(String),
        bundle_version Nullable(String),
        upstream String,
        status Int32,
        error_type Nullable(String),
        request_body Nullable(String),
        fail_open Bool)),
    state SimpleAggregateFunction(max, Tuple(
        rank UInt8,
        authority UInt8,
        at DateTime64(6, 'UTC'),
        name String,
        status Nullable(Int32))),
    terminal SimpleAggregateFunction(max, Tuple(
        rank UInt8,
        at DateTime64(6, 'UTC'),
        status Int32,
        upstream Nullable(String),
        response_body Nullable(String),
        error_type Nullable(String),
        error_message Nullable(String),
        stage Nullable(String),
        attempts UInt16,
        attempts_detail String,
        input_tokens Nullable(Int64),
        output_tokens Nullable(Int64),
        latency_ms Nullable(Float64),
        upstream_request_id Nullable(String),
        stop_reason Nullable(String),
        response_model Nullable(String))),
    approval_id SimpleAggregateFunction(max, Nullable(String)),
    approval_decisions SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    masked_types SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    masked_fingerprints SimpleAggregateFunction(groupUniqArrayArray, Array(String))
)
ENGINE = AggregatingMergeTree
PARTITION BY call_month
ORDER BY call_id
COMMENT 'Partial call rows, folded per call_id by merges. Query the calls view instead.';

-- calls: one row per call, the documented way to read call_parts.
--
-- state is the latest known lifecycle state (submitted, pending_approval, approved, allowed,
-- forwarding) unless a terminal one is known (denied, rate_limited, expired, failed, completed).
-- request_body is the masked request as recorded (CallDecided.record_body, else its body);
-- response_body the masked response (CallCompleted.body) or the relayed error (CallFailed.body).
-- Times are UTC. `WHERE call_id = ...` is pushed below the GROUP BY, so lookups read one call.
CREATE VIEW IF NOT EXISTS {db}.calls AS
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
    p_last_event_at AS last_event_at
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
        toUnixTimestamp64Micro(tupleElement(max(decided), 'at')) > 0 AS p_decided_known,
        tupleElement(max(state), 'rank') >= 90 AS p_terminal_state,
        tupleElement(max(state), 'name') IN ('denied', 'rate_limited') AS p_refused
    FROM {db}.call_parts
    GROUP BY call_id
)
COMMENT 'One row per call: identity, request, decision, outcome. Bodies are the masked records.';
