"""Ingress settings (environment prefix ``SKILLGATE_INGRESS_``)."""

from __future__ import annotations

import os
import socket
import uuid

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class IngressSettings(BaseSettings):
    """How the ingress listens and how long it lets callers wait."""

    model_config = SettingsConfigDict(env_prefix="SKILLGATE_INGRESS_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, description="Port to listen on.")
    workers: int = Field(
        1,
        ge=1,
        description="Worker processes (each is a full replica with its own reply partitions).",
    )
    instance_id: str = Field(
        default_factory=_default_instance,
        description="Id of this replica, written into each call (for diagnostics).",
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024,
        description="Largest request body accepted (the Messages API allows 32 MB).",
    )
    sync_timeout_seconds: float = Field(
        540.0,
        description="How long a synchronous caller is held before 504 with the call id to poll "
        "(below the SDKs' 600 s default timeout, so the caller hears it rather than retrying).",
    )
    approval_wait_seconds: float = Field(
        60.0,
        gt=0,
        description="How long a synchronous caller whose call needs approval is held for the "
        "decision; after that it gets a 403 naming the approval id, and retries with header "
        "`x-skillgate-approval: <id>` once approved.",
    )
    approval_decision_wait_seconds: float = Field(
        2.0,
        ge=0,
        description="How long POST /v1/approvals/{id}/approve|deny waits for the policy service to "
        "judge the decision, so the answer shows the resulting state.",
    )
    approvals_url: str = Field(
        "http://127.0.0.1:8080",
        validation_alias="SKILLGATE_POLICY_APPROVALS_URL",
        description="Public base URL where approvers reach the approvals API (read from "
        "SKILLGATE_POLICY_APPROVALS_URL, the variable the policy service uses for webhook links).",
    )
    stream_ping_seconds: float = Field(
        5.0,
        gt=0,
        description="Streamed calls: send a `ping` event when nothing was sent to the caller for this "
        "long (keeps proxies and clients from timing out while the model thinks).",
    )
    replies_group: str = Field(
        "skillgate-ingress-replies",
        description="Consumer group through which ingress replicas share the partitions of calls.replies.",
    )
