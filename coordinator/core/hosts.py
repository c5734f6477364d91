"""What a registry's ``host`` and ``port`` may be before they become a URL.

A registry entry is whatever someone registered, and DB-GPT builds worker URLs by
pasting it into ``http://{host}:{port}``: a host of ``evil.com/x?`` or
``user@host`` turns that into a request somewhere else. Here a host is a bare
hostname or an IP literal and nothing more, a port an integer 1–65535, and the
URL is built from those parts (never by pasting text).

Pure: no ray, no httpx.
"""

from __future__ import annotations

import ipaddress
import re

#: The longest a DNS name can be.
MAX_HOST_LENGTH = 253
#: One DNS label: letters, digits, hyphens (not first or last), and underscores,
#: which some internal resolvers (container service names) hand out.
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def show(value: object, limit: int = 60) -> str:
    """A value for an error message: quoted, escaped, and cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def host_problem(host: object) -> str | None:
    """Why ``host`` is not a bare hostname or IP literal, or ``None`` when it is."""
    if not isinstance(host, str):
        return f"must be a string, not {type(host).__name__}"
    if not host:
        return "must not be empty"
    if len(host) > MAX_HOST_LENGTH:
        return f"longer than {MAX_HOST_LENGTH} characters"
    if not host.isascii():
        return "not ASCII (write an international name in its xn-- form)"
    if "%" not in host:  # an IPv6 zone (fe80::1%eth0) cannot go in a URL as is
        try:
            ipaddress.ip_address(host)
            return None
        except ValueError:
            pass
    bad = next((c for c in host if not (c.isalnum() or c in "-._")), None)
    if bad is not None:
        return f"not a hostname or IP literal: contains {bad!r}"
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return "not a hostname: each dot-separated label is 1-63 letters, digits, '-' or '_', not starting or ending with '-'"
    if labels[-1].isdigit():
        # 999.1.1.1 or 2130706433: numeric, yet not an IP literal; resolvers
        # disagree about such names, so none is accepted.
        return "not a hostname or IP literal: looks numeric but is not an IP address"
    return None


def port_problem(port: object) -> str | None:
    """Why ``port`` is not a TCP port number (an int 1–65535, not a bool)."""
    if isinstance(port, bool) or not isinstance(port, int):
        return f"must be an integer, not {type(port).__name__}"
    if not 1 <= port <= 65535:
        return f"must be between 1 and 65535, not {port}"
    return None


def parse_endpoint(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` into its parts; ``ValueError`` saying
    what is wrong otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"{show(text)}: want host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{show(text)}: write an IPv6 host in brackets, [::1]:8000")
    if not port_text.isdigit():
        raise ValueError(f"{show(text)}: the port is not a number")
    port = int(port_text)
    for problem in (host_problem(host), port_problem(port)):
        if problem:
            raise ValueError(f"{show(text)}: {problem}")
    return host, port
