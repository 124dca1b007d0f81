"""Where load-generator requests go: the OpenAI endpoints, base URLs and the loopback rule.

Kept apart from :mod:`kvscope.bench.http_client`, which needs aiohttp (the ``bench`` extra), so
that study specs and the command line can check URLs without it.
"""
from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from kvscope.errors import ConfigError

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT)

REMOTE_HELP = (
    "a benchmark sends as many requests as its arrival process says, which aimed at another machine is a "
    "load test of it, and its latencies would then include a network that nothing here measures apart"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost``, an address in 127.0.0.0/8 or ``::1`` (no DNS lookup)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: not known to be loopback without resolving it
        return False


def check_base_url(base_url: Any, allow_remote: bool = False, field_name: str = "--base-url") -> str:
    """``base_url`` without a trailing slash, after checking its form and the loopback rule.

    Raises :class:`ConfigError` naming ``field_name`` for a URL that is not ``http(s)://host[:port][/path]``,
    or whose host is not loopback while ``allow_remote`` is false (see :data:`REMOTE_HELP`).
    """
    if not isinstance(base_url, str) or not base_url.strip():
        raise ConfigError(f"{field_name}: must be a URL like http://127.0.0.1:8000, got {base_url!r}")
    try:
        parts = urlsplit(base_url.strip())
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as e:
        raise ConfigError(f"{field_name}: not a URL: {base_url!r} ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{field_name}: must be an http:// or https:// URL with a host, got {base_url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{field_name}: must not carry a query or fragment, got {base_url!r}")
    if not allow_remote and not is_loopback(parts.hostname):
        raise ConfigError(f"{field_name}: host {parts.hostname!r} is not loopback (127.0.0.0/8, ::1, localhost); "
                          f"pass --allow-remote (allow_remote: true in a study spec) to send there anyway; refused by default "
                         f"because {REMOTE_HELP}")
    return base_url.strip().rstrip("/")


def api_url(base_url: str, path: str) -> str:
    """``base_url`` + ``path`` (``/v1/...``), where the base may already end in ``/v1``: vLLM's
    ``--base-url`` is the server root, the OpenAI SDK's ``base_url`` ends in ``/v1``; both work."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        path = path[len("/v1"):]
    return base + path


def check_endpoint(endpoint: Any, field_name: str = "--endpoint") -> str:
    """``endpoint`` if it is one of :data:`ENDPOINTS`, else :class:`ConfigError` naming ``field_name``."""
    if endpoint not in ENDPOINTS:
        raise ConfigError(f"{field_name}: must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    return endpoint
