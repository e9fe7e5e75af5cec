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

    @field_validator("database")
    @classmethod
    def _plain_identifier(cls, value: str) -> str:
        # The name is spliced into DDL and into the SQL guard, so only a plain identifier is
        # accepted: nothing that needs quoting, nothing that could smuggle SQL in.
        if not _IDENTIFIER.match(value):
            raise ValueError("database must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")
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
        default=5000,
        ge=1,
        description="Insert as soon as this many events are buffered (ClickHouse prefers few "
        "large inserts to many small ones).",
    )
    batch_max_seconds: float = Field(
        default=0.25,
        gt=0,
        description="Insert at the latest this long after the first buffered event: bounds how "
        "stale the audit store and async call state can be.",
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
