"""Settings of the stub upstream (pydantic-settings, environment prefix ``SKILLGATE_STUB_``)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class StubSettings(BaseSettings):
    """How the stub Messages API listens and how it paces its answers."""

    model_config = SettingsConfigDict(env_prefix="SKILLGATE_STUB_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="Interface to listen on.")
    port: int = Field(default=8099, ge=0, le=65535, description="TCP port to listen on (0: any free port).")
    latency_ms: float = Field(
        default=0.0,
        ge=0.0,
        description="Milliseconds added before every API answer (on top of a request's "
        "x-stub-latency-ms), to imitate model latency.",
    )
    stream_chunk_chars: int = Field(
        default=8,
        ge=1,
        description="Characters per text_delta / thinking_delta / input_json_delta event of a stream.",
    )
    stream_chunk_delay_ms: float = Field(
        default=0.0,
        ge=0.0,
        description="Milliseconds to wait between two content deltas of a stream "
        "(a request's x-stub-chunk-delay-ms overrides it).",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="If set, requests must carry exactly this key (x-api-key, or Authorization: "
        "Bearer as the SDK sends it); if not, any non-empty key is accepted. A missing key is "
        "always a 401 authentication_error.",
    )
    max_recorded: int = Field(
        default=10000,
        ge=0,
        description="Requests kept in memory for GET /_stub/requests; the oldest are dropped "
        "first (0 records nothing, for benchmarks).",
    )
