"""The audit store: ClickHouse (embedded chDB or a server) through clickhouse-connect.

One :class:`AuditStore` per process. It holds four clients, each behind its own lock because a
clickhouse-connect client runs one statement at a time: the writer (migrations and the consumer's
inserts), the preparer (the reads that prepare the next batch while the writer inserts the
previous one), the lookup client (``call_state``, polled by async callers) and the analyst client
(read-only SQL). Separate clients mean a ten-second analyst query never delays an insert or a
call-state poll. With chDB all three are handles on the one engine this process hosts (chDB allows
one engine path per process, which is why the recorder owns the store and serves reads itself).
The clients are synchronous: async code calls this class through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import clickhouse_connect
import orjson
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError
from clickhouse_connect.driver.insert import InsertContext

from services.recorder import chain, handlers, records
from services.recorder.config import ClickHouseSettings, RetentionSettings
from services.recorder.search import EXPORT_FORMATS, SEARCH_COLUMNS, CallSearch, encode_cursor
from skillgate.lru import BoundedCache

log = logging.getLogger(__name__)

MIGRATION_FILE = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")
MAX_QUERY_CHARS = 100_000
#: The migration after which calls recorded before ``call_records`` existed get their rows.
BACKFILL_AFTER = 4
MAX_RESULT_BYTES = 256 * 1024 * 1024
#: Settings of the recorder's inserts. ``optimize_on_insert=0``: ClickHouse would otherwise
#: collapse each inserted block the way a merge does (replace by version, sum, aggregate), work
#: that merges and every read (FINAL, argMax, sum) do anyway. Measured on the ingest bench: the
#: engine time of a 5,000-event batch fell by about a third, the whole batch's CPU by 5-7%.
#: (``parallel_view_processing`` was tried too: lower latency for small batches, more CPU.)
INSERT_SETTINGS: dict[str, Any] = {"optimize_on_insert": 0}


class StoreError(Exception):
    """ClickHouse refused or failed a statement; ``message`` is ClickHouse's explanation."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SQLRejected(ValueError):
    """An analyst's SQL that is not a single read-only statement on the audit database."""


class StalePrepared(RuntimeError):
    """A batch prepared on top of a batch whose write failed: prepare it again."""


class MigrationError(RuntimeError):
    """The migrations on disk disagree with the ones recorded as applied."""


# ---------------------------------------------------------------------------------------------
# Migrations


@dataclass(frozen=True)
class Migration:
    """One versioned migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file: an applied migration must never change."""
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def statements(self, database: str) -> list[str]:
        """The statements with ``{db}`` replaced; a ``;`` at the end of a line ends one.

        Whole-line ``--`` comments are dropped first, so a comment ending in ``;`` cannot split
        a statement. ``str.replace`` rather than ``str.format``: SQL has braces of its own.
        """
        lines = self.sql.replace("{db}", database).splitlines()
        code = "\n".join(ln for ln in lines if not ln.lstrip().startswith("--"))
        chunks = re.split(r";[ \t]*(?:\n|$)", code)
        return [chunk.strip() for chunk in chunks if chunk.strip()]


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """The migrations shipped with the recorder, in version order."""
    base = directory or Path(str(resources.files("services.recorder") / "migrations"))
    found: list[Migration] = []
    for path in sorted(base.iterdir()):
        match = MIGRATION_FILE.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), path.stem, path.read_text("utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version in {base}")
    return found


# ---------------------------------------------------------------------------------------------
# The SQL guard


