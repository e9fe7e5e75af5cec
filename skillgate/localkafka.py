"""Run a real single-node Apache Kafka (KRaft) locally, with no Docker.

The jars come from Maven Central through ``deploy/kafka/pom.xml`` (``mvn dependency:copy-dependencies``),
are cached under ``.cache/kafka/<version>/lib`` and run with the machine's Java (17+). Used by
``skillgate kafka start``, ``skillgate stack`` and the integration-test fixtures, so every one of
them runs the same broker the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from skillgate.maven import copy_dependencies

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.3.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"

_LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka.server.KafkaRaftServer
logger.kafka.level = info
"""

_SERVER = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={log_dir}
num.partitions=6
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=12
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.check.interval.ms=60000
log.cleaner.backoff.ms=5000
message.max.bytes=67108864
replica.fetch.max.bytes=67108864
"""


def cache_dir() -> Path:
    """Where the Kafka jars are cached (``SKILLGATE_CACHE_DIR`` or the repo's ``.cache``)."""
    return Path(os.environ.get("SKILLGATE_CACHE_DIR", REPO_ROOT / ".cache")) / "kafka" / KAFKA_VERSION


def ensure_jars() -> Path:
    """Fetch the Kafka jars from Maven Central once; returns the ``lib`` directory.

    A file lock makes concurrent first starts (parallel test sessions) download only once.
    """
    lib = cache_dir() / "lib"
    marker = cache_dir() / ".complete"
    if marker.exists():
        return lib
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return lib
        log.info("fetching Apache Kafka %s from Maven Central", KAFKA_VERSION)
        copy_dependencies(POM, lib, {"kafka.version": KAFKA_VERSION})
        marker.touch()
    return lib


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("Java 17+ is needed to run Kafka (no `java` on PATH)")
    return java


class LocalKafka:
    """One KRaft broker+controller on 127.0.0.1; ``start()`` returns when it answers."""

    def __init__(
        self,
        data_dir: Path,
        port: int = 9092,
        controller_port: int | None = None,
        heap: str = "768m",
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.controller_port = controller_port or free_port()
        self.heap = heap
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """The bootstrap address clients use."""
        return f"127.0.0.1:{self.port}"

    def _port_open(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        return False

    def start(self, timeout: float = 90.0) -> None:
        """Format storage if new, start the broker, and wait until it accepts connections."""
        if self._port_open():
            raise RuntimeError(f"port {self.port} is already in use: is another Kafka running?")
        lib = ensure_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_dir = self.data_dir / "kraft-logs"
        props = self.data_dir / "server.properties"
        props.write_text(
            _SERVER.format(port=self.port, controller_port=self.controller_port, log_dir=log_dir)
        )
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2.format(level="WARN"))
        java = _java()
        cp = f"{lib}/*"
        jvm = [
            "-Xms256m",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
        ]
        if not (log_dir / "meta.properties").exists():
            subprocess.run(
                [
                    java,
                    *jvm,
                    "-cp",
                    cp,
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    str(uuid.uuid4()).replace("-", "")[:22],
                    "-c",
                    str(props),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        out = (self.data_dir / "kafka.log").open("ab")
        self.proc = subprocess.Popen(
            [java, *jvm, "-cp", cp, "kafka.Kafka", str(props)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Kafka exited with {self.proc.returncode}; see {self.data_dir / 'kafka.log'}"
                )
            if self._port_open():
                return
            time.sleep(0.1)  # polling a condition with a deadline, not synchronising on time
        self.stop()
        raise TimeoutError(f"Kafka did not answer on {self.bootstrap} within {timeout}s")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker cleanly (SIGTERM), forcefully after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
