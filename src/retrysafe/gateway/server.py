"""Running the gateway: uvicorn (httptools, uvloop) with ``--workers N`` processes.

The command validates the settings, hands them to the workers through the environment, points
prometheus_client's multiprocess mode at a private temporary directory (so that any worker's
``/metrics`` adds up every worker's samples) and removes it when the server stops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from types import FrameType
from typing import Any

from .admin import MULTIPROC_ENV
from .app import SETTINGS_ENV
from .config import GatewaySettings

__all__ = ["log_config", "serve"]


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, plus the access log (JSON lines on stdout) and retrysafe's warnings."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"},
            "access": {"format": "%(message)s"},
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "access",
                "stream": "ext://sys.stdout",
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "retrysafe": {"handlers": ["default"], "level": level, "propagate": False},
            "retrysafe.gateway.access": {
                "handlers": ["access"],
                "level": "INFO",
                "propagate": False,
            },
        },
    }


class _Stopped(Exception):
    """The server shut down gracefully on a signal."""


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signum)


def serve(settings: GatewaySettings, config: str | None, flags: dict[str, Any]) -> int:
    """Run the gateway until it is stopped (SIGTERM, SIGINT); return the exit status."""
    import uvicorn

    os.environ[SETTINGS_ENV] = json.dumps({"config": config, "flags": flags})
    own_dir = None
    if not os.environ.get(MULTIPROC_ENV):
        own_dir = tempfile.mkdtemp(prefix="retrysafe-gateway-metrics-")
        os.environ[MULTIPROC_ENV] = own_dir
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with
    # the default handler that would kill the process before the clean-up below.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run(
            "retrysafe.gateway.app:create_app",
            factory=True,
            http="retrysafe.gateway.app:ProblemHttpProtocol",  # problem documents for bad HTTP
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            lifespan="on",
            access_log=False,  # the gateway writes its own, structured
            log_config=log_config(settings.log_level),
            log_level=settings.log_level,
            server_header=False,  # the upstream's Server and Date pass through
            date_header=False,
            proxy_headers=False,  # the client address is the peer's: X-Forwarded-For is ours
            # typed int, but uvicorn only hands it to asyncio.wait_for: fractions work
            timeout_graceful_shutdown=settings.shutdown_timeout,  # type: ignore[arg-type]
        )
    except _Stopped:
        pass  # a graceful shutdown: exit 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
            os.environ.pop(MULTIPROC_ENV, None)
    return 0
