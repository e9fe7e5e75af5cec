"""Settings of the recorder (pydantic-settings).

``SKILLGATE_CLICKHOUSE_*`` says where the audit store is; ``SKILLGATE_RECORDER_*`` how the
recorder batches, listens and bounds analysts' SQL. Defaults run the local stack with nothing
configured: an embedded chDB store under ``<SKILLGATE_DATA_DIR>/audit.chdb`` and the read API on
127.0.0.1:8081 (the ``recorder_url`` every other service and the CLI default to).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
CHDB_SCHEME = "chdb://"


class ClickHouseSettings(BaseSettings):
    """Where the audit store lives: embedded chDB (default) or a ClickHouse server."""

    model_config = SettingsConfigDict(env_prefix="SKILLGATE_CLICKHOUSE_", extra="ignore")

    url: str | None = Field(
        default=None,
        description="`chdb://<path>` for the embedded engine (`chdb:///abs/path` or "
        "`chdb://relative/path`, resolved to an absolute path) or `http(s)://host:port` for a "
        "ClickHouse server. Unset: `chdb://<SKILLGATE_DATA_DIR>/audit.chdb`. Only one process "
        "may open a chDB path, so with chDB the recorder is the only reader and serves the "
        "others through its API.",
    )
    database: str = Field(
        default="skillgate",
        description="Database holding the audit tables; analysts' SQL runs against it only.",
    )
    username: str | None = Field(default=None, description="ClickHouse server user (ignored by chDB).")
    password: SecretStr | None = Field(
        default=None, description="ClickHouse server password (ignored by chDB; never logged)."
    )

    cluster: str | None = Field(
        default=None,
        description="Name of a ClickHouse cluster (server only): the recorder then creates the "
        "cluster variant of the schema (Replicated tables per shard behind Distributed tables, "
        "`ON CLUSTER`; see deploy/clickhouse-cluster/README.md). Unset: one node.",
    )

    @field_validator("database", "cluster")
    @classmethod
    def _plain_identifier(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # The name is spliced into DDL and into the SQL guard, so only a plain identifier is
        # accepted: nothing that needs quoting, nothing that could smuggle SQL in.
        if not _IDENTIFIER.match(value):
            raise ValueError("database and cluster must be plain identifiers ([A-Za-z_][A-Za-z0-9_]*)")
        return value

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith((CHDB_SCHEME, "http://", "https://")):
            raise ValueError("url must start with chdb://, http:// or https://")
        return value

    def resolved_url(self, data_dir: Path) -> str:
        """The URL to connect to, with a chDB path made absolute.

        Why absolute: chDB compares engine paths literally and a process can host one engine
        path only, so every spelling of the same directory must become one path.
        """
        if self.url is None:
            return CHDB_SCHEME + str((data_dir / "audit.chdb").resolve())
        if self.is_chdb:
            return CHDB_SCHEME + str(Path(self.url[len(CHDB_SCHEME) :]).resolve())
        return self.url

    @property
    def is_chdb(self) -> bool:
        """True when the store is the embedded chDB engine (the default)."""
        return self.url is None or self.url.startswith(CHDB_SCHEME)

    def display_url(self, data_dir: Path) -> str:
        """The URL without credentials, for logs."""
        url = self.resolved_url(data_dir)
        if self.is_chdb:
            return url
        parsed = urlparse(url)
        host = parsed.hostname or ""
        port = f":{parsed.port}" if parsed.port else ""
        return f"{parsed.scheme}://{host}{port}"


class RecorderSettings(BaseSettings):
    """How the recorder batches inserts, serves its read API and bounds analysts' SQL."""

    model_config = SettingsConfigDict(env_prefix="SKILLGATE_RECORDER_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="Interface the read API listens on.")
    port: int = Field(
        default=8081, ge=0, le=65535, description="TCP port of the read API (0: any free port)."
    )
    group_id: str = Field(
        default="skillgate-recorder",
        description="Kafka consumer group; replicas of the recorder share the partitions.",
    )
    batch_max_events: int = Field(
        default=10000,
        ge=1,
        description="Insert as soon as this many events are buffered (ClickHouse prefers few "
        "large inserts to many small ones; a busy recorder fills its batches up to this from "
        "what the broker has buffered, so it also bounds the memory of a batch).",
    )
    batch_max_seconds: float = Field(
        default=1.0,
        gt=0,
        description="Insert at the latest this long after the oldest buffered event was "
        "produced: bounds how stale the audit store and async call state can be.",
    )
    batch_early_events: int = Field(
        default=250,
        ge=1,
        description="A batch holding at least this many events to store (streamed chunks and "
        "tombstones do not count) is inserted already batch_early_seconds after its oldest "
        "event was produced. Under that, waiting up to batch_max_seconds is cheaper: an insert "
        "costs about the same CPU whatever its size, and at low traffic frequent tiny inserts "
        "take CPU the gateway's own path needs. Above batch_max_events it never applies.",
    )
    batch_early_seconds: float = Field(
        default=0.25,
        gt=0,
        description="See batch_early_events (capped at batch_max_seconds): at busy times, how "
        "long after its oldest event was produced a batch is inserted.",
    )
    fold_cache_mb: int = Field(
        default=64,
        ge=1,
        description="Memory (MB, counted by masked body size) for the folded state of recently "
        "recorded calls: a call's next event extends it in memory instead of reading the call "
        "back from ClickHouse. Calls evicted, or with events another replica stored, are read back.",
    )
    retry_max_backoff_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Longest pause between two attempts of an insert while ClickHouse is "
        "unavailable (the backoff doubles from 0.2 s up to this).",
    )
    sql_max_rows: int = Field(default=10000, ge=1, description="Most rows an analyst's SQL query returns.")
    sql_max_seconds: float = Field(
        default=10.0, gt=0, description="Execution time limit of an analyst's SQL query."
    )
    sql_max_memory_bytes: int = Field(
        default=2 * 1024**3,
        ge=0,
        description="Memory limit of an analyst's SQL query (0: server default). With chDB the "
        "query runs inside the recorder, so a runaway query must not starve ingestion.",
    )
    checkpoint_key: SecretStr | None = Field(
        default=None,
        description="HMAC key that signs the tamper-evidence checkpoints. Unset: derived from the "
        "fingerprint key (SKILLGATE_FINGERPRINT_KEY or <data_dir>/fingerprint.key) with a fixed "
        "label, so no second secret is needed. Never logged; keep it outside the audit store.",
    )
    search_max_limit: int = Field(
        default=500, ge=1, description="Most calls one page of GET /v1/audit/calls returns."
    )
    export_max_rows: int = Field(
        default=10_000_000,
        ge=1,
        description="Most calls one export returns (a guard against exporting the whole store by mistake).",
    )


