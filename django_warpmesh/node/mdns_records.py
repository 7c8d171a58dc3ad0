"""What an mDNS announcement of a node says, and how a received one is read.

Pure, and free of zeroconf: the secret's fingerprint, the TXT properties of our service, the
checks a peer's properties pass before it is dialled, the TTL the records carry, and the
interfaces ``MDNS_INTERFACES`` names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import math
import re
import socket
from collections.abc import Mapping, Sequence

from django_warpmesh.node.addresses import AddressError, parse_address
from django_warpmesh.node.interfaces import DiscoveryError
from django_warpmesh.protocol import NODE_ID_SIZE

SERVICE_TYPE = "_warpmesh._tcp.local."
# Fixed, so every node derives the same fingerprint from the same key; a new label would be a
# new fingerprint scheme (and nodes on the old one would no longer dial the new).
_FINGERPRINT_LABEL = b"django_warpmesh mdns secret fingerprint v1"
FINGERPRINT_HEX = 16
# Receivers drop a packet identical to one they took less than 0.8 s earlier (python-zeroconf),
# so refreshes must be at least a second apart; a TTL covers three of them, so two lost in a
# row do not make a live peer look gone.
MIN_TTL = 3
REFRESHES_PER_TTL = 3
# A TXT string is one length byte and at most 255 bytes of "key=value".
_TXT_ITEM_MAX = 255
_NODE_ID = re.compile(rf"[0-9a-f]{{{2 * NODE_ID_SIZE}}}")
_FINGERPRINT = re.compile(rf"[0-9a-f]{{{FINGERPRINT_HEX}}}")


def fingerprint(key: bytes) -> str:
    """Announced so that only nodes of the same mesh dial each other: a truncated HMAC of a
    fixed label under the frame key. It does not reveal the key, but whoever hears it can test
    guesses of a weak ``SECRET`` against it offline."""
    digest = hmac.new(key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()
    return digest[:FINGERPRINT_HEX]


def record_ttl(stale_after: float) -> int:
    """The TTL of our SRV, TXT and address records: a peer killed without a goodbye drops out
    of the others' caches after it, as a stale peer-table row would after ``STALE_AFTER``."""
    return max(MIN_TTL, math.ceil(stale_after))


def refresh_interval(ttl: int) -> float:
    """How often our records are announced again: zeroconf itself never refreshes SRV and TXT
    records, neither on the side that registered them nor on the side that browses."""
    return ttl / REFRESHES_PER_TTL


@dataclasses.dataclass(frozen=True)
class Announcement:
    """A peer's service as its TXT record describes it."""

    node_id: str
    address: str
    protocol: int
    fingerprint: str
    caches: tuple[str, ...] = ()


def properties(announcement: Announcement) -> dict[str, str]:
    """Our TXT record; ``caches`` (informational, as in the peer table) keeps the locations that
    fit in one TXT string."""
    caches = list(announcement.caches)
    while len(json.dumps(caches)) > _TXT_ITEM_MAX - len("caches="):
        caches.pop()
    return {
        "id": announcement.node_id,
        "addr": announcement.address,
        "proto": str(announcement.protocol),
        "fp": announcement.fingerprint,
        "caches": json.dumps(caches),
    }


def instance_name(node_id: str) -> str:
    return f"{node_id}.{SERVICE_TYPE}"


class Malformed(ValueError):
    """A TXT record that is not one a node writes; the message says what is wrong with it."""


def parse(name: str, items: Mapping[bytes, bytes | None]) -> Announcement:
    """The announcement of the service ``name``, from its TXT properties as received.

    Raises :class:`Malformed`: whatever comes off the network may be anything.
    """
    fields = {}
    for key in ("id", "addr", "proto", "fp", "caches"):
        value = items.get(key.encode())
        if value is None:
            raise Malformed(f"no {key!r}")
        try:
            fields[key] = value.decode("ascii")
        except UnicodeDecodeError:
            raise Malformed(f"{key!r} is not ASCII") from None
    node_id = fields["id"]
    if not _NODE_ID.fullmatch(node_id) or name.lower() != instance_name(node_id):
        raise Malformed(f"node id {node_id!r} is not the service's name")
    if not _FINGERPRINT.fullmatch(fields["fp"]):
        raise Malformed(f"fingerprint {fields['fp']!r}")
    if not fields["proto"].isdigit() or len(fields["proto"]) > 6:
        raise Malformed(f"protocol version {fields['proto']!r}")
    return Announcement(
        node_id,
        dialable(fields["addr"]),
        int(fields["proto"]),
        fields["fp"],
        _caches(fields["caches"]),
    )


def dialable(address: str) -> str:
    """``address`` if a node may dial it (a ``host:port`` a peer can listen on), else
    :class:`Malformed`."""
    try:
        host, _ = parse_address("mDNS", address)
    except AddressError:
        raise Malformed(f"address {address!r}") from None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return address  # a host name
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        raise Malformed(f"address {address!r} is not one a peer listens on")
    return address


def _caches(text: str) -> tuple[str, ...]:
    try:
        caches = json.loads(text)
    except ValueError:
        raise Malformed("caches is not JSON") from None
    if not isinstance(caches, list) or not all(isinstance(item, str) for item in caches):
        raise Malformed("caches is not a list of strings")
    return tuple(caches)


def address_bytes(address: str) -> list[bytes]:
    """The A or AAAA record of our advertised host when it is an IP (a name gets none: peers
    dial the address in the TXT record, never the A record)."""
    host, _ = parse_address("ADVERTISE", address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return []
    return [ip.packed]


def interfaces(
    names: Sequence[str], adapters: Mapping[str, Sequence[str]]
) -> list[str | int] | None:
    """What zeroconf's ``interfaces=`` takes for ``MDNS_INTERFACES``: an address as given, a
    name as its IPv4 addresses (its index if it has only IPv6 ones). None: every interface.

    ``adapters``: each interface name of this host and its addresses. Raises
    :class:`DiscoveryError` naming the setting for a name this host does not have.
    """
    if not names:
        return None
    chosen: list[str | int] = []
    for name in names:
        with contextlib.suppress(ValueError):
            chosen.append(str(ipaddress.ip_address(name.partition("%")[0])))
            continue
        if name not in adapters:
            raise DiscoveryError(
                f"WARPMESH['MDNS_INTERFACES']: this host has no network interface {name!r} "
                f"(it has {', '.join(sorted(adapters)) or 'none'})"
            )
        ipv4 = [ip for ip in adapters[name] if ipaddress.ip_address(ip).version == 4]
        if ipv4:
            chosen.extend(ipv4)
        elif adapters[name]:
            chosen.append(socket.if_nametoindex(name))
        else:
            raise DiscoveryError(
                f"WARPMESH['MDNS_INTERFACES']: the network interface {name!r} has no address"
            )
    return list(dict.fromkeys(chosen))
