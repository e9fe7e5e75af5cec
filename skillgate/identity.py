"""Caller identity from verified token claims, and skillgate roles from groups."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


def identity_from_claims(claims: Mapping[str, Any], groups_claim: str = "groups") -> Identity:
    """Build the event identity from verified claims (never from the token string)."""
    raw_groups = claim_at(claims, groups_claim)
    groups: list[str]
    if isinstance(raw_groups, str):
        groups = [raw_groups]
    elif isinstance(raw_groups, Iterable):
        # Keycloak's group claim carries paths such as "/approvers"; the name is what matters.
        groups = sorted({str(g).rsplit("/", 1)[-1] for g in raw_groups if str(g)})
    else:
        groups = []

    def opt(key: str) -> str | None:
        value = claims.get(key)
        return str(value) if value not in (None, "") else None

    return Identity(
        subject=str(claims["sub"]),
        issuer=str(claims.get("iss", "")),
        username=opt("preferred_username"),
        email=opt("email"),
        groups=groups,
        client_id=opt("azp") or opt("client_id"),
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