class RetentionSettings(BaseSettings):
    """How long the audit store keeps what (ClickHouse TTL, applied at every recorder start).

    Bodies (masked requests and responses) usually carry the most sensitive content and the most
    bytes, so they expire first; the metadata of a call (who, when, which model, what policy did)
    stays longer for investigations and usage reports. Changing a value needs no migration: the
    recorder issues ``ALTER TABLE ... MODIFY TTL`` at start-up (cheap, metadata only; rows expire
    during background merges).
    """

    model_config = SettingsConfigDict(env_prefix="SKILLGATE_RETENTION_", extra="ignore")

    bodies_days: int = Field(
        default=90,
        ge=1,
        description="Days the masked request and response bodies are kept (call_records columns, "
        "and call_parts, which folds them for the live `calls` view).",
    )
    metadata_days: int = Field(
        default=400,
        ge=1,
        description="Days call metadata is kept: call_records rows and the raw events log.",
    )
    aggregates_days: int = Field(
        default=800,
        ge=1,
        description="Days the daily usage and denial tables are kept (they hold no content).",
    )

    def model_post_init(self, context: object) -> None:
        """Bodies cannot outlive the row that holds them."""
        if self.bodies_days > self.metadata_days:
            raise ValueError("SKILLGATE_RETENTION_BODIES_DAYS must not exceed METADATA_DAYS")
