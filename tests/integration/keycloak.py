"""A real Keycloak for the integration tests: fetched from Maven Central, run with no Docker.

skillgate must work with any standards-compliant OIDC provider; the dev issuer proves the
verification path, Keycloak proves that tokens minted by a real IdP (its claims, its keys, its
client-credentials and password grants, its group mapper) go through it unchanged.

- **Distribution**: ``org.keycloak:keycloak-quarkus-dist`` (zip, ~177 MB) resolved by
  ``deploy/keycloak/pom.xml`` with ``mvn dependency:copy-dependencies`` and unpacked once under
  ``.cache/keycloak/<version>/`` (``SKILLGATE_CACHE_DIR`` moves ``.cache``). A file lock makes
  concurrent first runs download and unpack once; a marker file makes later runs free.
- **Java**: Keycloak 26 needs Java 21 or newer. ``SKILLGATE_KEYCLOAK_JAVA_HOME`` if set, else
  ``JAVA_HOME`` if it is new enough, else the newest JDK under ``/usr/lib/jvm`` that is (the
  development machines carry Temurin 25 beside the default Java 17), else ``java`` on PATH.
- **Run**: ``kc.sh start-dev`` on a free 127.0.0.1 port, a temporary admin from
  ``KC_BOOTSTRAP_ADMIN_USERNAME``/``KC_BOOTSTRAP_ADMIN_PASSWORD`` (random password), the
  ``dev-file`` (H2) database and the transaction log in a per-run directory, so runs never share
  state. Readiness is the master realm's discovery document, polled with a deadline; the first
  start also builds Keycloak's optimised classpath in the distribution (~20 s, once), under the
  same lock so two runs never build at the same time.
- **Failure**: anything outside our control (Maven Central unreachable, no Java 21, Keycloak not
  answering) raises :class:`KeycloakUnavailable` with what to do, never a silent skip.

``python -m tests.integration.keycloak`` starts one for manual experiments and prints how to
reach it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from skillgate.localkafka import free_port
from skillgate.maven import MavenError, copy_dependencies

log = logging.getLogger(__name__)

KEYCLOAK_VERSION = "26.7.3"
REPO_ROOT = Path(__file__).resolve().parents[2]
POM = REPO_ROOT / "deploy" / "keycloak" / "pom.xml"
MIN_JAVA = 21
#: Seconds allowed for the Maven download (177 MB).
DOWNLOAD_TIMEOUT_S = 600.0
#: Seconds allowed from ``kc.sh start-dev`` to discovery (the first start builds the classpath).
START_TIMEOUT_S = 300.0


class KeycloakUnavailable(RuntimeError):
    """Keycloak could not be fetched or started; the message says why and what to do."""


def cache_dir() -> Path:
    """Where the distribution is cached (``SKILLGATE_CACHE_DIR`` or the repo's ``.cache``)."""
    root = Path(os.environ.get("SKILLGATE_CACHE_DIR", REPO_ROOT / ".cache"))
    return root / "keycloak" / KEYCLOAK_VERSION


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``<cache>/<name>`` (other test sessions wait here)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / name).open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def ensure_distribution() -> Path:
    """The unpacked Keycloak home, downloaded from Maven Central and unpacked on first use."""
    home = cache_dir() / f"keycloak-{KEYCLOAK_VERSION}"
    marker = cache_dir() / ".complete"
    if marker.exists():
        return home
    with _cache_lock(".lock"):
        if marker.exists():
            return home
        download = cache_dir() / "download"
        started = time.monotonic()
        log.info("fetching Keycloak %s from Maven Central", KEYCLOAK_VERSION)
        try:
            copy_dependencies(
                POM,
                download,
                {"keycloak.version": KEYCLOAK_VERSION},
                exclude_transitive=True,
                timeout=DOWNLOAD_TIMEOUT_S,
            )
        except MavenError as exc:
            raise KeycloakUnavailable(
                f"could not fetch org.keycloak:keycloak-quarkus-dist:{KEYCLOAK_VERSION}:zip: {exc}"
            ) from exc
        archive = download / f"keycloak-quarkus-dist-{KEYCLOAK_VERSION}.zip"
        if not archive.exists():
            raise KeycloakUnavailable(f"Maven finished but {archive} is missing")
        fetched = time.monotonic()
        partial = cache_dir() / "unpacking"
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(partial)  # the archive comes from Maven Central, checksummed by Maven
        shutil.rmtree(home, ignore_errors=True)
        (partial / f"keycloak-{KEYCLOAK_VERSION}").rename(home)
        shutil.rmtree(partial, ignore_errors=True)
        for script in (home / "bin").glob("*.sh"):
            script.chmod(0o755)  # zipfile does not keep the execute bit
        archive.unlink()  # Maven keeps its own copy in ~/.m2; the unpacked tree is what we run
        marker.write_text(f"download {fetched - started:.1f}s, unpack {time.monotonic() - fetched:.1f}s\n")
        log.info("Keycloak unpacked into %s", home)
    return home


