"""Signing keys and token minting of the dev OIDC issuer, usable without the server running.

DEVELOPMENT ONLY: whoever can read the key directory can mint a token for any identity. The
local stack and the tests use it so that tokens go through the real verification path
(:class:`skillgate.oidc.TokenVerifier`); a production gateway trusts a real IdP instead.

Files in the key directory (created with mode 0700; files mode 0600, written atomically):

``signing-keys.jwks.json``
    A private JWK set: RSA-2048 keys (``alg`` RS256, ``use`` sig, ``kid`` = RFC 7638 thumbprint)
    plus a non-standard ``signing_kid`` member naming the key that signs new tokens. Every key in
    the file is published (public half only) in the issuer's JWKS, so after :func:`rotate_keys`
    tokens signed with the previous key keep verifying until :func:`remove_key` drops it.
``client-secrets.json``
    Secrets generated for client-credentials clients configured without one.
``.lock``
    Serialises writers (the server, ``skillgate token``, tests) with ``flock``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import stat
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey
from pydantic import SecretStr

log = logging.getLogger(__name__)

SIGNING_ALG = "RS256"
KEY_SIZE_BITS = 2048
KEYS_FILE = "signing-keys.jwks.json"
SECRETS_FILE = "client-secrets.json"
LOCK_FILE = ".lock"

PathLike = str | os.PathLike[str]


class KeyFileError(RuntimeError):
    """The key directory holds something the dev issuer cannot use (say which file, never a key)."""


@dataclass(frozen=True)
class DevKeys:
    """The dev issuer's keys as read from one version of the key file.

    ``keys`` are private RSA keys, oldest first; ``signing_kid`` names the one that signs.
    """

    key_dir: Path
    keys: tuple[RSAKey, ...]
    signing_kid: str

    @property
    def signing_key(self) -> RSAKey:
        """The key new tokens are signed with."""
        for key in self.keys:
            if key.kid == self.signing_kid:
                return key
        raise KeyFileError(f"signing key {self.signing_kid!r} missing from {self.key_dir}")

    @property
    def kids(self) -> list[str]:
        """Key ids of every published key, oldest first."""
        return [str(key.kid) for key in self.keys]

    def public_jwks(self) -> dict[str, Any]:
        """The public JWK set (RFC 7517) that verifiers fetch: public halves of all keys."""
        return {"keys": [dict(key.as_dict(private=False)) for key in self.keys]}


@contextmanager
def _locked(key_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the key directory so concurrent writers cannot race."""
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(key_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _write_private_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only (mode 0600)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exact mode whatever the umask
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_private_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from a private file, tightening its mode to 0600 if it was wider."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "dev issuer key file was readable by others; setting mode 0600",
            extra={"path": str(path), "mode": oct(mode)},
        )
        path.chmod(0o600)
    try:
        value = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise KeyFileError(f"{path} is not valid JSON; delete it to start over") from exc
    if not isinstance(value, dict):
        raise KeyFileError(f"{path} does not hold a JSON object; delete it to start over")
    return value


def _new_key() -> RSAKey:
    """Generate an RSA-2048 RS256 signing key whose ``kid`` is its RFC 7638 thumbprint."""
    return RSAKey.generate_key(KEY_SIZE_BITS, parameters={"use": "sig", "alg": SIGNING_ALG}, auto_kid=True)


def _parse_keys(key_dir: Path, data: Mapping[str, Any]) -> DevKeys:
    path = key_dir / KEYS_FILE
    raw_keys = data.get("keys")
    signing_kid = data.get("signing_kid")
    if not isinstance(raw_keys, list) or not raw_keys or not isinstance(signing_kid, str):
        raise KeyFileError(f"{path} lacks `keys` or `signing_kid`; delete it to start over")
    keys: list[RSAKey] = []
    for raw in raw_keys:
        try:
            key = RSAKey.import_key(raw)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise KeyFileError(f"{path} holds a key that is not an RSA JWK") from exc
        if not key.is_private or not key.kid:
            raise KeyFileError(f"{path} holds a key without private part or kid")
        keys.append(key)
    if signing_kid not in {key.kid for key in keys}:
        raise KeyFileError(f"{path} names a signing key it does not hold; delete it to start over")
    return DevKeys(key_dir=key_dir, keys=tuple(keys), signing_kid=signing_kid)


def _save_keys(keys: DevKeys) -> None:
    _write_private_json(
        keys.key_dir / KEYS_FILE,
        {
            "keys": [dict(key.as_dict(private=True)) for key in keys.keys],
            "signing_kid": keys.signing_kid,
        },
    )


def _load_locked(key_dir: Path) -> DevKeys:
    """Load the keys, creating the first one; the caller holds the directory lock."""
    path = key_dir / KEYS_FILE
    if path.exists():
        return _parse_keys(key_dir, _read_private_json(path))
    key = _new_key()
    keys = DevKeys(key_dir=key_dir, keys=(key,), signing_kid=str(key.kid))
    _save_keys(keys)
    log.info("dev issuer generated its first signing key", extra={"kid": key.kid})
    return keys


def load_or_create_keys(key_dir: PathLike) -> DevKeys:
    """Load the signing keys from ``key_dir``, generating an RSA-2048 key on first use.

    Creating the key on demand lets ``skillgate token`` and the tests mint tokens before (or
    without) the server having started; the server and the CLI then share the same key.
    """
    directory = Path(key_dir)
    path = directory / KEYS_FILE
    if path.exists():  # files are replaced atomically, so an unlocked read sees a whole version
        return _parse_keys(directory, _read_private_json(path))
    with _locked(directory):
        return _load_locked(directory)


