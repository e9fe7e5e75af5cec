"""Policy bundles: versioned YAML documents of ordered rules (``policies/*.yaml``).

This version knows the bundle envelope (name, version, default action). Rules are refused rather
than ignored: a bundle this engine cannot fully apply must fail closed, never be half-applied.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent.parent / "policies" / "default.yaml"


class BundleError(ValueError):
    """A bundle that cannot be applied; the message names the file and the field."""


@dataclass(frozen=True)
class Bundle:
    """A loaded, validated policy bundle."""

    name: str
    version: str
    sha256: str
    source: str
    default_action: str
    rules: tuple[dict[str, Any], ...]
    caller_upstreams: tuple[str, ...] = ("default",)

    @property
    def label(self) -> str:
        """``name@version``: what every decision records as the bundle version."""
        return f"{self.name}@{self.version}"


def parse_bundle(source: str, origin: str = "<bundle>") -> Bundle:
    """Validate YAML source and return the bundle, or raise :class:`BundleError`."""
    try:
        doc = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        raise BundleError(f"{origin}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise BundleError(f"{origin}: a bundle is a mapping with name, version and rules")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise BundleError(f"{origin}: field `name`: required string")
    sha = hashlib.sha256(source.encode()).hexdigest()
    version = doc.get("version")
    if version is None:
        version = sha[:12]
    if not isinstance(version, str) or not version:
        # A YAML number would be normalised (1.10 → "1.1") and two versions would record alike.
        raise BundleError(f'{origin}: field `version`: must be a quoted string, e.g. "1.10"')
    default_action = doc.get("default_action", "allow")
    if default_action not in ("allow", "deny"):
        raise BundleError(f"{origin}: field `default_action`: must be `allow` or `deny`")
    caller_upstreams = doc.get("caller_upstreams", ["default"])
    if not isinstance(caller_upstreams, list) or not all(isinstance(u, str) and u for u in caller_upstreams):
        raise BundleError(f"{origin}: field `caller_upstreams`: must be a list of upstream names")
    rules = doc.get("rules") or []
    if not isinstance(rules, list):
        raise BundleError(f"{origin}: field `rules`: must be a list")
    if rules:
        raise BundleError(
            f"{origin}: field `rules`: this skillgate version applies no rules yet; "
            "refusing the bundle rather than ignoring them"
        )
    return Bundle(
        name=name,
        version=str(version),
        sha256=sha,
        source=source,
        default_action=default_action,
        rules=tuple(rules),
        caller_upstreams=tuple(caller_upstreams),
    )


def load_bundle(path: Path) -> Bundle:
    """Load and validate a bundle file."""
    try:
        source = path.read_text()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_bundle(source, str(path))