def _java_major(java: Path) -> int | None:
    """The major version of a ``java`` binary (from its JDK's ``release`` file or ``-version``)."""
    release = java.parent.parent / "release"
    text = ""
    if release.exists():
        text = release.read_text(errors="replace")
        found = re.search(r'JAVA_VERSION="(\d+)', text)
        if found:
            return int(found.group(1))
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([str(java), "-version"], capture_output=True, timeout=30, check=False)
        found = re.search(r'version "(\d+)', out.stderr.decode(errors="replace"))
        if found:
            return int(found.group(1))
    return None


def find_java_home() -> Path:
    """A JDK home whose Java is 21 or newer (see the module doc for the search order)."""
    candidates: list[Path] = []
    configured = os.environ.get("SKILLGATE_KEYCLOAK_JAVA_HOME")
    if configured:
        java = Path(configured) / "bin" / "java"
        major = _java_major(java) if java.exists() else None
        if major is None or major < MIN_JAVA:
            raise KeycloakUnavailable(
                f"SKILLGATE_KEYCLOAK_JAVA_HOME={configured} is not a Java {MIN_JAVA}+ home (found {major})"
            )
        return Path(configured)
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]))
    jvm_root = Path("/usr/lib/jvm")
    if jvm_root.is_dir():
        candidates += sorted((p for p in jvm_root.iterdir() if p.is_dir()), reverse=True)
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path).resolve().parent.parent)
    best: tuple[int, Path] | None = None
    for home in candidates:
        java = home / "bin" / "java"
        major = _java_major(java) if java.exists() else None
        if major is not None and major >= MIN_JAVA and (best is None or major > best[0]):
            best = (major, home)
    if best is None:
        raise KeycloakUnavailable(
            f"Keycloak {KEYCLOAK_VERSION} needs Java {MIN_JAVA}+ and none was found (looked at "
            f"JAVA_HOME, /usr/lib/jvm/*, java on PATH). Install one (e.g. a Temurin 21+ JDK) or set "
            "SKILLGATE_KEYCLOAK_JAVA_HOME."
        )
    return best[1]