def rotate_keys(key_dir: PathLike) -> DevKeys:
    """Add a new signing key and make it the one that signs; the old keys stay published.

    This is the first half of a key rotation as a real IdP does it: verifiers learn the new
    ``kid`` from the JWKS while tokens signed with the old key remain valid until
    :func:`remove_key` retires it.
    """
    directory = Path(key_dir)
    with _locked(directory):
        current = _load_locked(directory)
        key = _new_key()
        rotated = DevKeys(key_dir=directory, keys=(*current.keys, key), signing_kid=str(key.kid))
        _save_keys(rotated)
    log.info("dev issuer rotated its signing key", extra={"kid": key.kid})
    return rotated


def remove_key(key_dir: PathLike, kid: str) -> DevKeys:
    """Stop publishing the key ``kid``, so tokens it signed stop verifying once verifiers refresh.

    The current signing key cannot be removed (rotate first); an unknown ``kid`` is an error,
    so a typo does not look like a successful retirement.
    """
    directory = Path(key_dir)
    with _locked(directory):
        current = _load_locked(directory)
        if kid == current.signing_kid:
            raise ValueError(f"key {kid!r} is the signing key; rotate_keys() before removing it")
        if kid not in current.kids:
            raise ValueError(f"no key {kid!r} in {directory / KEYS_FILE}")
        remaining = DevKeys(
            key_dir=directory,
            keys=tuple(k for k in current.keys if k.kid != kid),
            signing_kid=current.signing_kid,
        )
        _save_keys(remaining)
    log.info("dev issuer removed a key", extra={"kid": kid})
    return remaining


def _as_keys(source: DevKeys | PathLike) -> DevKeys:
    return source if isinstance(source, DevKeys) else load_or_create_keys(source)


def public_jwks(source: DevKeys | PathLike) -> dict[str, Any]:
    """The public JWK set of a key directory (or of already loaded keys), as served at /jwks."""
    return _as_keys(source).public_jwks()


def mint_token(
    key_dir_or_keys: DevKeys | PathLike,
    *,
    issuer: str,
    audience: str | Sequence[str],
    subject: str,
    groups: Sequence[str],
    expires_in: int,
    username: str | None = None,
    email: str | None = None,
    client_id: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    not_before: int | None = None,
) -> str:
    """Sign an RS256 access token (a JWT) with the current signing key.

    Works from the key files alone, without the server, which is how ``skillgate token`` and the
    tests get tokens. Claims: ``iss``, ``sub``, ``aud``, ``iat``, ``nbf``, ``exp``, a random
    ``jti``, ``typ`` (``Bearer``), ``groups``, and when given ``preferred_username``, ``email``
    and ``azp``/``client_id``. ``expires_in`` is relative to now and may be negative (an already
    expired token, for tests); ``not_before`` is absolute (Unix seconds, default now).
    ``extra_claims`` are applied last and override anything; a ``None`` value removes a claim,
    so tests can forge tokens that lack one.
    """
    if isinstance(groups, str):
        raise TypeError("groups must be a sequence of group names, not one string")
    if not subject:
        raise ValueError("subject must not be empty")
    keys = _as_keys(key_dir_or_keys)
    key = keys.signing_key
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer.rstrip("/"),
        "sub": subject,
        "aud": audience if isinstance(audience, str) else list(audience),
        "iat": now,
        "nbf": now if not_before is None else not_before,
        "exp": now + expires_in,
        "jti": str(uuid.uuid4()),
        "typ": "Bearer",
        "groups": list(groups),
    }
    if username is not None:
        claims["preferred_username"] = username
    if email is not None:
        claims["email"] = email
    if client_id is not None:
        claims["azp"] = client_id
        claims["client_id"] = client_id
    for name, value in (extra_claims or {}).items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    header = {"alg": SIGNING_ALG, "kid": keys.signing_kid, "typ": "JWT"}
    return jwt.encode(header, claims, key, algorithms=[SIGNING_ALG])


class KeyFileWatcher:
    """The current keys of a directory, re-read whenever the key file changes.

    The server consults it on every JWKS and token request (one ``stat``), so a rotation done by
    another process (a test, the CLI) is served without a restart.
    """

    def __init__(self, key_dir: PathLike) -> None:
        self._key_dir = Path(key_dir)
        self._stamp: tuple[int, int, int] | None = None
        self._keys: DevKeys | None = None

    def current(self) -> DevKeys:
        """The keys as they are on disk now (regenerated if the key file was deleted)."""
        try:
            st = (self._key_dir / KEYS_FILE).stat()
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if self._keys is None or stamp is None or stamp != self._stamp:
            # The stamp is taken before reading: a replacement racing with this read changes
            # the stamp again, so the next call re-reads rather than keeping a stale version.
            self._keys = load_or_create_keys(self._key_dir)
            self._stamp = stamp
        return self._keys


def load_or_create_client_secret(key_dir: PathLike, client_id: str) -> SecretStr:
    """The generated secret of ``client_id``, created (random, 256 bits) on first use.

    Stored mode 0600 in the key directory so the CLI can show it to a developer; it is never
    logged.
    """
    directory = Path(key_dir)
    path = directory / SECRETS_FILE
    if path.exists():
        stored = _read_private_json(path).get(client_id)
        if isinstance(stored, str) and stored:
            return SecretStr(stored)
    with _locked(directory):
        data = _read_private_json(path) if path.exists() else {}
        stored = data.get(client_id)
        if not (isinstance(stored, str) and stored):
            stored = secrets.token_urlsafe(32)
            data[client_id] = stored
            _write_private_json(path, data)
            log.info("dev issuer generated a client secret", extra={"client_id": client_id})
        return SecretStr(stored)
