"""Forwarder settings (environment prefix ``SKILLGATE_FORWARDER_``) and named upstream connections."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from skillgate.policy.bundle import DEFAULT_BUNDLE


class UpstreamConfig(BaseModel):
    """One named upstream connection: where to send calls and with which credential.

    The key comes from ``api_key`` (inline secret), ``api_key_env`` (an environment variable) or
    ``api_key_file`` (a mounted secret file), in that order. It lives only in the forwarder.
    """

    base_url: str = Field("https://api.anthropic.com", description="Upstream base URL.")
    api_key: SecretStr | None = Field(None, description="The API key itself (prefer env or file).")
    api_key_env: str | None = Field("ANTHROPIC_API_KEY", description="Environment variable holding the key.")
    api_key_file: Path | None = Field(None, description="File holding the key (e.g. a mounted secret).")
    auth_header: str = Field("x-api-key", description="Header that carries the key upstream.")
    max_connections: int = Field(512, description="Pooled connections to this upstream.")

    def key(self) -> SecretStr | None:
        """Resolve the credential (never logged)."""
        if self.api_key is not None:
            return self.api_key
        if self.api_key_env and os.environ.get(self.api_key_env):
            return SecretStr(os.environ[self.api_key_env])
        if self.api_key_file is not None:
            return SecretStr(self.api_key_file.read_text().strip())
        return None


class ForwarderSettings(BaseSettings):
    """How the forwarder consumes decisions and calls the upstream."""

    model_config = SettingsConfigDict(
        env_prefix="SKILLGATE_FORWARDER_", extra="ignore", populate_by_name=True
    )

    group_id: str = Field("skillgate-forwarder", description="Consumer group of the forwarder replicas.")
    upstreams: dict[str, UpstreamConfig] = Field(
        default_factory=lambda: {"default": UpstreamConfig()},
        description='Named upstream connections as JSON, e.g. {"default": {"base_url": '
        '"https://api.anthropic.com", "api_key_env": "ANTHROPIC_API_KEY"}}; policy chooses one per call.',
    )
    max_in_flight: int = Field(
        512,
        description="Calls in flight at once per replica; consumption pauses beyond it (backpressure).",
    )
    max_attempts: int = Field(4, ge=1, description="Upstream attempts per call, the first included.")
    backoff_initial_seconds: float = Field(0.5, description="First retry delay (doubles, with jitter).")
    backoff_max_seconds: float = Field(
        30.0,
        description="Longest wait before a retry; a longer retry-after is relayed to the caller instead.",
    )
    connect_timeout_seconds: float = Field(10.0, description="Connect timeout to the upstream.")
    read_timeout_seconds: float = Field(600.0, description="Read timeout for one upstream response.")
    claims_window_seconds: float = Field(
        1800.0,
        description="How long finished calls are remembered, so a decision that policy re-emits "
        "(after a policy restart) is recognised. Unfinished claims are always kept, and a replica "
        "taking over a partition reads claims from its committed offset on, however old.",
    )
    commit_interval_seconds: float = Field(0.2, description="How often finished offsets are committed.")
    stream_holdback_chars: int = Field(
        256,
        ge=0,
        description="Streamed answers: the text hold-back window for detector patterns whose structure "
        "cannot be analysed (custom patterns with RE2-only syntax such as `[[:alpha:]]`). Every other "
        "pattern holds back only the tail that could still become one of its values (in prose, the last "
        "word), whatever its length.",
    )
    stream_max_hold_chars: int = Field(
        16 * 1024,
        ge=256,
        description="Streamed answers: the most text held back at once (a value, or what could still "
        "become one, such as a PEM block without its end line); beyond it the oldest text is released, "
        "masked where it holds a value (bounds memory per stream).",
    )
    stream_max_chunk_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Streamed answers: the most SSE bytes in one chunk message on calls.replies.",
    )
    stream_chunks_in_flight: int = Field(
        8,
        ge=1,
        description="Streamed answers: chunk messages of one call awaiting their ack at once (the "
        "producer keeps them in order); beyond it, what arrives is batched into bigger chunks.",
    )
    approvals_url: str = Field(
        "http://127.0.0.1:8080",
        validation_alias="SKILLGATE_POLICY_APPROVALS_URL",
        description="Public ingress URL named in the explanation of a tool call held for approval "
        "(read from SKILLGATE_POLICY_APPROVALS_URL, as the policy service and ingress do).",
    )
    bundle: Path = Field(
        DEFAULT_BUNDLE,
        validation_alias="SKILLGATE_POLICY_BUNDLE",
        description="Policy bundle whose tool rules and detectors the forwarder applies to responses. "
        "Read from SKILLGATE_POLICY_BUNDLE, the variable the policy service reads, so both apply the "
        "same file. An invalid bundle makes every allowed call fail closed (503), nothing is forwarded.",
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the /metrics endpoint.")
    metrics_port: int = Field(9102, description="Port of the /metrics endpoint (0 disables it).")
