"""Policy service settings (environment prefix ``SKILLGATE_POLICY_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from skillgate.policy.bundle import DEFAULT_BUNDLE


class PolicySettings(BaseSettings):
    """How the policy service runs."""

    model_config = SettingsConfigDict(env_prefix="SKILLGATE_POLICY_", extra="ignore")

    app_id: str = Field(
        "skillgate-policy",
        description="faust app id: the consumer group and prefix of faust's own topics.",
    )
    bundle: Path = Field(DEFAULT_BUNDLE, description="Policy bundle file applied to every call.")
    concurrency: int = Field(
        32,
        ge=1,
        description="Decisions in progress at once per replica. Each waits for Kafka's ack of its "
        "writes, so too few actors queue calls behind acks: at 64 connections, 8 actors gave a p99 of "
        "1.4 s and 32 gave 0.6 s at the same throughput.",
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the /metrics endpoint.")
    metrics_port: int = Field(9101, description="Port of the /metrics endpoint (0 disables it).")
    commit_interval_seconds: float = Field(
        0.5,
        description="How often faust commits processed offsets (after flushing what it produced): "
        "the most work redone after a crash.",
    )
    data_dir: Path = Field(Path("data/policy"), description="faust's local state (table stores).")
    session_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Kafka group session timeout: after a replica crashes, its partitions (and the "
        "calls on them) wait this long before another replica or its restart takes them over "
        "(faust's default is 60 s).",
    )
    approvals_url: str = Field(
        "http://127.0.0.1:8080",
        description="Public base URL of the ingress, for the deep link in approval announcements "
        "(`<url>/v1/approvals/<id>`).",
    )
    approval_webhooks: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Webhook URL per approver group (JSON object, e.g. "
        '`{"approvers": "https://hooks.slack.com/services/..."}`); secret because such URLs '
        "embed a token. A request is announced to the webhook of each group it is routed to.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 key that signs every webhook body (`x-skillgate-signature`); "
        "required when webhooks are configured.",
    )
    webhook_attempts: int = Field(5, ge=1, description="Delivery attempts per announcement.")
    webhook_backoff_seconds: float = Field(
        0.5, gt=0, description="Wait before the first retry; doubles after each failed attempt."
    )
    webhook_timeout_seconds: float = Field(5.0, gt=0, description="Timeout of one webhook attempt.")
    expiry_check_seconds: float = Field(
        1.0, gt=0, description="How often pending approvals are checked for expiry."
    )

    @model_validator(mode="after")
    def _signed_webhooks(self) -> PolicySettings:
        if self.approval_webhooks and self.webhook_secret is None:
            raise ValueError("SKILLGATE_POLICY_WEBHOOK_SECRET is required when approval webhooks are set")
        return self
