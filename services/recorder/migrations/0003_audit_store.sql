-- 0003: the investigator's and analyst's audit store (issue 6).
--
-- Same rules as 0001/0002: `{db}` is the configured database, a `;` at the end of a line ends a
-- statement, every statement is idempotent (IF NOT EXISTS), so an interrupted migration is run
-- again as it is, on chDB and on a ClickHouse server alike. Retention (TTL) is not set here: the
-- recorder applies it from its settings at every start (services/recorder/retention.py), so
-- changing SKILLGATE_RETENTION_* needs no new migration.

-- call_records: one wide row per call, what search, replay, export and the usage views read.
--
-- Written by the recorder after each batch for every call the batch touched, from the folded
-- `calls` view plus what only Python derives from the masked bodies (skills, tools, conversation
-- hashes, the resolved session). A call touched by several batches gets several versions;
-- ReplacingMergeTree(version) keeps the newest, and readers use FINAL.
-- Why ORDER BY (time, call_id): `time` is the UUIDv7 call id's own timestamp, so it never changes
-- between versions (a replacing key must not), every search is a time range read newest-first
-- in key order, and (time, call_id) is the keyset of the search API's cursor. User, session,
-- conversation and fingerprint questions use the bloom filters below; keyword questions the
-- `text` indexes. Bodies are the masked records only, compressed with ZSTD.
CREATE TABLE IF NOT EXISTS {db}.call_records
(
    call_id String COMMENT 'Call id (UUIDv7).',
    time DateTime64(3, 'UTC') COMMENT 'Call time: the UUIDv7 timestamp of the call id (else its first event).',
    session_id String COMMENT 'Resolved session: the x-skillgate-session header, else the session of the call whose conversation this one extends, else the call id.',
    session_source LowCardinality(String) COMMENT 'header | conversation | call: how session_id was found.',
    conversation_hash String COMMENT 'Hash of (subject, system, messages) of the request.',
    parent_hash String COMMENT 'Hash of the conversation without its last assistant turn and user turn ("" for a first turn).',
    subject String COMMENT 'OIDC subject of the caller.',
    issuer LowCardinality(String),
    username Nullable(String),
    email Nullable(String),
    groups Array(LowCardinality(String)),
    client_id Nullable(String),
    model LowCardinality(String),
    skills Array(LowCardinality(String)) COMMENT 'Claude Skills the request named (container.skills[].skill_id).',
    tools Array(LowCardinality(String)) COMMENT 'Tools the request declared and the response used (names).',
    mode LowCardinality(String),
    stream Bool,
    path LowCardinality(String),
    state LowCardinality(String) COMMENT 'Latest lifecycle state (completed, failed, denied, expired, ...).',
    decision LowCardinality(String) COMMENT 'Policy decision: allow, deny, require_approval, rate_limited ("" while undecided).',
    reason String,
    rule_ids Array(LowCardinality(String)),
    tags Array(LowCardinality(String)),
    bundle_version LowCardinality(String),
    approval_id String,
    approval_decisions Array(String) COMMENT 'decision:approver-subject of each approval decision.',
    status Nullable(Int32) COMMENT 'Final HTTP status (the upstream status for a forwarded call).',
    input_tokens Nullable(Int64),
    output_tokens Nullable(Int64),
    latency_ms Nullable(Float64) COMMENT 'Upstream latency.',
    total_ms Nullable(Float64) COMMENT 'Submitted to terminal state.',
    stop_reason Nullable(String),
    error_type Nullable(String),
    error_message Nullable(String),
    submitted_at Nullable(DateTime64(6, 'UTC')),
    completed_at Nullable(DateTime64(6, 'UTC')),
    request_body String CODEC(ZSTD(3)) COMMENT 'Masked request as recorded ("" once bodies retention expired).',
    response_body String CODEC(ZSTD(3)) COMMENT 'Masked response (or the relayed error body).',
    masked_types Array(LowCardinality(String)),
    masked_fingerprints Array(String) COMMENT 'HMAC fingerprints of the masked values.',
    blocked_tools UInt16 COMMENT 'Number of tool_use blocks the forwarder blocked.',
    counted UInt8 COMMENT '1 on the version written when the call''s terminal event was first stored: the usage views count these.',
    version UInt64 COMMENT 'Replacing version (microseconds of the write).',
    INDEX idx_request lower(request_body) TYPE text(tokenizer = splitByNonAlpha),
    INDEX idx_response lower(response_body) TYPE text(tokenizer = splitByNonAlpha),
    INDEX idx_subject subject TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_session session_id TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_conversation conversation_hash TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_call call_id TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_fingerprints masked_fingerprints TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(time)
ORDER BY (time, call_id)
COMMENT 'One wide row per call (newest version wins: read with FINAL). Masked bodies only.';

-- Usage per user and model per day, from the counted version of each call (one per terminal call).
CREATE TABLE IF NOT EXISTS {db}.usage_daily
(
    day Date,
    subject String,
    model LowCardinality(String),
    calls UInt64,
    errors UInt64 COMMENT 'Calls that ended failed.',
    denied UInt64 COMMENT 'Calls policy denied or rate limited.',
    input_tokens UInt64,
    output_tokens UInt64,
    latency_ms_sum Float64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, subject, model)
COMMENT 'Calls and tokens per user, model and day. Always sum() with GROUP BY (rows merge lazily).';

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_daily_mv TO {db}.usage_daily AS
SELECT
    toDate(time) AS day,
    subject,
    model,
    toUInt64(1) AS calls,
    toUInt64(state = 'failed') AS errors,
    toUInt64(state IN ('denied', 'rate_limited')) AS denied,
    toUInt64(greatest(ifNull(input_tokens, 0), 0)) AS input_tokens,
    toUInt64(greatest(ifNull(output_tokens, 0), 0)) AS output_tokens,
    ifNull(latency_ms, 0) AS latency_ms_sum
FROM {db}.call_records
WHERE counted = 1;

CREATE TABLE IF NOT EXISTS {db}.usage_group_daily
(
    day Date,
    group_name LowCardinality(String),
    model LowCardinality(String),
    calls UInt64,
    input_tokens UInt64,
    output_tokens UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, group_name, model)
COMMENT 'Calls and tokens per caller group, model and day (a call counts once in each of its groups).';

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_group_daily_mv TO {db}.usage_group_daily AS
SELECT
    toDate(time) AS day,
    arrayJoin(if(empty(groups), [''], groups)) AS group_name,
    model,
    toUInt64(1) AS calls,
    toUInt64(greatest(ifNull(input_tokens, 0), 0)) AS input_tokens,
    toUInt64(greatest(ifNull(output_tokens, 0), 0)) AS output_tokens
FROM {db}.call_records
WHERE counted = 1;

CREATE TABLE IF NOT EXISTS {db}.usage_skill_daily
(
    day Date,
    skill LowCardinality(String),
    model LowCardinality(String),
    calls UInt64,
    input_tokens UInt64,
    output_tokens UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, skill, model)
COMMENT 'Calls and tokens per Claude Skill, model and day (calls without skills are not counted).';

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_skill_daily_mv TO {db}.usage_skill_daily AS
SELECT
    toDate(time) AS day,
    arrayJoin(skills) AS skill,
    model,
    toUInt64(1) AS calls,
    toUInt64(greatest(ifNull(input_tokens, 0), 0)) AS input_tokens,
    toUInt64(greatest(ifNull(output_tokens, 0), 0)) AS output_tokens
FROM {db}.call_records
WHERE counted = 1 AND notEmpty(skills);

CREATE TABLE IF NOT EXISTS {db}.denials_daily
(
    day Date,
    subject String,
    rule_id LowCardinality(String),
    model LowCardinality(String),
    denials UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, subject, rule_id, model)
COMMENT 'Denied and rate-limited calls per user, rule and day (a call counts once per rule).';

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.denials_daily_mv TO {db}.denials_daily AS
SELECT
    toDate(time) AS day,
    subject,
    arrayJoin(if(empty(rule_ids), [''], rule_ids)) AS rule_id,
    model,
    toUInt64(1) AS denials
FROM {db}.call_records
WHERE counted = 1 AND state IN ('denied', 'rate_limited');

-- approval_parts: every approvals.* event folded per approval id, straight from the generic
-- `events` payload JSON, so fields the approval workflow adds later need no change here.
-- Topics are matched by suffix (the topic prefix is configurable). min/max/groupUniqArray fold
-- idempotently, so the backfill below can run any number of times.
CREATE TABLE IF NOT EXISTS {db}.approval_parts
(
    approval_id String,
    call_id SimpleAggregateFunction(max, String),
    requested_at SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    requester SimpleAggregateFunction(max, String),
    rule_ids SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    approver_groups SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    quorum SimpleAggregateFunction(max, UInt32),
    expires_at SimpleAggregateFunction(max, Nullable(DateTime64(6, 'UTC'))),
    first_decided_at SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    last_decided_at SimpleAggregateFunction(max, Nullable(DateTime64(6, 'UTC'))),
    decisions SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    resolved SimpleAggregateFunction(max, Tuple(at DateTime64(6, 'UTC'), outcome String)),
    notifications SimpleAggregateFunction(sum, UInt64),
    last_event_at SimpleAggregateFunction(max, DateTime64(6, 'UTC'))
)
ENGINE = AggregatingMergeTree
ORDER BY approval_id
COMMENT 'Approval events folded per approval id. Query the approvals view instead.';

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.approval_parts_mv TO {db}.approval_parts AS
SELECT
    JSONExtractString(payload, 'approval_id') AS approval_id,
    call_id,
    if(endsWith(topic, 'approvals.requested'), time, NULL) AS requested_at,
    if(endsWith(topic, 'approvals.requested'), subject, '') AS requester,
    if(endsWith(topic, 'approvals.requested'), JSONExtract(payload, 'rule_ids', 'Array(String)'), []) AS rule_ids,
    if(endsWith(topic, 'approvals.requested'), JSONExtract(payload, 'approver_groups', 'Array(String)'), []) AS approver_groups,
    toUInt32(if(endsWith(topic, 'approvals.requested'), JSONExtractUInt(payload, 'quorum'), 0)) AS quorum,
    if(endsWith(topic, 'approvals.requested') AND JSONExtractInt(payload, 'expires_at') > 0,
        fromUnixTimestamp64Micro(JSONExtractInt(payload, 'expires_at'), 'UTC'), NULL) AS expires_at,
    if(endsWith(topic, 'approvals.decided'), time, NULL) AS first_decided_at,
    if(endsWith(topic, 'approvals.decided'), time, NULL) AS last_decided_at,
    if(endsWith(topic, 'approvals.decided'),
        [concat(JSONExtractString(payload, 'decision'), ':', subject)], []) AS decisions,
    if(endsWith(topic, 'approvals.resolved'),
        tuple(time, JSONExtractString(payload, 'outcome')),
        tuple(toDateTime64(0, 6, 'UTC'), '')) AS resolved,
    toUInt64(endsWith(topic, 'approvals.notified')) AS notifications,
    time AS last_event_at
FROM {db}.events
WHERE match(topic, 'approvals\\.(requested|decided|resolved|notified)$')
    AND JSONExtractString(payload, 'approval_id') != '';

INSERT INTO {db}.approval_parts
SELECT
    JSONExtractString(payload, 'approval_id') AS approval_id,
    call_id,
    if(endsWith(topic, 'approvals.requested'), time, NULL),
    if(endsWith(topic, 'approvals.requested'), subject, ''),
    if(endsWith(topic, 'approvals.requested'), JSONExtract(payload, 'rule_ids', 'Array(String)'), []),
    if(endsWith(topic, 'approvals.requested'), JSONExtract(payload, 'approver_groups', 'Array(String)'), []),
    toUInt32(if(endsWith(topic, 'approvals.requested'), JSONExtractUInt(payload, 'quorum'), 0)),
    if(endsWith(topic, 'approvals.requested') AND JSONExtractInt(payload, 'expires_at') > 0,
        fromUnixTimestamp64Micro(JSONExtractInt(payload, 'expires_at'), 'UTC'), NULL),
    if(endsWith(topic, 'approvals.decided'), time, NULL),
    if(endsWith(topic, 'approvals.decided'), time, NULL),
    if(endsWith(topic, 'approvals.decided'), [concat(JSONExtractString(payload, 'decision'), ':', subject)], []),
    if(endsWith(topic, 'approvals.resolved'),
        tuple(time, JSONExtractString(payload, 'outcome')),
        tuple(toDateTime64(0, 6, 'UTC'), '')),
    toUInt64(0),
    time
FROM {db}.events
WHERE match(topic, 'approvals\\.(requested|decided|resolved)$')
    AND JSONExtractString(payload, 'approval_id') != '';

-- approvals: one row per approval id. outcome is approvals.resolved's (approved, denied,
-- expired), else `pending`; turnaround_seconds runs from the request to the resolution (else to
-- the first decision).
CREATE VIEW IF NOT EXISTS {db}.approvals AS
SELECT
    approval_id,
    max(call_id) AS call_id,
    min(requested_at) AS requested_at,
    max(requester) AS requester,
    arraySort(groupUniqArrayArray(rule_ids)) AS rule_ids,
    arraySort(groupUniqArrayArray(approver_groups)) AS approver_groups,
    max(quorum) AS quorum,
    max(expires_at) AS expires_at,
    min(first_decided_at) AS first_decided_at,
    max(last_decided_at) AS last_decided_at,
    arraySort(groupUniqArrayArray(decisions)) AS decisions,
    if(tupleElement(max(resolved), 'outcome') = '', NULL, tupleElement(max(resolved), 'at')) AS resolved_at,
    if(tupleElement(max(resolved), 'outcome') = '', 'pending', tupleElement(max(resolved), 'outcome')) AS outcome,
    sum(notifications) AS notifications,
    max(last_event_at) AS last_event_at,
    (toUnixTimestamp64Micro(coalesce(resolved_at, first_decided_at)) - toUnixTimestamp64Micro(requested_at)) / 1e6 AS turnaround_seconds
