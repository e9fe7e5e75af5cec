"""Caller identity from verified token claims, and skillgate roles from groups."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from skillgate.config import RoleSettings
from skillgate.events import Identity


class Role(StrEnum):
    """What an identity may do in skillgate."""

    CALLER = "caller"
    APPROVER = "approver"
    AUDITOR = "auditor"
    ADMIN = "admin"


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """Read a dotted claim path such as ``realm_access.roles``; None when absent."""
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def groups_from_claims(claims: Mapping[str, Any], groups_claim: str = "groups") -> list[str]:
    """Group names from one or more comma-separated dotted claim paths (``groups,scp``), merged.

    Each claim may hold a list or a single string. A path-like name (Keycloak's full group path)
    keeps its path without the leading ``/``: ``/approvers`` is ``approvers``, ``/org/admins`` is
    ``org/admins``. Never just the last segment: whoever may create a subgroup ``admins`` anywhere
    in the IdP must not become a skillgate admin.
    """
    names: set[str] = set()
    for path in (p.strip() for p in groups_claim.split(",")):
        raw = claim_at(claims, path) if path else None
        values = [raw] if isinstance(raw, str) else raw if isinstance(raw, list | tuple) else []
        names.update(str(v).lstrip("/") for v in values if isinstance(v, str | int))
    names.discard("")
    return sorted(names)


def identity_from_claims(claims: Mapping[str, Any], groups_claim: str = "groups") -> Identity:
    """Build the event identity from verified claims (never from the token string)."""
    groups = groups_from_claims(claims, groups_claim)

    def opt(key: str) -> str | None:
        value = claims.get(key)
        return str(value) if value not in (None, "") else None

    return Identity(
        subject=str(claims["sub"]),
        issuer=str(claims.get("iss", "")),
        username=opt("preferred_username"),
        email=opt("email"),
        groups=groups,
        # The OAuth client: `azp` (OIDC; Keycloak, Entra v2), `client_id` (RFC 9068; Keycloak's
        # service accounts), `cid` (Okta), `appid` (Entra v1 tokens).
        client_id=opt("azp") or opt("client_id") or opt("cid") or opt("appid"),
        token_id=opt("jti"),
    )


def roles_for(identity: Identity, settings: RoleSettings) -> set[Role]:
    """The roles an identity has under the configured group mapping."""
    groups = set(identity["groups"])

    def has(allowed: list[str]) -> bool:
        return "*" in allowed or bool(groups.intersection(allowed))

    roles = set()
    if has(settings.caller_groups):
        roles.add(Role.CALLER)
    if has(settings.approver_groups):
        roles.add(Role.APPROVER)
    if has(settings.auditor_groups):
        roles.add(Role.AUDITOR)
    if has(settings.admin_groups):
        roles |= {Role.ADMIN, Role.AUDITOR, Role.APPROVER, Role.CALLER}
    return roles
