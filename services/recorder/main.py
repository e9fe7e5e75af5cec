"""Entry point of the recorder process (``skillgate recorder``)."""

from __future__ import annotations

import uvloop

from services.recorder.app import serve
from skillgate import logs
from skillgate.config import CommonSettings


def run() -> None:
    """Run the recorder with settings from the environment, JSON logs and uvloop.

    uvloop because the consumer's decode and the API's JSON share one event loop with the
    Kafka client; the ClickHouse calls themselves run in worker threads.
    """
    common = CommonSettings()
    logs.setup("recorder", common.log_level)
    uvloop.run(serve(common=common))


if __name__ == "__main__":
    run()