FROM {db}.approval_parts
GROUP BY approval_id
COMMENT 'One row per approval: request, decisions, outcome (approved/denied/expired/pending), turnaround.';

-- Approval turnaround per day (of the request) and outcome.
CREATE VIEW IF NOT EXISTS {db}.approval_turnaround_daily AS
SELECT
    toDate(requested_at) AS day,
    outcome,
    count() AS approvals,
    avg(turnaround_seconds) AS avg_seconds,
    quantile(0.5)(turnaround_seconds) AS p50_seconds,
    quantile(0.9)(turnaround_seconds) AS p90_seconds,
    max(turnaround_seconds) AS max_seconds
FROM {db}.approvals
WHERE requested_at IS NOT NULL
GROUP BY day, outcome
COMMENT 'Approval turnaround (request to resolution) per day and outcome.';

-- policy_bundles: every published policy bundle version, from policy.bundles events.
CREATE TABLE IF NOT EXISTS {db}.policy_bundles
(
    name String,
    version String,
    sha256 String,
    rule_count UInt32,
    published_at DateTime64(6, 'UTC'),
    publisher String COMMENT 'OIDC subject of the publisher.',
    event_id String,
    source String CODEC(ZSTD(3)) COMMENT 'The bundle as published (YAML).'
)
ENGINE = ReplacingMergeTree(published_at)
ORDER BY (name, version)
COMMENT 'Policy bundle versions as published; calls.bundle_version names the one that applied.';

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.policy_bundles_mv TO {db}.policy_bundles AS
SELECT
    JSONExtractString(payload, 'name') AS name,
    JSONExtractString(payload, 'version') AS version,
    JSONExtractString(payload, 'sha256') AS sha256,
    toUInt32(JSONExtractUInt(payload, 'rule_count')) AS rule_count,
    time AS published_at,
    subject AS publisher,
    event_id,
    JSONExtractString(payload, 'source') AS source
