"""``skillgate stack`` (what ``make run`` runs): Kafka, the dev issuer, the stub upstream (when no
``ANTHROPIC_API_KEY`` is set), and the four services, each its own process, wired together.

The integration tests start the same :class:`Stack`, so they exercise exactly what users run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from skillgate.localkafka import LocalKafka, free_port

SERVICES = ("recorder", "policy", "forwarder", "ingress")

#: Environment variables that may hold upstream credentials (only the forwarder gets them).
CREDENTIAL_VARS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")


@dataclass
class StackPorts:
    """Ports of the local stack (defaults are the documented ones)."""

    ingress: int = 8080
    recorder: int = 8081
    dev_issuer: int = 8090
    stub: int = 8099
    kafka: int = 9092
    policy_metrics: int = 9101
    forwarder_metrics: int = 9102

    @classmethod
    def free(cls) -> StackPorts:
        """Random free ports, for tests running beside a developer's stack."""
        return cls(*(free_port() for _ in range(7)))


@dataclass
class Stack:
    """Starts and stops the local stack as child processes."""

    data_dir: Path
    ports: StackPorts = field(default_factory=StackPorts)
    kafka_bootstrap: str | None = None
    topic_prefix: str = "skillgate."
    upstream_url: str | None = None
    use_stub: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    kafka: LocalKafka | None = None
    stub_key: str = field(default_factory=lambda: "sk-stub-" + secrets.token_hex(16))
    #: An external OIDC issuer (Keycloak, Okta, Entra ID...) to trust instead of the dev issuer,
    #: which is then not started; tokens come from that IdP, not from :meth:`token`.
    issuer_override: str | None = None

    @property
    def ingress_url(self) -> str:
        """Where callers send requests."""
        return f"http://127.0.0.1:{self.ports.ingress}"

    @property
    def issuer_url(self) -> str:
        """The OIDC issuer the services trust: ``issuer_override``, else the dev issuer."""
        if self.issuer_override is not None:
            return self.issuer_override
        return f"http://127.0.0.1:{self.ports.dev_issuer}"

    @property
    def recorder_url(self) -> str:
        """The recorder's read API."""
        return f"http://127.0.0.1:{self.ports.recorder}"

    @property
    def stub_url(self) -> str:
        """The stub upstream."""
        return f"http://127.0.0.1:{self.ports.stub}"

    def env(self) -> dict[str, str]:
        """Environment every child process gets."""
        bootstrap = self.kafka_bootstrap or f"127.0.0.1:{self.ports.kafka}"
        upstream: dict[str, object]
        if self.use_stub:
            upstream = {"base_url": self.stub_url, "api_key": self.stub_key, "api_key_env": None}
        else:
            upstream = {"base_url": self.upstream_url or "https://api.anthropic.com"}
        env = {
            **os.environ,
            "SKILLGATE_KAFKA_BOOTSTRAP": bootstrap,
            "SKILLGATE_KAFKA_TOPIC_PREFIX": self.topic_prefix,
            "SKILLGATE_DATA_DIR": str(self.data_dir),
            "SKILLGATE_OIDC_ISSUER": self.issuer_url,
            "SKILLGATE_DEV_ISSUER_PORT": str(self.ports.dev_issuer),
            "SKILLGATE_STUB_PORT": str(self.ports.stub),
            "SKILLGATE_STUB_API_KEY": self.stub_key,
            "SKILLGATE_FORWARDER_UPSTREAMS": json.dumps({"default": upstream}),
            "SKILLGATE_RECORDER_PORT": str(self.ports.recorder),
            "SKILLGATE_RECORDER_URL": self.recorder_url,
            "SKILLGATE_INGRESS_PORT": str(self.ports.ingress),
            "SKILLGATE_POLICY_METRICS_PORT": str(self.ports.policy_metrics),
            "SKILLGATE_POLICY_DATA_DIR": str(self.data_dir / "policy"),
            "SKILLGATE_FORWARDER_METRICS_PORT": str(self.ports.forwarder_metrics),
            "PYTHONUNBUFFERED": "1",
        }
        env.update(self.extra_env)
        return env

    def env_for(self, name: str) -> dict[str, str]:
        """The environment of one child: upstream credentials reach the forwarder only.

        Invariant 2: the key exists only in the forwarder, so the other services do not even
        inherit ``ANTHROPIC_API_KEY`` from the shell that started the stack.
        """
        env = self.env()
        if name != "forwarder":
            for var in CREDENTIAL_VARS:
                env.pop(var, None)
            env.pop("SKILLGATE_FORWARDER_UPSTREAMS", None)
        if name != "stub-upstream":
            env.pop("SKILLGATE_STUB_API_KEY", None)
        return env

    def _spawn(self, name: str, *args: str) -> None:
        log_dir = self.log_dir or self.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        out = (log_dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", *args],
            env=self.env_for(name),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _wait_http(self, name: str, url: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; see its log in {self.log_path(name)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)  # polling a condition with a deadline
        raise TimeoutError(f"{name} not ready at {url} within {timeout}s; see {self.log_path(name)}")

    def log_path(self, name: str) -> Path:
        """Where a child's output goes."""
        return (self.log_dir or self.data_dir / "logs") / f"{name}.log"

    def start(self, services: Sequence[str] = SERVICES) -> None:
        """Start Kafka, the issuer, the stub and ``services`` (all four by default), and wait
        until each part answers. A benchmark of one service starts only that one."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.kafka_bootstrap is None:
            self.kafka = LocalKafka(self.data_dir / "kafka", port=self.ports.kafka)
            self.kafka.start()
        if self.issuer_override is None:
            self._spawn("dev-issuer", "dev-issuer")
        if self.use_stub:
            self._spawn("stub-upstream", "stub-upstream")
        issuer = "dev-issuer" if self.issuer_override is None else "issuer"
        self._wait_http(issuer, f"{self.issuer_url}/.well-known/openid-configuration")
        if self.use_stub:
            self._wait_http("stub-upstream", f"{self.stub_url}/_stub/health")
        for name in services:
            self.start_service(name)
        if "recorder" in services:
            self._wait_http("recorder", f"{self.recorder_url}/healthz")
        if "ingress" in services:
            self._wait_http("ingress", f"{self.ingress_url}/readyz")

    def start_service(self, name: str) -> None:
        """(Re)start one of the four services."""
        self._spawn(name, name)

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop one child (SIGTERM, then SIGKILL after ``timeout``; ``sig=SIGKILL`` to crash it)."""
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        """Stop the services (ingress first, so no new calls arrive), then Kafka."""
        for name in ("ingress", "forwarder", "policy", "recorder", "stub-upstream", "dev-issuer"):
            self.stop_service(name)
        if self.kafka is not None:
            self.kafka.stop()

    def token(self, user: str, groups: list[str], expires_in: int = 3600) -> str:
        """A token from this stack's dev issuer (signed with its key files)."""
        if self.issuer_override is not None:
            raise RuntimeError("this stack trusts an external issuer: get tokens from that IdP")
        from services.dev_issuer.config import DevIssuerSettings
        from services.dev_issuer.main import token_command

        settings = DevIssuerSettings(issuer=self.issuer_url, key_dir=self.data_dir / "dev-issuer")
        return token_command(user, groups, expires_in, settings)

    def failed(self) -> list[str]:
        """Children that exited on their own."""
        return [n for n, p in self.procs.items() if p.poll() is not None]