@dataclass
class LocalKeycloak:
    """One Keycloak server (dev mode) on 127.0.0.1 with its state in ``work_dir``."""

    work_dir: Path
    port: int = field(default_factory=free_port)
    admin_user: str = "skillgate-test-admin"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    proc: subprocess.Popen[bytes] | None = None
    #: Seconds from ``kc.sh`` to an answering discovery document, once started.
    start_seconds: float | None = None

    @property
    def base_url(self) -> str:
        """Keycloak's root URL (realms live under ``/realms/<name>``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """Keycloak's console output."""
        return self.work_dir / "keycloak.log"

    def issuer(self, realm: str) -> str:
        """The OIDC issuer URL of ``realm`` (what tokens carry as ``iss``)."""
        return f"{self.base_url}/realms/{realm}"

    def _log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Fetch if needed, start ``kc.sh start-dev`` and wait until discovery answers."""
        home = ensure_distribution()
        java_home = find_java_home()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "JAVA_HOME": str(java_home),
            "KC_BOOTSTRAP_ADMIN_USERNAME": self.admin_user,
            "KC_BOOTSTRAP_ADMIN_PASSWORD": self.admin_password,
        }
        db = self.work_dir / "db" / "keycloakdb"
        args = [
            "bash",
            str(home / "bin" / "kc.sh"),
            "start-dev",
            "--http-host=127.0.0.1",
            f"--http-port={self.port}",
            f"--http-management-port={free_port()}",
            "--db=dev-file",
            f"--db-url=jdbc:h2:file:{db};NON_KEYWORDS=VALUE",
            f"-Dquarkus.transaction-manager.object-store.directory={self.work_dir / 'transaction-logs'}",
        ]
        started = time.monotonic()
        # The first start writes the built classpath into the shared distribution: one at a time.
        with _cache_lock(".start.lock"):
            out = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            out.close()
            try:
                self._wait_ready(started + timeout)
            except BaseException:
                self.stop()
                raise
        self.start_seconds = time.monotonic() - started
        log.info("Keycloak answered after %.1fs", self.start_seconds)

    def _wait_ready(self, deadline: float) -> None:
        url = f"{self.issuer('master')}/.well-known/openid-configuration"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise KeycloakUnavailable(
                    f"Keycloak exited with {self.proc.returncode} before answering; "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            time.sleep(0.25)  # polling a condition with a deadline
        raise KeycloakUnavailable(
            f"Keycloak did not answer {url} in time; log {self.log_path}:\n{self._log_tail()}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop Keycloak (SIGTERM to its process group, SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def admin(self) -> KeycloakAdmin:
        """A client of the admin REST API, logged in as the temporary admin."""
        return KeycloakAdmin(self)


def _check(resp: httpx.Response, what: str) -> httpx.Response:
    if resp.status_code >= 400:
        raise RuntimeError(f"Keycloak refused to {what}: {resp.status_code} {resp.text[:500]}")
    return resp


def _created_id(resp: httpx.Response) -> str:
    """The id of a created object (Keycloak answers 201 with ``Location: .../<id>``)."""
    return resp.headers["location"].rstrip("/").rsplit("/", 1)[-1]


def audience_mapper(audience: str) -> dict[str, Any]:
    """A protocol mapper that adds ``audience`` to the ``aud`` of access tokens."""
    return {
        "name": f"audience {audience}",
        "protocol": "openid-connect",
        "protocolMapper": "oidc-audience-mapper",
        "config": {
            "included.custom.audience": audience,
            "access.token.claim": "true",
            "id.token.claim": "false",
        },
    }


def groups_mapper(claim: str = "groups") -> dict[str, Any]:
    """A protocol mapper that lists the user's group names (no full path) in ``claim``."""
    return {
        "name": "groups",
        "protocol": "openid-connect",
        "protocolMapper": "oidc-group-membership-mapper",
        "config": {
            "claim.name": claim,
            "full.path": "false",
            "access.token.claim": "true",
            "id.token.claim": "false",
            "userinfo.token.claim": "false",
        },
    }


