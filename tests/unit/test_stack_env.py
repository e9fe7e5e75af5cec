"""The local stack hands upstream credentials to the forwarder only (invariant 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.stack import Stack


@pytest.mark.parametrize("use_stub", [True, False])
def test_only_the_forwarder_gets_upstream_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_stub: bool
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-the-shell")
    stack = Stack(data_dir=tmp_path, use_stub=use_stub)
    forwarder = stack.env_for("forwarder")
    assert "SKILLGATE_FORWARDER_UPSTREAMS" in forwarder
    assert forwarder["ANTHROPIC_API_KEY"] == "sk-ant-from-the-shell"
    for name in ("ingress", "policy", "recorder", "dev-issuer", "stub-upstream"):
        env = stack.env_for(name)
        assert "ANTHROPIC_API_KEY" not in env, name
        assert "SKILLGATE_FORWARDER_UPSTREAMS" not in env, name
        assert stack.stub_key not in "".join(env.values()) or name == "stub-upstream", name