_TOKEN = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<comment>--[^\r\n]*|\#[ !][^\r\n]*|/\*.*?\*/)
    | (?P<string>'(?:[^'\\]|\\.|'')*')
    | (?P<heredoc>\$(?P<tag>[A-Za-z0-9_]*)\$.*?\$(?P=tag)\$)
    | (?P<qident>"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`)
    | (?P<unterminated>['"`$]|/\*)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_$]*)
    | (?P<number>\d[\w.]*)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)

_FIRST_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN"})
_SHOW_OBJECTS = frozenset({"TABLES", "CREATE", "COLUMNS", "FIELDS", "INDEX", "INDEXES", "KEYS"})
_SHOW_CREATE_DENIED = frozenset(
    {"DATABASE", "USER", "ROLE", "QUOTA", "POLICY", "ROW", "PROFILE", "SETTINGS", "DICTIONARY"}
)
#: Keywords that turn a read into something else: ``INTO OUTFILE`` writes a file on the host
#: even with readonly=1; SETTINGS belong to the API, not to the query.
_FORBIDDEN_KEYWORDS = frozenset({"INTO", "OUTFILE", "SETTINGS"})
#: Table functions that stay allowed: they generate data and read nothing. ``format`` is also
#: a common scalar function; its table-function form is refused by readonly=1 anyway.
SAFE_FUNCTIONS = frozenset(
    {"numbers", "numbers_mt", "values", "generaterandom", "generate_series", "generateseries",
     "view", "null", "primes", "format", "fuzzquery"}
)  # fmt: skip
#: Denied whatever the server lists: functions that read files, other tables, the network or
#: the process. ``file`` is also a scalar function, and readonly=1 lets it read any file;
#: chDB's ``python`` reads objects of this very process.
BASE_DENIED_FUNCTIONS = frozenset(
    {"file", "filecluster", "filesystem", "url", "urlcluster", "s3", "s3cluster", "gcs", "oss",
     "cosn", "hdfs", "hdfscluster", "azureblobstorage", "remote", "remotesecure", "cluster",
     "clusterallreplicas", "merge", "mergetreeindex", "mergetreeprojection",
     "mergetreeanalyzeindexes", "mergetreetextindex", "dictionary", "executable", "input",
     "jdbc", "odbc", "mysql", "postgresql", "sqlite", "mongodb", "redis", "python", "loop",
     "viewifpermitted", "joinget", "joingetornull", "eval", "bigquery", "ytsaurus",
     "getserversetting"}
)  # fmt: skip
BASE_OTHER_DATABASES = frozenset({"system", "information_schema", "default"})


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str
    value: str
    end: int

    @property
    def keyword(self) -> str:
        """The upper-cased word of an unquoted identifier ('' for anything else)."""
        return self.value.upper() if self.kind == "ident" else ""

    @property
    def name(self) -> str | None:
        """Identifier name (quoted ones unquoted), casefolded; None for other tokens."""
        if self.kind == "ident":
            return self.value.casefold()
        if self.kind == "qident":
            quote = self.value[0]
            return self.value[1:-1].replace(quote * 2, quote).casefold()
        return None


def _tokens(sql: str) -> list[_Tok]:
    out: list[_Tok] = []
    for match in _TOKEN.finditer(sql):
        kind = match.lastgroup or "punct"
        if kind in ("ws", "comment"):
            continue
        if kind == "unterminated":
            raise SQLRejected("unterminated string, quoted name or comment (or a stray $)")
        if kind == "heredoc" or (kind == "ident" and "$" in match.group(kind)):
            # ClickHouse reads `a$$` as one name and `$$...$$` as a string; a guard that disagreed
            # once let SQL hide from every check, so `$` outside quotes is refused outright.
            raise SQLRejected("`$` is only allowed inside quoted strings and names")
        if kind == "qident" and "\\" in match.group(kind):
            # ClickHouse unescapes names (`fi\le` is `file`); refusing is simpler than agreeing.
            raise SQLRejected("backslashes are not allowed in quoted names")
        out.append(_Tok(kind, match.group(kind), match.end()))
    return out


def check_readonly_sql(
    sql: str,
    database: str,
    other_databases: Iterable[str] = BASE_OTHER_DATABASES,
    denied_functions: Iterable[str] = BASE_DENIED_FUNCTIONS,
) -> str:
    """Accept one SELECT/WITH/SHOW/DESCRIBE/EXPLAIN statement on the audit database, or raise.

    Returns the statement without a trailing ``;``. This guard runs before anything reaches
    ClickHouse, and the query then runs with ``readonly=1``; the guard covers what readonly=1
    lets through (``INTO OUTFILE``, the ``file()`` function, other databases, chDB's
    ``python()``). Strings, quoted names and comments are tokenised the way ClickHouse's lexer
    does; where the two could differ (nested block comments) this side always sees more text as
    code, so nothing can be hidden from the checks: the worst case is a harmless query rejected.
    """
    if len(sql) > MAX_QUERY_CHARS:
        raise SQLRejected(f"query longer than {MAX_QUERY_CHARS} characters")
    toks = _tokens(sql)
    while toks and toks[-1].value == ";":
        toks.pop()
    if not toks:
        raise SQLRejected("empty query")
    if any(t.kind == "punct" and t.value == ";" for t in toks):
        raise SQLRejected("only one statement per query")
    start = next((i for i, t in enumerate(toks) if t.value != "("), 0)
    if toks[start].keyword not in _FIRST_KEYWORDS:
        raise SQLRejected("only SELECT, WITH, SHOW, DESCRIBE and EXPLAIN statements are allowed")
    if toks[start].keyword == "SHOW":
        words = [t.keyword for t in toks[start + 1 : start + 4]] + ["", "", ""]
        if words[0] in ("FULL", "EXTENDED"):
            words = words[1:]
        if words[0] not in _SHOW_OBJECTS or (words[0] == "CREATE" and words[1] in _SHOW_CREATE_DENIED):
            raise SQLRejected("only SHOW TABLES, SHOW CREATE TABLE, SHOW COLUMNS, SHOW INDEX")
    others = {d.casefold() for d in other_databases} - {database.casefold()}
    denied = {f.casefold() for f in denied_functions} - SAFE_FUNCTIONS
    for i, tok in enumerate(toks):
        nxt = toks[i + 1].value if i + 1 < len(toks) else ""
        prev = toks[i - 1].keyword if i > 0 else ""
        if tok.keyword in _FORBIDDEN_KEYWORDS:
            raise SQLRejected(f"{tok.keyword} is not allowed in audit queries")
        if tok.keyword == "FORMAT" and nxt != "(":
            raise SQLRejected('FORMAT is not allowed: choose "format" in the request instead')
        name = tok.name
        if name is None:
            continue
        if nxt == "(" and (name in denied or name.startswith("dict")):
            raise SQLRejected(f"function {tok.value}() is not allowed in audit queries")
        if name in others and (nxt == "." or prev in ("FROM", "IN", "DATABASE", "JOIN")):
            raise SQLRejected(f"queries may only read the {database} database")
    # Cut after the last token: a trailing comment must not run into whatever the client
    # appends (chDB appends the SETTINGS clause as text).
    return sql[: toks[-1].end].strip()


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class QueryResult:
    """An analyst query's result."""

    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    elapsed_ms: float
    truncated: bool = False

    @property
    def row_count(self) -> int:
        """Number of rows returned."""
        return len(self.rows)


@dataclass
class InsertStats:
    """What one :meth:`AuditStore.insert_batch` wrote."""

    events: int = 0
    duplicates: int = 0
    call_parts: int = 0
    per_topic: dict[str, int] = field(default_factory=dict)
    #: Events no row could be built for, with the reason (to be dead-lettered).
    rejected: list[tuple[handlers.SourceRecord, str]] = field(default_factory=list)

    def merge(self, other: InsertStats) -> None:
        """Add another insert's counts to these."""
        self.events += other.events
        self.duplicates += other.duplicates
        self.call_parts += other.call_parts
        for topic, count in other.per_topic.items():
            self.per_topic[topic] = self.per_topic.get(topic, 0) + count
        self.rejected.extend(other.rejected)


@dataclass
class PreparedBatch:
    """Everything one batch writes, built by :meth:`AuditStore.prepare_batch` before any of it
    is written by :meth:`AuditStore.write_batch`.

    Preparing is Python work plus a few reads; writing is ClickHouse inserts, which chDB runs
    without holding the GIL. The recorder therefore prepares each batch while the previous one
    is written, and the two use both cores.
    """

    stats: InsertStats
    #: The store's failure count when the batch was prepared (see StalePrepared).
    generation: int
    call_parts: list[list[Any]] = field(default_factory=list)
    events: list[list[Any]] = field(default_factory=list)
    call_records: list[list[Any]] = field(default_factory=list)
    checkpoints: list[chain.Checkpoint] = field(default_factory=list)
    #: The folds of the calls the batch changes, and the conversations those calls start.
    folds: dict[str, records.CallFold] = field(default_factory=dict)
    conversations: dict[str, str] = field(default_factory=dict)
    #: (topic, partition) -> (chain, last offset) after the batch's checkpoints.
    heads: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    #: Event id -> (topic, partition, offset) of the ``events`` rows the batch writes.
    written: dict[str, tuple[str, int, int]] = field(default_factory=dict)


def _in_list(param: str) -> str:
    """``IN (...)`` over a list given as the one JSON string parameter ``param``: binding
    thousands of array elements costs more than the query itself."""
    return f"IN (SELECT arrayJoin(JSONExtract({{{param}:String}}, 'Array(String)')))"


def _list_param(values: Iterable[str]) -> str:
    """The value of an :func:`_in_list` parameter."""
    return orjson.dumps(list(values)).decode()


def _fold_weight(fold: records.CallFold) -> int:
    # The bodies dominate; the rest of a fold is a few hundred bytes.
    return len(fold.request_body) + len(str(fold.terminal[4] or "")) + 1024


def _aware(value: Any) -> Any:
    # clickhouse-connect returns UTC DateTime64 values as naive datetimes (its naive_utc mode).
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class _Guarded:
    """A client and the lock that serialises its use."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.lock = threading.Lock()
        #: Insert contexts (a table's column types) made once per table, see :meth:`insert_rows`.
        self._contexts: dict[tuple[str, tuple[str, ...]], InsertContext] = {}

    def insert_rows(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        """Insert rows column-oriented (the C-level transpose beats clickhouse-connect's own).

        Hold :attr:`lock`. The insert context is made once per table: without it every insert
        first asks ClickHouse to DESCRIBE the table, a round trip per table per batch that
        dominated small batches.
        """
        key = (table, tuple(columns))
        context = self._contexts.get(key)
        if context is None:
            context = self.client.create_insert_context(
                table, column_names=list(columns), column_oriented=True, settings=INSERT_SETTINGS
            )
            self._contexts[key] = context
        context.data = [list(column) for column in zip(*rows, strict=True)]
        self.client.insert(context=context)


class AuditStore:
    """Reads and writes the audit tables; every method is blocking and thread-safe."""

    def __init__(
        self,
        settings: ClickHouseSettings,
        data_dir: Path = Path("data"),
        checkpoint_key: bytes | None = None,
        fold_cache_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.settings = settings
        #: Folds of the calls written recently (see _fold_calls), bounded by body size.
        self._folds: BoundedCache[str, records.CallFold] = BoundedCache(fold_cache_bytes, _fold_weight)
        #: Conversation hash -> resolved session of recently written calls (~200 bytes each).
        self._conversations: BoundedCache[str, str] = BoundedCache(
            max(1, fold_cache_bytes // 4), lambda _: 200
        )
        #: Bumped by every failed write: batches prepared before it are stale (StalePrepared).
        self._generation = 0
        #: HMAC key of the tamper-evidence checkpoints; None: batches are not sealed.
        self._checkpoint_key = checkpoint_key
        self.database = settings.database
        self._url = settings.resolved_url(data_dir)
        self.display_url = settings.display_url(data_dir)
        if settings.is_chdb:
            Path(self._url[len("chdb://") :]).parent.mkdir(parents=True, exist_ok=True)
        self._closed = False
        opened: list[Client] = []
        try:
            opened.append(self._connect(None))
            # Readers are bound to the audit database (unqualified names resolve there), which
            # must therefore exist before they connect.
            opened[0].command(f"CREATE DATABASE IF NOT EXISTS {self.database}{self._on_cluster}")
            opened.extend(self._connect(self.database) for _ in range(3))
        except BaseException:
            for client in opened:
                client.close()
            raise
        self._writer, self._preparer, self._lookup, self._analyst = (_Guarded(c) for c in opened)
        self._denied_functions: frozenset[str] = BASE_DENIED_FUNCTIONS
        self._other_dbs: frozenset[str] = BASE_OTHER_DATABASES
        self._other_dbs_at = 0.0

    @property
    def generation(self) -> int:
        """How many writes have failed: a batch prepared at another generation is stale."""
        return self._generation

    @property
    def _on_cluster(self) -> str:
        """`` ON CLUSTER '<name>'`` when the store is a cluster, else ''."""
        return f" ON CLUSTER '{self.settings.cluster}'" if self.settings.cluster else ""

    def _connect(self, database: str | None) -> Client:
        if self.settings.is_chdb:
            return clickhouse_connect.get_client(dsn=self._url, database=database)
        # On a cluster, inserts through Distributed tables must be on the shards when the insert
        # returns: call_records is built from call_parts right after, and offsets are committed.
        extra: dict[str, Any] = {"distributed_foreground_insert": 1} if self.settings.cluster else {}
        password = self.settings.password.get_secret_value() if self.settings.password else ""
        return clickhouse_connect.get_client(
            dsn=self._url,
            username=self.settings.username or "default",
            password=password,
            database=database or "",
            # No HTTP session: a session id would make concurrent statements conflict.
            autogenerate_session_id=False,
            settings=extra,
        )

    @contextmanager
    def _use(self, guarded: _Guarded) -> Iterator[Client]:
        if self._closed:
            raise StoreError("the audit store is closed")
        with guarded.lock:
            yield guarded.client

    def close(self) -> None:
        """Close every client (with chDB this releases the engine path for another process)."""
        if self._closed:
            return
        self._closed = True
        for guarded in (self._analyst, self._lookup, self._preparer, self._writer):
            with guarded.lock:
                try:
                    guarded.client.close()
                except Exception:  # closing is best effort; the process may be exiting anyway
                    log.debug("closing a ClickHouse client failed", exc_info=True)

    def ping(self) -> bool:
        """True when the store answers."""
        try:
            with self._use(self._lookup) as client:
                return bool(client.ping())
        except (ClickHouseError, StoreError, OSError):
            return False

    # -- migrations ---------------------------------------------------------------------------

    def migrate(self, migrations: Sequence[Migration] | None = None) -> list[int]:
        """Apply the migrations not applied yet, in order; returns the versions applied now.

        ``schema_migrations`` records each applied version with the file's checksum; a file
        that changed after it was applied stops the recorder (add a new migration instead).
        Applying 0004 also writes the ``call_records`` rows of calls older than 0003.
        """
        todo = list(migrations) if migrations is not None else load_migrations()
        db = self.database
        applied_now: list[int] = []
        with self._use(self._writer) as client:
            engine = "ReplacingMergeTree(applied_at)"
            if self.settings.cluster:
                # One copy on every node (no {shard} in the path): any recorder sees what is applied.
                engine = f"ReplicatedReplacingMergeTree('/clickhouse/tables/{db}/schema_migrations', '{{replica}}', applied_at)"
            client.command(
                f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations{self._on_cluster} ("
                "version UInt32, name String, checksum String, "
                f"applied_at DateTime64(6, 'UTC') DEFAULT now64(6)) ENGINE = {engine} ORDER BY version"
            )
            statements_of = self._statements_function(todo)
            # Names spliced into SQL here and below are the validated database identifier.
            rows = client.query(
                f"SELECT version, argMax(checksum, applied_at) FROM {db}.schema_migrations "  # noqa: S608
                "GROUP BY version"
            ).result_rows
            applied = {int(v): str(c) for v, c in rows}
            for migration in sorted(todo, key=lambda m: m.version):
                known = applied.get(migration.version)
                if known is not None:
                    if known != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.name} changed after it was applied; "
                            "add a new migration instead of editing an applied one"
                        )
                    continue
                for statement in statements_of(migration):
                    client.command(statement)
                if migration.version == BACKFILL_AFTER:
                    # Before the migration counts as applied: a crash here runs it again.
                    count = self._backfill_call_records(client)
                    log.info("backfilled call_records", extra={"calls": count})
                client.insert(
                    f"{db}.schema_migrations",
                    [[migration.version, migration.name, migration.checksum]],
                    column_names=["version", "name", "checksum"],
                )
                applied_now.append(migration.version)
                log.info("applied migration", extra={"migration": migration.name})
            try:
                names = client.query("SELECT lower(name) FROM system.table_functions").result_rows
            except ClickHouseError:
                names = []  # a server user without access to system tables: the base list stays
        # Every table function this server knows is denied to analysts unless known to be safe.
        self._denied_functions = BASE_DENIED_FUNCTIONS | {str(n) for (n,) in names}
        return applied_now

    def _backfill_call_records(self, client: Client, chunk: int = 5000) -> int:
        """Write ``call_records`` for the calls stored before migration 0003 created the table.

        Walks ``call_parts`` in call id order, a chunk at a time, and folds every call that has
        no ``call_records`` row yet; a second run finds nothing left to do.
        """
        db = self.database
        after, total = "", 0
        while True:
            result = client.query(
                f"SELECT DISTINCT call_id FROM {db}.call_parts WHERE call_id > {{after:String}} "  # noqa: S608
                f"AND call_id NOT IN (SELECT call_id FROM {db}.call_records WHERE call_id > {{after:String}}) "
                "ORDER BY call_id LIMIT {n:UInt32}",
                parameters={"after": after, "n": chunk},
            )
            ids = [str(row[0]) for row in result.result_rows]
            if not ids:
                return total
            after = ids[-1]
            folds = self._read_folds(client, ids)
            rows, _ = self._record_rows(client, folds, None)
            if rows:
                self._writer.insert_rows(f"{db}.call_records", rows, records.CALL_RECORD_COLUMNS)
            total += len(folds)

    def _statements_function(self, migrations: Sequence[Migration]) -> Callable[[Migration], list[str]]:
        """How a migration's statements are run: as written, or in their cluster form."""
        db, cluster_name = self.database, self.settings.cluster
        if not cluster_name:
            return lambda m: m.statements(db)
        from services.recorder import cluster  # the cluster form is built from this module's Migration

        tables = cluster.local_tables(s for m in load_migrations() for s in m.statements(db))
        return lambda m: [
            out for s in m.statements(db) for out in cluster.cluster_statement(s, db, cluster_name, tables)
        ]

    # -- writes -------------------------------------------------------------------------------

    def insert_batch(self, batch: Sequence[handlers.SourceRecord]) -> InsertStats:
        """Store a batch of decoded events; idempotent, so a redelivered batch is harmless.

        :meth:`prepare_batch` then :meth:`write_batch`. The recorder's consumer calls the two
        itself so that a batch is prepared while the previous one is written.
        """
        return self.write_batch(self.prepare_batch(batch))

    def prepare_batch(
        self, batch: Sequence[handlers.SourceRecord], after: PreparedBatch | None = None
    ) -> PreparedBatch:
        """Build every row a batch writes, reading the store but writing nothing.

        * ``call_parts`` rows, always written (folding an event twice changes nothing): one
          row per call new to the store and to ``after`` (see :meth:`_fold_calls`), else one
          per event;
        * ``events`` rows whose event id is not stored yet (the table is also a
          ReplacingMergeTree on the event id for the rare race this check cannot see: two
          replicas during a rebalance);
        * the wide ``call_records`` rows of the calls the batch changes (:meth:`_fold_calls`);
        * the signed checkpoints sealing the stored rows into the tamper-evidence chain (when a
          checkpoint key is set).

        ``after`` is the batch being written while this one is prepared (or None): what it
        writes may not be visible yet, so its event ids, folds, conversations and chain heads
        count as stored. If its write fails, this batch is stale (:class:`StalePrepared`).
        """
        rows = handlers.rows_for_batch(batch)
        generation = after.generation if after is not None else self._generation
        prepared = PreparedBatch(InsertStats(rejected=rows.rejected), generation)
        if not rows.events:
            return prepared
        with self._use(self._preparer) as client:
            known, stored_by_call = self._stored_events(client, rows.event_keys)
            if after is not None:
                for _, event_id in rows.event_keys:
                    if (where := after.written.get(event_id)) is not None:
                        known.setdefault(event_id, where)
            prepared.events = [row for row in rows.events if row[0] not in known]
            prepared.written = {str(r[0]): (str(r[1]), int(r[14]), int(r[15])) for r in prepared.events}
            if rows.call_parts:
                self._fold_calls(client, rows, stored_by_call, after, prepared)
            if self._checkpoint_key is not None:
                # Rows stored now, and rows a crashed attempt stored from these very messages.
                stored = [
                    row for row in rows.events
                    if row[0] not in known or known[row[0]] == (row[1], row[14], row[15])
                ]  # fmt: skip
                self._seal(client, stored, after, prepared)
        stats = prepared.stats
        stats.call_parts = len(prepared.call_parts)
        stats.events = len(prepared.events)
        stats.duplicates = len(rows.events) - len(prepared.events)
        for row, topic in zip(rows.events, rows.topics, strict=True):
            if row[0] not in known:
                stats.per_topic[topic] = stats.per_topic.get(topic, 0) + 1
        return prepared

    def write_batch(self, prepared: PreparedBatch) -> InsertStats:
        """Insert what :meth:`prepare_batch` built; returns the batch's counts.

        Parts go first, then events, call records and checkpoints: if the process dies between
        two inserts, the redelivered batch still completes them all. Only once everything is
        stored do the batch's folds and conversations enter the caches, so the caches never hold
        what the store does not. A failed write makes every batch prepared on top of it stale.
        """
        db = self.database
        with self._use(self._writer):
            if prepared.generation != self._generation:
                raise StalePrepared("the batch was prepared on top of a batch whose write failed")
            try:
                if prepared.call_parts:
                    self._writer.insert_rows(
                        f"{db}.call_parts", prepared.call_parts, handlers.CALL_PART_COLUMNS
                    )
                if prepared.events:
                    self._writer.insert_rows(f"{db}.events", prepared.events, handlers.EVENT_COLUMNS)
                if prepared.call_records:
                    self._writer.insert_rows(
                        f"{db}.call_records", prepared.call_records, records.CALL_RECORD_COLUMNS
                    )
                if prepared.checkpoints:
                    now = time.time_ns() // 1000
                    self._writer.insert_rows(
                        f"{db}.audit_checkpoints",
                        [cp.row(now) for cp in prepared.checkpoints],
                        chain.CHECKPOINT_COLUMNS,
                    )
            except BaseException:
                self._generation += 1
                raise
        for fold in prepared.folds.values():
            self._folds.put(fold.call_id, fold)
        for conversation, session in prepared.conversations.items():
            self._conversations.put(conversation, session)
        for cp in prepared.checkpoints:
            # The external anchor: a copy of every signed head outside the store.
            log.info(
                "audit checkpoint",
                extra={"topic": cp.topic, "partition": cp.partition, "last_offset": cp.last_offset,
                       "rows": len(cp.offsets), "chain": cp.chain, "signature": cp.signature},
            )  # fmt: skip
        return prepared.stats

    def _stored_events(
        self, client: Client, keys: Sequence[tuple[str, str]]
    ) -> tuple[dict[str, tuple[str, int, int]], dict[str, set[str]]]:
        """What is already stored of the batch's calls.

        Returns the batch's event ids already stored, with the (topic, partition, offset) they
        were read at, and for each call of the batch every event id stored for it so far.
        """
        # The filter on call_id reads only the granules of those calls through the primary key
        # (call_id, event_id).
        result = client.query(
            f"SELECT call_id, event_id, topic, kafka_partition, kafka_offset FROM {self.database}.events "  # noqa: S608
            f"WHERE call_id {_in_list('calls')}",
            parameters={"calls": _list_param(sorted({c for c, _ in keys}))},
        )
        wanted = {e for _, e in keys}
        known: dict[str, tuple[str, int, int]] = {}
        by_call: dict[str, set[str]] = {}
        for call_id, event_id, topic, partition, offset in result.result_rows:
            by_call.setdefault(str(call_id), set()).add(str(event_id))
            if event_id in wanted:
                known[str(event_id)] = (str(topic), int(partition), int(offset))
        return known, by_call

    def _fold_calls(
        self,
        client: Client,
        rows: handlers.BatchRows,
        stored_by_call: Mapping[str, set[str]],
        after: PreparedBatch | None,
        prepared: PreparedBatch,
    ) -> None:
        """Build the ``call_records`` rows of the calls whose fold the batch changes.

        Also fills ``prepared.call_parts``. The batch's ``call_parts`` rows are folded in Python
        (:class:`records.CallFold`), so no batch reads the folded state back from ClickHouse:

        * a call with no event stored before this batch starts from an empty fold;
        * a call whose every stored event this process folded (the batch being written, then
          the cache of recent calls, with the event ids each saw) continues from a copy of that
          fold;
        * any other call (evicted, after a restart or a rebalance, or with events another
          replica stored, such as approval events keyed by approval id) is read back from
          ``call_parts`` with the ``calls`` view's own aggregates, and the batch folded on top.

        The version that first shows a call in a terminal state is marked ``counted``: the usage
        views count each call exactly once, whatever was redelivered or re-emitted.
        """
        parts: dict[str, list[list[Any]]] = {}
        for part in rows.call_parts:
            parts.setdefault(str(part[0]), []).append(part)
        seen: dict[str, set[str]] = {}
        for event in rows.events:
            seen.setdefault(str(event[3]), set()).add(str(event[0]))
        changed: list[records.CallFold] = []
        cold: list[str] = []
        for call_id, call_parts in parts.items():
            stored = stored_by_call.get(call_id, set())
            known = after.folds.get(call_id) if after is not None else None
            if known is None and stored:
                known = self._folds.get(call_id)
            if stored and (known is None or not stored <= known.event_ids):
                cold.append(call_id)
                prepared.call_parts.extend(call_parts)
                continue
            fold = known.copy() if known is not None else records.CallFold(call_id)
            fold.event_ids |= seen.get(call_id, set())
            if any([fold.add(p) for p in call_parts]):
                changed.append(fold)
            # Kept even when unchanged: the event ids it saw spare the next batch a read.
            prepared.folds[call_id] = fold
            if known is None:
                # The fold started empty (no event of the call stored or in the batch being
                # written), so it is exactly this batch's rows folded: one row stands for them
                # all (a third of the insert work for a forwarded call).
                prepared.call_parts.append(fold.part_row())
            else:
                # Not the fold: that would write again what earlier batches stored (bodies).
                prepared.call_parts.extend(call_parts)
        if cold:
            read = {fold.call_id: fold for fold in self._read_folds(client, cold)}
            in_flight: dict[str, list[list[Any]]] = {}
            if after is not None and any(call_id in after.folds for call_id in cold):
                for part in after.call_parts:
                    in_flight.setdefault(str(part[0]), []).append(part)
            for call_id in cold:
                fold = read.get(call_id) or records.CallFold(call_id)
                fold.event_ids = stored_by_call.get(call_id, set()) | seen.get(call_id, set())
                if after is not None and call_id in after.folds:
                    # The batch being written may not be visible yet: fold its parts in too.
                    fold.event_ids |= after.folds[call_id].event_ids
                    parts[call_id] = in_flight.get(call_id, []) + parts[call_id]
                for cold_part in parts[call_id]:
                    fold.add(cold_part)
                changed.append(fold)
                prepared.folds[call_id] = fold
        prepared.call_records, conversations = self._record_rows(client, changed, after)
        prepared.conversations.update(conversations)

    def _record_rows(
        self,
        client: Client,
        changed: Sequence[records.CallFold],
        after: PreparedBatch | None,
    ) -> tuple[list[list[Any]], dict[str, str]]:
        """The ``call_records`` rows of ``changed`` (sessions resolved, ``counted`` set), and the
        conversations they start with their sessions (kept with the batch like the folds, see
        :meth:`_fold_calls`: for the caches once the rows are written and for the batch
        prepared next)."""
        conversations: dict[str, str] = {}
        if not changed:
            return [], conversations
        hashes = [fold.hashes() for fold in changed]
        sessions = records.resolve_sessions(
            [{"call_id": f.call_id, "session_id": f.session_id} for f in changed],
            hashes,
            # Parents written in this very batch chain inside resolve_sessions: no lookup for them.
            self._known_conversations(
                client,
                {h.parent_hash for h in hashes if h.parent_hash} - {h.conversation_hash for h in hashes},
                after,
            ),
        )
        version = time.time_ns() // 1000
        out: list[list[Any]] = []
        for fold, session, fact in zip(changed, sessions, hashes, strict=True):
            counted = fold.terminal_state and not fold.recorded_terminal
            out.append(records.record_row(fold, session, counted, version))
            fold.recorded_terminal = fold.recorded_terminal or fold.terminal_state
            if fact.conversation_hash:
                conversations[fact.conversation_hash] = session[0]
        return out, conversations

    def _read_folds(self, client: Client, call_ids: Sequence[str]) -> list[records.CallFold]:
        """Folds of ``call_ids`` from ``call_parts``, and whether each has a terminal version."""
        db = self.database
        ids = _list_param(call_ids)
        result = client.query(
            f"SELECT {records.FOLD_SELECT} FROM {db}.call_parts "  # noqa: S608
            f"WHERE call_id {_in_list('ids')} GROUP BY call_id",
            parameters={"ids": ids},
        )
        folds = [records.fold_parts(str(row[0]), [row]) for row in result.result_rows]
        if not folds:
            return folds
        earliest = min(fold.time_ms() for fold in folds)
        before = client.query(
            f"SELECT call_id, argMax(state, version) FROM {db}.call_records "  # noqa: S608
            "WHERE time >= fromUnixTimestamp64Milli({t:Int64}, 'UTC') "
            f"AND call_id {_in_list('ids')} GROUP BY call_id",
            parameters={"t": earliest, "ids": ids},
        )
        ended = {str(c) for c, state in before.result_rows if state in records.TERMINAL_STATES}
        for fold in folds:
            fold.recorded_terminal = fold.call_id in ended
        return folds

    def _known_conversations(
        self, client: Client, parents: set[str], after: PreparedBatch | None
    ) -> dict[str, str]:
        """Sessions of the earlier conversations ``parents`` name.

        The batch being written first, then memory, then the store.
        """
        known: dict[str, str] = {}
        for conversation in parents:
            session = after.conversations.get(conversation) if after is not None else None
            if session is None:
                session = self._conversations.get(conversation)
            if session is not None:
                known[conversation] = session
        missing = sorted(parents - known.keys())
        if missing:
            found = client.query(
                f"SELECT conversation_hash, argMin(session_id, time) FROM {self.database}.call_records "  # noqa: S608
                f"WHERE conversation_hash {_in_list('h')} GROUP BY conversation_hash",
                parameters={"h": _list_param(missing)},
            )
            for conversation, session in found.result_rows:
                known[str(conversation)] = str(session)
                self._conversations.put(str(conversation), str(session))
        return known

    def _seal(
        self,
        client: Client,
        rows: Sequence[Sequence[Any]],
        after: PreparedBatch | None,
        prepared: PreparedBatch,
    ) -> None:
        """Sign the checkpoints that seal ``rows`` (the batch's stored ``events`` rows).

        Each partition's chain continues from its newest checkpoint: the batch being written,
        else the store.
        """
        if not rows or self._checkpoint_key is None:
            return
        topics = sorted({str(r[1]) for r in rows})
        result = client.query(
            f"SELECT topic, partition, argMax(chain, last_offset), max(last_offset) "  # noqa: S608
            f"FROM {self.database}.audit_checkpoints "
            f"WHERE topic {_in_list('t')} GROUP BY topic, partition",
            parameters={"t": _list_param(topics)},
        )
        heads = {(str(t), int(p)): (str(c), int(o)) for t, p, c, o in result.result_rows}
        if after is not None:
            heads.update(after.heads)
        prepared.checkpoints = chain.seal(rows, heads, self._checkpoint_key)
        prepared.heads = {(cp.topic, cp.partition): (cp.chain, cp.last_offset) for cp in prepared.checkpoints}

    # -- reads --------------------------------------------------------------------------------

    def call_state(self, call_id: str) -> dict[str, Any] | None:
        """The ``calls`` row of one call as a dict (datetimes UTC-aware), or None if unknown.

        Read as the call's call_parts rows (a primary-key range) folded here with the view's
        expressions (:func:`records.calls_row`): planning the view's query costs more than
        running it, and async callers poll this. One difference from the view: an end known
        only from a hint (a reply, the forwarder's claim) is not reported until the event that
        explains it is stored (:func:`records.provisional_state`).
        """
        with self._use(self._lookup) as client:
            try:
                result = client.query(
                    f"SELECT {', '.join(handlers.CALL_PART_COLUMNS)} FROM {self.database}.call_parts "  # noqa: S608
                    "WHERE call_id = {id:String}",
                    parameters={"id": call_id},
                )
            except ClickHouseError as exc:
                raise StoreError(_clean_error(str(exc))) from exc
        if not result.result_rows:
            return None
        fold = records.fold_parts(call_id, result.result_rows)
        row = records.calls_row(fold)
        provisional = records.provisional_state(fold)
        if provisional is not None:  # the outcome is not recorded yet: not an end to report
            row.update(state=provisional, status=None, completed_at=None, total_ms=None)
        return row

    def find_masked(
        self, fingerprint: str, *, limit: int = 1000, max_seconds: float = 10.0
    ) -> tuple[list[dict[str, Any]], bool]:
        """Every recorded masking of the value whose HMAC fingerprint is ``fingerprint``.

        Returns one dict per masked occurrence, oldest first (call id, time, subject, username,
        the event that reported it and the direction, type, placeholder, location, span, scope,
        bundle version), and whether the result was cut at ``limit`` events. The folded
        ``call_parts.masked_fingerprints`` narrows the search to the calls concerned (its bloom
        filter index, migration 0002, skips the granules that cannot hold the fingerprint);
        their events (read through the primary key) give the details each ``MaskedValue``
        recorded.
        Only fingerprints are compared: the value itself is never in the store.
        """
        if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
            raise ValueError("a fingerprint is 64 lowercase hex digits (HMAC-SHA256)")
        db = self.database
        with self._use(self._analyst) as client:
            try:
                result = client.query(
                    f"SELECT call_id, event_id, event_type, time, subject, username, bundle_version, "  # noqa: S608
                    f"payload FROM {db}.events "
                    f"WHERE call_id IN (SELECT call_id FROM {db}.call_parts "
                    "WHERE has(masked_fingerprints, {fp:String})) "
                    "AND position(payload, {fp:String}) > 0 "
                    "ORDER BY time, event_id LIMIT 1 BY event_id LIMIT {limit:UInt32}",
                    parameters={"fp": fingerprint, "limit": limit + 1},
                    settings={"readonly": 1, "max_execution_time": max_seconds},
                )
            except ClickHouseError as exc:
                raise StoreError(_clean_error(str(exc))) from exc
        rows = result.result_rows
        truncated = len(rows) > limit
        direction = {"CallDecided": "request", "CallCompleted": "response"}
        hits: list[dict[str, Any]] = []
        for call_id, _event_id, event_type, at, subject, username, bundle_version, payload in rows[:limit]:
            try:
                masked = orjson.loads(payload).get("masked") or []
            except (orjson.JSONDecodeError, AttributeError):
                continue
            for item in masked:
                if not isinstance(item, dict) or item.get("fingerprint") != fingerprint:
                    continue
                hits.append(
                    {
                        "call_id": call_id,
                        "time": _aware(at),
                        "subject": subject,
                        "username": username,
                        "event": event_type,
                        "direction": direction.get(str(event_type), str(event_type)),
                        "type": item.get("type"),
                        "placeholder": item.get("placeholder"),
                        "location": item.get("location"),
                        "start": item.get("start"),
                        "end": item.get("end"),
                        "scope": item.get("scope"),
                        "bundle_version": bundle_version,
                    }
                )
        return hits, truncated

    def _refresh_other_databases(self, client: Client) -> frozenset[str]:
        # Other databases can appear at any time on a server; refresh the list once a minute.
        if time.monotonic() - self._other_dbs_at > 60:
            try:
                names = client.query("SELECT name FROM system.databases").result_rows
            except ClickHouseError:
                names = []  # no access to system tables: the base list stays
            self._other_dbs = BASE_OTHER_DATABASES | {str(n) for (n,) in names}
            self._other_dbs_at = time.monotonic()
        return self._other_dbs

    def query(
        self,
        sql: str,
        *,
        max_rows: int = 10000,
        max_seconds: float = 10.0,
        max_memory_bytes: int = 0,
    ) -> QueryResult:
        """Run an analyst's read-only statement against the audit database.

        Raises :class:`SQLRejected` before sending anything that is not a single read statement
        on the audit database, and :class:`StoreError` with ClickHouse's message when the query
        fails. The query runs with ``readonly=1`` and bounded time, memory and result size; more
        than ``max_rows`` rows are cut off and flagged ``truncated``.
        """
        settings: dict[str, Any] = {
            "readonly": 1,
            "max_execution_time": max_seconds,
            "max_result_rows": max_rows,
            "max_result_bytes": MAX_RESULT_BYTES,
            "result_overflow_mode": "break",
        }
        if max_memory_bytes:
            settings["max_memory_usage"] = max_memory_bytes
        started = time.perf_counter()
        with self._use(self._analyst) as client:
            try:
                others = self._refresh_other_databases(client)
                statement = check_readonly_sql(sql, self.database, others, self._denied_functions)
                # Second opinion from ClickHouse's own parser: the guard checks the query again as
                # ClickHouse re-formats it, so any disagreement between the two lexers fails closed.
                literal = "'" + statement.replace("\\", "\\\\").replace("'", "\\'") + "'"
                formatted = client.query(
                    f"SELECT formatQuerySingleLine({literal})", settings={"readonly": 1}
                ).result_rows[0][0]
                check_readonly_sql(str(formatted), self.database, others, self._denied_functions)
                result = client.query(statement, settings=settings)
                columns = list(result.column_names)
                types = [t.name for t in result.column_types]
                rows = [list(r) for r in result.result_rows[: max_rows + 1]]
                if not columns and statement.lstrip("( \n\t").upper().startswith(("SELECT", "WITH")):
                    # An empty result carries no header with chDB; ask for it separately.
                    described = client.query(f"DESCRIBE ({statement})", settings=settings)
                    columns = [str(r[0]) for r in described.result_rows]
                    types = [str(r[1]) for r in described.result_rows]
            except ClickHouseError as exc:
                raise StoreError(_clean_error(str(exc))) from exc
        elapsed = (time.perf_counter() - started) * 1000
        truncated = len(rows) > max_rows
        return QueryResult(columns, types, rows[:max_rows], round(elapsed, 3), truncated)

    # -- retention ----------------------------------------------------------------------------

    def apply_retention(self, retention: RetentionSettings) -> list[str]:
        """Set every table's TTL from ``retention``; returns the statements run.

        Run at each start, so a changed setting takes effect without a migration. With
        ``materialize_ttl_after_modify=0`` the ALTERs only change metadata (cheap on a big
        store); expired rows and bodies go during background merges.
        """
        db = self.database
        meta, bodies, aggs = retention.metadata_days, retention.bodies_days, retention.aggregates_days
        # On a cluster the TTLs belong to the shards' local tables.
        sfx, on = ("_local", self._on_cluster) if self.settings.cluster else ("", "")

        def alter(table: str, change: str) -> str:
            return f"ALTER TABLE {db}.{table}{sfx}{on} {change}"

        statements = [
            alter("call_records", f"MODIFY TTL toDateTime(time) + INTERVAL {meta} DAY"),
            *(
                alter("call_records", f"MODIFY COLUMN {column} TTL toDateTime(time) + INTERVAL {bodies} DAY")
                for column in ("request_body", "response_body")
            ),
            alter("events", f"MODIFY TTL toDateTime(time) + INTERVAL {meta} DAY"),
            alter("call_parts", f"MODIFY TTL toDateTime(first_event_at) + INTERVAL {bodies} DAY"),
            # Checkpoints outlive the rows they seal by a day, so verify can tell expiry from deletion.
            alter("audit_checkpoints", f"MODIFY TTL toDateTime(created_at) + INTERVAL {meta + 1} DAY"),
            *(
                alter(table, f"MODIFY TTL day + INTERVAL {aggs} DAY")
                for table in ("usage_daily", "usage_group_daily", "usage_skill_daily", "denials_daily")
            ),
        ]
        with self._use(self._writer) as client:
            for statement in statements:
                client.command(statement, settings={"materialize_ttl_after_modify": 0})
        log.info(
            "retention applied",
            extra={"bodies_days": bodies, "metadata_days": meta, "aggregates_days": aggs},
        )
        return statements

    # -- investigator reads -------------------------------------------------------------------

    def _read(self, sql: str, parameters: Mapping[str, Any], max_seconds: float = 30.0) -> Any:
        with self._use(self._analyst) as client:
            try:
                return client.query(
                    sql,
                    parameters=dict(parameters),
                    settings={"readonly": 1, "max_execution_time": max_seconds},
                )
            except ClickHouseError as exc:
                raise StoreError(_clean_error(str(exc))) from exc

    def search_calls(self, search: CallSearch) -> tuple[list[dict[str, Any]], str | None]:
        """One page of calls matching ``search``, newest first, and the next page's cursor.

        Keyset pagination on (time, call_id): every page is a primary-key range read however
        deep it is, so there is no depth cap (unlike OFFSET paging). Keywords use the ``text``
        indexes on the lower-cased bodies: every token must occur in the request or in the
        response.
        """
        where, params = search.conditions()
        sql = (
            f"SELECT {SEARCH_COLUMNS}, toUnixTimestamp64Milli(time) AS time_ms "  # noqa: S608
            f"FROM {self.database}.call_records FINAL WHERE {' AND '.join(where) or '1'} "
            "ORDER BY time DESC, call_id DESC LIMIT {limit:UInt32}"
        )
        params["limit"] = search.limit + 1
        result = self._read(sql, params)
        rows = [
            {name: _aware(v) for name, v in zip(result.column_names, row, strict=True)}
            for row in result.result_rows
        ]
        cursor = None
        if len(rows) > search.limit:
            rows = rows[: search.limit]
            cursor = encode_cursor(int(rows[-1]["time_ms"]), str(rows[-1]["call_id"]))
        for row in rows:
            row.pop("time_ms", None)
        return rows, cursor

    def call_record(self, call_id: str) -> dict[str, Any] | None:
        """The newest ``call_records`` row of one call (bodies included), or None."""
        result = self._read(
            f"SELECT * FROM {self.database}.call_records FINAL WHERE call_id = {{id:String}}",  # noqa: S608
            {"id": call_id},
        )
        if not result.result_rows:
            return None
        return {n: _aware(v) for n, v in zip(result.column_names, result.result_rows[0], strict=True)}

    def session_timeline(self, session_id: str, max_calls: int = 1000) -> dict[str, Any] | None:
        """The ordered timeline of a session: its calls and every event about them, or None.

        Calls come from ``call_records`` (the resolved session, bloom-filtered), the events from
        ``events`` through its primary key (call_id). Replies and forwarder bookkeeping are left
        out: they repeat what the terminal events say.
        """
        db = self.database
        calls = self._read(
            f"SELECT * FROM {db}.call_records FINAL WHERE session_id = {{s:String}} "  # noqa: S608
            "ORDER BY time, call_id LIMIT {n:UInt32}",
            {"s": session_id, "n": max_calls},
        )
        if not calls.result_rows:
            return None
        call_rows = [
            {n: _aware(v) for n, v in zip(calls.column_names, row, strict=True)} for row in calls.result_rows
        ]
        ids = _list_param(c["call_id"] for c in call_rows)
        events = self._read(
            f"SELECT event_id, event_type, topic, call_id, time, subject, username, payload "  # noqa: S608
            f"FROM {db}.events WHERE call_id {_in_list('ids')} "
            "AND event_type NOT IN ('CallReply', 'ForwarderClaim') "
            "ORDER BY time, event_id LIMIT 1 BY event_id",
            {"ids": ids},
        )
        event_rows = [
            {n: _aware(v) for n, v in zip(events.column_names, row, strict=True)}
            for row in events.result_rows
        ]
        return {"session_id": session_id, "calls": call_rows, "events": event_rows}

    def export(self, search: CallSearch, fmt: str, max_rows: int) -> bytes:
        """Matching calls (bodies included), oldest first, as JSONEachRow or Parquet bytes.

        ClickHouse writes the format itself, so Parquet needs no Python dependency.
        """
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"format must be one of {sorted(EXPORT_FORMATS)}")
        where, params = search.conditions()
        params["limit"] = max_rows
        sql = (
            f"SELECT * EXCEPT (version, counted) FROM {self.database}.call_records FINAL "  # noqa: S608
            f"WHERE {' AND '.join(where) or '1'} ORDER BY time, call_id LIMIT {{limit:UInt64}} "
            # In the statement, not as client settings: chDB's client applies those with SET,
            # which would leave this connection read-only for good.
            "SETTINGS readonly = 1, max_execution_time = 600"
        )
        with self._use(self._analyst) as client:
            try:
                return bytes(client.raw_query(sql, parameters=params, fmt=EXPORT_FORMATS[fmt]))
            except ClickHouseError as exc:
                raise StoreError(_clean_error(str(exc))) from exc

    def verify_chain(self, key: bytes, metadata_days: int, grace_seconds: float = 60.0) -> chain.VerifyReport:
        """Recompute the tamper-evidence chain over every stored event (see :mod:`.chain`)."""
        db = self.database
        cps = self._read(
            f"SELECT topic, partition, offsets, event_ids, digests, prev_chain, chain, key_id, signature, "  # noqa: S608
            f"toUnixTimestamp64Micro(created_at) FROM {db}.audit_checkpoints FINAL",
            {},
            max_seconds=600,
        )
        checkpoints = [
            chain.Checkpoint(str(t), int(p), tuple(o), tuple(e), tuple(d), str(pc), str(c), str(k), str(sig))
            for t, p, o, e, d, pc, c, k, sig, _ in cps.result_rows
        ]
        created = [int(r[9]) for r in cps.result_rows]
        result = self._read(
            f"SELECT {chain.DIGEST_SELECT}, toUnixTimestamp64Micro(inserted_at) "  # noqa: S608
            f"FROM {db}.events",
            {},
            max_seconds=600,
        )
        now = time.time_ns() // 1000
        return chain.verify(
            checkpoints,
            created,
            ((row[:-1], int(row[-1])) for row in result.result_rows),
            key,
            recent_before_us=now - int(grace_seconds * 1e6),
            expired_before_us=now - (metadata_days - 1) * 86_400_000_000,
        )


def _clean_error(message: str) -> str:
    """ClickHouse's message without the client's wrapping or the version trailer."""
    text = message.strip()
    text = re.sub(r"\s*\(version [^)]*\)\.?", "", text)
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:2000]
    return "query failed"
