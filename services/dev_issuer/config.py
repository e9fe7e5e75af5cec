"""Settings of the dev OIDC issuer (pydantic-settings, env prefix ``SKILLGATE_DEV_ISSUER_``).

DEVELOPMENT ONLY. The dev issuer exists so that the local stack and the tests exercise the same
token validation path (:class:`skillgate.oidc.TokenVerifier`) as production does against a real
IdP. It mints a token for anyone who asks on the command line; never point a production gateway
at it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from skillgate.config import CommonSettings

#: The client that exists when ``SKILLGATE_DEV_ISSUER_CLIENTS`` is not set.
DEFAULT_CLIENT_ID = "skillgate-ci"


class DevClient(BaseModel):
    """One client allowed to use the client-credentials grant of the dev issuer."""

    secret: SecretStr | None = Field(
        default=None,
        description="The client's secret. When unset, a random secret is generated on first start "
        "and kept (mode 0600) in the key directory, where the console shows it on request (it is "
        "never logged).",
    )
    groups: list[str] = Field(
        default_factory=list,
        description="Groups put in the `groups` claim of this client's tokens.",
    )

    @field_validator("secret")
    @classmethod
    def _secret_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("a client secret must not be empty (leave it unset to generate one)")
        return value


def _default_clients() -> dict[str, DevClient]:
    return {DEFAULT_CLIENT_ID: DevClient(groups=["ci"])}


class DevIssuerSettings(BaseSettings):
    """Where the dev issuer listens, what it signs with, and which clients it knows.

    Development only: see the module docstring.
    """

    model_config = SettingsConfigDict(env_prefix="SKILLGATE_DEV_ISSUER_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="Interface to listen on.")
    port: int = Field(default=8090, ge=1, le=65535, description="TCP port to listen on.")
    issuer: str | None = Field(
        default=None,
        description="The `iss` of minted tokens and of the discovery document; must equal the "
        "gateway's SKILLGATE_OIDC_ISSUER. Default: http://{host}:{port} (127.0.0.1 when bound "
        "to all interfaces).",
    )
    key_dir: Path | None = Field(
        default=None,
        description="Directory of the signing keys and generated client secrets (files mode "
        "0600). Default: <SKILLGATE_DATA_DIR>/dev-issuer.",
    )
    audience: str = Field(default="skillgate", description="`aud` of the tokens the issuer mints by default.")
    default_ttl_seconds: int = Field(
        default=3600, ge=1, description="Lifetime of minted tokens when none is asked for."
    )
    max_ttl_seconds: int = Field(
        default=86400, ge=1, description="Longest lifetime a minted token may be given."
    )
    clients: dict[str, DevClient] = Field(
        default_factory=_default_clients,
        description="Clients of the client-credentials grant, as JSON: "
        '{"client_id": {"secret": "...", "groups": ["..."]}}. A client without a secret gets a '
        "generated one, stored in the key directory. Default: one client `skillgate-ci` "
        "(groups `ci`) with a generated secret.",
    )

    @field_validator("issuer")
    @classmethod
    def _issuer_is_http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("issuer must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _ttls_are_consistent(self) -> DevIssuerSettings:
        if self.default_ttl_seconds > self.max_ttl_seconds:
            raise ValueError("default_ttl_seconds must not exceed max_ttl_seconds")
        return self

    @property
    def issuer_url(self) -> str:
        """The issuer URL actually used (``issuer`` or the one derived from host and port)."""
        if self.issuer is not None:
            return self.issuer.rstrip("/")
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def key_path(self) -> Path:
        """The key directory actually used (``key_dir`` or ``<data dir>/dev-issuer``)."""
        if self.key_dir is not None:
            return self.key_dir
        return CommonSettings().data_dir / "dev-issuer"