FROM {db}.events
WHERE event_type = 'PolicyBundlePublished';

INSERT INTO {db}.policy_bundles
SELECT
    JSONExtractString(payload, 'name'),
    JSONExtractString(payload, 'version'),
    JSONExtractString(payload, 'sha256'),
    toUInt32(JSONExtractUInt(payload, 'rule_count')),
    time,
    subject,
    event_id,
    JSONExtractString(payload, 'source')
FROM {db}.events
WHERE event_type = 'PolicyBundlePublished';

-- audit_checkpoints: the tamper-evidence chain (services/recorder/chain.py).
--
-- For each Kafka (topic, partition), every stored `events` row is hashed in offset order and
-- the hashes chained; after each batch the recorder writes one checkpoint per partition it
-- stored rows of: the offsets and row digests it covers, the previous chain head and the new one,
-- signed with an HMAC key held by skillgate. `skillgate audit verify` recomputes everything.
CREATE TABLE IF NOT EXISTS {db}.audit_checkpoints
(
    topic String,
    partition Int32,
    first_offset Int64,
    last_offset Int64,
    row_count UInt32,
    offsets Array(Int64) CODEC(ZSTD(3)),
    event_ids Array(String) CODEC(ZSTD(3)),
    digests Array(String) CODEC(ZSTD(3)) COMMENT 'SHA-256 of each events row (hex), in offset order.',
    prev_chain String COMMENT 'Chain head before this checkpoint ("" for the first).',
    chain String COMMENT 'Chain head after it: sha256(prev || digest) folded over the digests.',
    key_id String COMMENT 'Which key signed (first 16 hex of sha256(key)).',
    signature String COMMENT 'HMAC-SHA256 over the checkpoint fields.',
    created_at DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree(created_at)
ORDER BY (topic, partition, first_offset)
COMMENT 'Signed hash-chain checkpoints over the events table, per Kafka partition.';
