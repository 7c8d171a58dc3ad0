"""Calls a mesh process on a LAN host runs for the mDNS tests (``tests.meshproc``'s ``run``).

``lookup``: what ``mesh_status``'s observer would find; ``status``: its report. ``announce``: a
stranger on the LAN announcing services of our type with whatever TXT record it likes, as anyone
on it can.
"""

from __future__ import annotations

from typing import Any

# The stranger's zeroconf, kept until ``stop_announcing``.
_announcer: list[Any] = []


def lookup(timeout: float) -> dict[str, str]:
    from django_warpmesh.conf import get_settings
    from django_warpmesh.node.mdns import MdnsRegistry
    from django_warpmesh.node_factory import frame_key

    config = get_settings()
    return dict(MdnsRegistry(config, frame_key(config)).lookup_now(timeout))


def status(timeout: float) -> dict[str, Any]:
    """One round of ``manage.py mesh_status --json``: the report."""
    from django_warpmesh.observe import Observer

    observer = Observer()
    try:
        return observer.report(timeout)
    finally:
        observer.close()


def announce(services: dict[str, str], address: str) -> list[str]:
    """Register a service per ``services`` item: its instance label, and its TXT record as
    text (``key=value`` lines, sent as they are, one TXT string each)."""
    import asyncio
    import socket

    from zeroconf import ServiceInfo, Zeroconf

    from django_warpmesh.node.mdns_records import SERVICE_TYPE

    zc = Zeroconf(use_asyncio=False)
    _announcer.append(zc)
    assert zc.loop is not None
    names = []
    for label, text in services.items():
        strings = [line.encode("latin-1") for line in text.splitlines()]
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=7934,
            properties=b"".join(bytes([len(item)]) + item for item in strings),
            server=f"{label}.local.",
            addresses=[socket.inet_aton(address)],
            host_ttl=30,
            other_ttl=30,
        )
        # Announced in the background: register_service would wait for each announcement.
        registering = zc.async_register_service(info, cooperating_responders=True)
        asyncio.run_coroutine_threadsafe(registering, zc.loop).result(10)
        names.append(info.name)
    return names


def stop_announcing() -> bool:
    while _announcer:
        _announcer.pop().close()
    return True
