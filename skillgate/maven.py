"""Fetching runtime artifacts (Kafka jars, Keycloak for the tests) from Maven Central with Maven.

One place knows how: a pom per runtime under ``deploy/``, ``mvn dependency:copy-dependencies``
into a cache directory, failures reported with the end of Maven's output.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path


class MavenError(RuntimeError):
    """Maven is missing or could not fetch the artifacts (the message says why)."""


def copy_dependencies(
    pom: Path,
    output: Path,
    properties: Mapping[str, str],
    *,
    exclude_transitive: bool = False,
    timeout: float = 600.0,
) -> None:
    """Resolve ``pom``'s dependencies from Maven Central into ``output``."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise MavenError("Maven (mvn) is needed to fetch artifacts from Maven Central")
    argv = [mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(pom), "dependency:copy-dependencies"]
    argv += [f"-DoutputDirectory={output}", *(f"-D{k}={v}" for k, v in properties.items())]
    if exclude_transitive:
        argv.append("-DexcludeTransitive=true")
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=timeout)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stdout + exc.stderr).decode(errors="replace")[-2000:]
        raise MavenError(
            f"mvn exited {exc.returncode} fetching {pom.parent.name} from Maven Central; "
            f"check network access to Maven Central.\n{tail}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise MavenError(f"fetching {pom.parent.name} from Maven Central took over {timeout:.0f}s") from exc