class KeycloakAdmin:
    """The few admin REST API calls the tests need (realm, clients, groups, users, tokens)."""

    def __init__(self, server: LocalKeycloak) -> None:
        self.server = server
        self._http = httpx.Client(base_url=server.base_url, timeout=30.0)
        self._token_expires = 0.0
        self._login()

    def _login(self) -> None:
        resp = _check(
            self._http.post(
                "/realms/master/protocol/openid-connect/token",
                data={
                    "grant_type": "password",
                    "client_id": "admin-cli",
                    "username": self.server.admin_user,
                    "password": self.server.admin_password,
                },
            ),
            "log the admin in",
        )
        doc = resp.json()
        self._http.headers["authorization"] = f"Bearer {doc['access_token']}"
        self._token_expires = time.monotonic() + float(doc["expires_in"]) - 10

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        if time.monotonic() > self._token_expires:
            self._login()
        return _check(self._http.request(method, f"/admin{path}", **kwargs), what)

    def close(self) -> None:
        """Close the HTTP client."""
        self._http.close()

    def create_realm(self, realm: str) -> None:
        """Create an enabled realm."""
        self._call("POST", "/realms", f"create realm {realm}", json={"realm": realm, "enabled": True})

    def create_client(self, realm: str, representation: dict[str, Any]) -> str:
        """Create a client from its representation; returns its internal id."""
        resp = self._call(
            "POST",
            f"/realms/{realm}/clients",
            f"create client {representation['clientId']}",
            json=representation,
        )
        return _created_id(resp)

    def service_account_user(self, realm: str, client_uuid: str) -> str:
        """The id of the user behind a client's service account (client-credentials tokens)."""
        resp = self._call(
            "GET", f"/realms/{realm}/clients/{client_uuid}/service-account-user", "read a service account"
        )
        return str(resp.json()["id"])

    def create_group(self, realm: str, name: str) -> str:
        """Create a top-level group; returns its id."""
        return _created_id(
            self._call("POST", f"/realms/{realm}/groups", f"create group {name}", json={"name": name})
        )

    def create_user(self, realm: str, username: str, password: str, groups: list[str]) -> str:
        """Create an enabled user with a permanent password, in ``groups``; returns its id."""
        user = {
            "username": username,
            "enabled": True,
            "email": f"{username}@example.com",
            "emailVerified": True,
            "firstName": username.capitalize(),
            "lastName": "Test",
            "credentials": [{"type": "password", "value": password, "temporary": False}],
            "groups": [f"/{g}" for g in groups],
        }
        return _created_id(self._call("POST", f"/realms/{realm}/users", f"create user {username}", json=user))

    def add_to_group(self, realm: str, user_id: str, group_id: str) -> None:
        """Make a user a member of a group."""
        self._call("PUT", f"/realms/{realm}/users/{user_id}/groups/{group_id}", "add a group member")

    def remove_from_group(self, realm: str, user_id: str, group_id: str) -> None:
        """End a user's membership of a group."""
        self._call("DELETE", f"/realms/{realm}/users/{user_id}/groups/{group_id}", "remove a group member")

    def password_token(self, realm: str, client_id: str, username: str, password: str) -> str:
        """An access token for a user (resource-owner password grant, a direct-grant client)."""
        resp = _check(
            httpx.post(
                f"{self.server.issuer(realm)}/protocol/openid-connect/token",
                data={
                    "grant_type": "password",
                    "client_id": client_id,
                    "username": username,
                    "password": password,
                },
                timeout=30.0,
            ),
            f"issue a token to {username}",
        )
        return str(resp.json()["access_token"])

    def client_credentials_token(self, realm: str, client_id: str, secret: str) -> str:
        """An access token for a machine caller (client-credentials grant, client_secret_basic)."""
        resp = _check(
            httpx.post(
                f"{self.server.issuer(realm)}/protocol/openid-connect/token",
                data={"grant_type": "client_credentials"},
                auth=(client_id, secret),
                timeout=30.0,
            ),
            f"issue a token to client {client_id}",
        )
        return str(resp.json()["access_token"])


def main() -> None:
    """Start a Keycloak for manual experiments; stop it on Ctrl-C."""
    logging.basicConfig(level=logging.INFO)
    work = Path(os.environ.get("SKILLGATE_KEYCLOAK_WORK_DIR", "data/keycloak"))
    server = LocalKeycloak(work)
    server.start()
    print(f"Keycloak {KEYCLOAK_VERSION} at {server.base_url} (admin console {server.base_url}/admin)")
    print(f"temporary admin: {server.admin_user} / {server.admin_password}")
    print("Ctrl-C stops it.")
    try:
        assert server.proc is not None
        with contextlib.suppress(KeyboardInterrupt):
            server.proc.wait()  # until Keycloak exits or Ctrl-C (Keycloak has its own session)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
