"""Where the NATS transport connects and publishes: the servers of a ``nats://`` URL (and the
URL as stats show it, without a secret), and the subjects it may publish to."""

from __future__ import annotations

from urllib.parse import ParseResult, SplitResult, urlsplit

from django_warpmesh.node.transports.base import TransportError, redact_userinfo

DEFAULT_PORT = 4222


def shown_url(parts: SplitResult | ParseResult) -> str:
    """A server's URL as stats show it: the password, or a token, replaced by ``***``."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or DEFAULT_PORT
    if parts.password is not None:
        auth = f"{parts.username}:***@"
    elif parts.username:
        auth = "***@"  # a user alone is a token to nats-py: a secret
    else:
        auth = ""
    return f"{parts.scheme}://{auth}{host}:{port}"


def parse_url(url: str) -> tuple[list[str], str]:
    """The servers of a ``nats://`` URL (comma-separated for several), for nats-py, and the URL
    to show (no password). Raises :class:`TransportError` for a malformed one."""
    if not isinstance(url, str) or not url.strip():
        raise TransportError("the NATS URL is empty: give nats://host:4222")
    servers: list[str] = []
    shown: list[str] = []
    for raw in url.split(","):
        server = raw.strip()
        where = f"bad NATS URL {redact_userinfo(url)!r}"
        if not server:
            raise TransportError(f"{where}: an empty server between commas")
        try:
            parts = urlsplit(server)
            port = parts.port
        except ValueError as exc:
            raise TransportError(f"{where}: {redact_userinfo(str(exc))}")
        if parts.scheme not in ("nats", "tls"):
            raise TransportError(f"{where}: each server must start with nats:// or tls://")
        if not parts.hostname:
            raise TransportError(f"{where}: no host")
        if port == 0:
            raise TransportError(f"{where}: port 0")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise TransportError(f"{where}: a server is scheme://[user:password@]host[:port]")
        servers.append(f"{parts.scheme}://{parts.netloc}")
        shown.append(shown_url(parts))
    return servers, ",".join(shown)


def check_subject(subject: str) -> None:
    """Raises :class:`TransportError` unless ``subject`` is a NATS subject one can publish to."""
    tokens = subject.split(".")
    if (
        not subject
        or any(not token or token in ("*", ">") for token in tokens)
        or any(char.isspace() or not char.isprintable() for char in subject)
    ):
        raise TransportError(f"bad NATS subject {subject!r}: dot-separated words, no wildcard")
