"""Mutual TLS for the mesh transport (``WARPMESH['TLS']``): nng's ``tls+tcp://``.

Every listener and dialer gets a TLS configuration of its own mode (nng fixes the mode of a
configuration when it is made, so one socket-wide configuration cannot serve both), and both
ends require and verify the other's certificate against the CA:

* the listener (server mode) accepts only a client presenting a certificate issued by the CA;
* a dialer (client mode) accepts only a server presenting a certificate issued by the CA *and*
  valid for the server name: ``SERVER_NAME`` if set, else the host of the address dialled
  (an IP address must then be in the certificate's subjectAltName as an IP entry).

pynng only offers ``nng_listen``/``nng_dial``, which start the endpoint before an option can
be set on it, so endpoints are created, configured and started here through its cffi binding.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pynng

from django_warpmesh.node.config import TLSSettings

SCHEME = "tls+tcp"
_TLS_CONFIG = b"tls-config"  # NNG_OPT_TLS_CONFIG
# Client TLS configurations kept (one per server name dialled): see TLSTransport.client_config.
MAX_CLIENT_CONFIGS = 256


class TLSTransport:
    """The certificate, key and CA read once (at node start), and endpoints made with them."""

    scheme = SCHEME

    def __init__(self, settings: TLSSettings) -> None:
        self.server_name = settings.server_name
        self._cert = _read("CERT", settings.cert)
        self._key = _read("KEY", settings.key)
        self._ca = _read("CA", settings.ca)
        self._clients: OrderedDict[str, Any] = OrderedDict()
        # Made now, so that unusable PEM fails the node's start, not each connection.
        self._server = self._config(pynng.TLSConfig.MODE_SERVER, None)

    def __repr__(self) -> str:
        return f"<TLSTransport server_name={self.server_name!r}>"

    def _config(self, mode: int, server_name: str | None) -> Any:
        config = pynng.TLSConfig(mode, auth_mode=pynng.TLSConfig.AUTH_MODE_REQUIRED)
        try:
            config.set_ca_chain(self._ca)
        except pynng.NNGException as exc:
            raise OSError(f"WARPMESH['TLS']['CA'] cannot be used: {exc}") from None
        try:
            config.set_own_cert(self._cert, self._key)
        except pynng.NNGException as exc:
            raise OSError(
                f"WARPMESH['TLS']['CERT'] and ['KEY'] cannot be used together: {exc}"
            ) from None
        if server_name is not None:
            config.set_server_name(server_name)
        return config

    def listen(self, sock: Any, url: str) -> Any:
        """Listen on ``url`` (``tls+tcp://host:port``); raises as ``Socket.listen`` does."""
        lib, ffi = pynng.lib, pynng.ffi
        handle = ffi.new("nng_listener *")
        pynng.check_err(lib.nng_listener_create(handle, sock.socket, url.encode()))
        try:
            pynng.check_err(
                lib.nng_listener_set_ptr(handle[0], _TLS_CONFIG, self._server._tls_config)
            )
            pynng.check_err(lib.nng_listener_start(handle[0], 0))
        except BaseException:
            lib.nng_listener_close(handle[0])
            raise
        listener = pynng.Listener(handle, sock)
        listener._warpmesh_tls = self._server  # kept alive as long as the endpoint
        sock._listeners[listener.id] = listener
        return listener

    def client_config(self, server_name: str) -> Any:
        """The client configuration for ``server_name``, made once and kept among the most
        recent ``MAX_CLIENT_CONFIGS``: the peer table can name any number of hosts, and each
        configuration holds a parsed certificate chain. A dialer keeps its own alive."""
        clients = self._clients
        config = clients.get(server_name)
        if config is None:
            config = clients[server_name] = self._config(pynng.TLSConfig.MODE_CLIENT, server_name)
            if len(clients) > MAX_CLIENT_CONFIGS:
                clients.popitem(last=False)
        else:
            clients.move_to_end(server_name)
        return config

    def dial(self, sock: Any, url: str, host: str) -> Any:
        """Dial ``url`` in the background (as ``Socket.dial(url, block=False)``), verifying the
        server's certificate for ``SERVER_NAME`` or else ``host``."""
        config = self.client_config(self.server_name or host)
        lib, ffi = pynng.lib, pynng.ffi
        handle = ffi.new("nng_dialer *")
        pynng.check_err(lib.nng_dialer_create(handle, sock.socket, url.encode()))
        try:
            pynng.check_err(lib.nng_dialer_set_ptr(handle[0], _TLS_CONFIG, config._tls_config))
            pynng.check_err(lib.nng_dialer_start(handle[0], lib.NNG_FLAG_NONBLOCK))
        except BaseException:
            lib.nng_dialer_close(handle[0])
            raise
        dialer = pynng.Dialer(handle, sock)
        dialer._warpmesh_tls = config
        sock._dialers[dialer.id] = dialer
        return dialer


def _read(key: str, path: str) -> str:
    # django_warpmesh.conf checked the files when the settings were parsed; they may have
    # changed since. The error names the setting, never the key file's path.
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OSError(f"WARPMESH['TLS']['{key}']: cannot read the file ({reason})") from None
