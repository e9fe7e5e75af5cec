"""Settings shared by every service (pydantic-settings, environment prefix ``SKILLGATE_``).

Defaults run the local stack with no configuration at all: Kafka on 127.0.0.1:9092, the dev OIDC
issuer on 127.0.0.1:8090, data under ./data. Services add their own settings classes with a longer
prefix (``SKILLGATE_INGRESS_``...), in their own ``config.py``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseSettings):
    """How to reach Kafka and how skillgate's topics are laid out."""

    model_config = SettingsConfigDict(env_prefix="SKILLGATE_KAFKA_", extra="ignore")

    bootstrap: str = Field(
        "127.0.0.1:9092",
        description="Comma-separated bootstrap servers. When set, every service and test uses "
        "this cluster instead of starting a local broker.",
    )
    topic_prefix: str = Field(
        "skillgate.",
        description="Prefix of every skillgate topic (lets several stacks share a cluster).",
    )
    partitions: int = Field(
        6,
        ge=1,
        description="Partitions of the call topics: the most replicas of one service that share work.",
    )
    replication_factor: int = Field(1, ge=1, description="Replication factor for topics skillgate creates.")
    security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    sasl_mechanism: str | None = Field(None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.")
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    ssl_cafile: Path | None = Field(None, description="CA bundle to verify the brokers' certificates.")
    create_topics: bool = Field(
        True,
        description="Create missing topics at service start (turn off where topics are managed elsewhere).",
    )
    submitted_retention_ms: int = Field(
        24 * 3600 * 1000,
        description="Retention of calls.submitted and calls.decided, which hold unmasked request "
        "bodies: keep it short.",
    )
    record_retention_ms: int = Field(
        7 * 24 * 3600 * 1000,
        description="Retention of the other topics (masked results, approvals, dead letters).",
    )
    replies_retention_ms: int = Field(
        3600 * 1000, description="Retention of calls.replies (answers for waiting callers)."
    )


class OIDCSettings(BaseSettings):
    """How callers' tokens are verified."""

    model_config = SettingsConfigDict(env_prefix="SKILLGATE_OIDC_", extra="ignore")

    issuer: str = Field(
        "http://127.0.0.1:8090",
        description="OIDC issuer URL; discovery is read from <issuer>/.well-known/openid-configuration. "
        "The default is the local dev issuer that `skillgate stack` starts.",
    )
    audience: str = Field("skillgate", description="Required `aud` of callers' tokens.")
    groups_claim: str = Field(
        "groups",
        description="Dotted path of the groups claim, e.g. `groups` or `realm_access.roles`; several "
        "comma-separated paths are merged (e.g. `groups,scp` so that machine callers' scopes count too).",
    )
    algorithms: list[str] = Field(
        default_factory=lambda: ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"],
        description="Accepted signature algorithms (asymmetric only; `none` and HS* are never accepted).",
    )
    leeway_seconds: int = Field(30, ge=0, le=300, description="Clock skew allowed on exp/nbf/iat.")
    jwks_refresh_min_interval_seconds: float = Field(
        30.0, description="At most one JWKS refresh per interval when tokens carry unknown key ids."
    )
    jwks_max_age_seconds: float = Field(
        300.0,
        gt=0,
        description="JWKS are re-fetched after this age: the longest a key removed at the IdP "
        "(say, after a compromise) keeps verifying tokens here. A failed re-fetch keeps the last "
        "known keys and is retried.",
    )
    max_token_bytes: int = Field(16384, description="Longer bearer tokens are refused unparsed.")


class RoleSettings(BaseSettings):
    """Which groups give which skillgate role."""

    model_config = SettingsConfigDict(env_prefix="SKILLGATE_ROLES_", extra="ignore")

    caller_groups: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Groups whose members may call Claude; `*` means any authenticated identity.",
    )
    approver_groups: list[str] = Field(
        default_factory=lambda: ["approvers"], description="Groups whose members may approve calls."
    )
    auditor_groups: list[str] = Field(
        default_factory=lambda: ["auditors"],
        description="Groups whose members may read the audit store.",
    )
    admin_groups: list[str] = Field(
        default_factory=lambda: ["admins"], description="Groups whose members administer skillgate."
    )


class CommonSettings(BaseSettings):
    """Settings every service reads."""

    model_config = SettingsConfigDict(env_prefix="SKILLGATE_", extra="ignore")

    data_dir: Path = Field(Path("data"), description="Where local state lives (chDB store, dev keys, Kafka).")
    log_level: str = Field("INFO", description="Log level of the JSON logs.")
    fingerprint_key: SecretStr | None = Field(
        None,
        description="HMAC key for fingerprints of masked values (hex or text). The same key must be "
        "set for policy, forwarder and recorder, or fingerprints cannot be compared. Default: "
        "generated once into <data_dir>/fingerprint.key (fine for one machine).",
    )
    recorder_url: str = Field(
        "http://127.0.0.1:8081",
        description="Base URL of the recorder's read API (async call state, SQL).",
    )
