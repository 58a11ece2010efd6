"""The gateway: ``retrysafe gateway --upstream URL``, the contract in front of any HTTP API.

A reverse proxy built from the same parts as every face: :class:`~retrysafe.IdempotencyMiddleware`
over a forwarding ASGI app (:mod:`.proxy`) and its own HTTP/1.1 upstream client (:mod:`.upstream`),
served by uvicorn with workers (:mod:`.server`), configured by flags and TOML (:mod:`.config`).
"""

from .config import GatewaySettings, load_settings

__all__ = ["GatewaySettings", "load_settings"]
