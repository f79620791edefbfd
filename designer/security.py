"""Response headers, the Host check, and the access token required when serving beyond loopback.

Every request and socket handshake must name this server in its ``Host`` (and, for sockets, its
``Origin``): a web page whose domain was made to resolve to 127.0.0.1 (DNS rebinding) sends its
own domain there and is refused, so it cannot drive a designer on loopback.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from flask import Flask, Response, abort, redirect, request

TOKEN_COOKIE = "delta_designer_token"
TOKEN_HEADER = "X-Delta-Designer-Token"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPolicy:
    """The host names a request may address this server by (ports are not compared)."""

    names: frozenset[str]
    any_ip: bool = False  # bound to every interface: any IP literal names this machine

    @classmethod
    def for_bind(cls, host: str, extra: tuple[str, ...] = ()) -> HostPolicy:
        """Loopback: the loopback names; one address: that address; every interface (0.0.0.0,
        ::): IP literals, this machine's names and ``extra`` (e.g. a DNS name of the server)."""
        names = {host.lower(), *(name.lower() for name in extra)}
        if is_loopback(host):
            return cls(frozenset(names | LOOPBACK_NAMES))
        if host in ("0.0.0.0", "::", ""):
            names |= LOOPBACK_NAMES | {socket.gethostname().lower(), socket.getfqdn().lower()}
            return cls(frozenset(names), any_ip=True)
        return cls(frozenset(names))

    def allows(self, host_header: str | None) -> bool:
        name = host_name(host_header)
        return bool(name) and (name in self.names or (self.any_ip and _is_ip(name)))


def host_name(value: str | None) -> str:
    """The host name of a ``Host`` header (``name:port``, ``[v6]:port``) or an origin URL."""
    if not value:
        return ""
    if "//" in value:
        value = urlsplit(value).netloc
    match = re.fullmatch(r"\[([^\]]+)\](?::\d+)?|([^:]+)(?::\d+)?|([0-9a-fA-F:]+)", value.strip())
    if match is None:
        return ""
    return next(group for group in match.groups() if group is not None).lower()


class RedactTokens(logging.Filter):
    """Keeps access tokens (the first request carries one in its URL) and tab session ids (export
    links carry one) out of logs."""

    PATTERN = re.compile(r"((?:token|tab)=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(self.PATTERN.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                                for a in record.args)
        record.msg = self.PATTERN.sub(r"\1[redacted]", str(record.msg))
        return True


def install(app: Flask) -> None:
    """Add the CSP and related headers, and enforce ``app.config['TOKEN']`` when it is set."""

    logging.getLogger("werkzeug").addFilter(RedactTokens())

    @app.before_request
    def _require_host_and_token() -> Response | None:
        policy: HostPolicy = app.config["HOST_POLICY"]
        if not policy.allows(request.host):
            abort(400, description=f"this designer does not answer to the host {host_name(request.host)!r}; "
                  "open it by the address it printed when it started")
        token = app.config.get("TOKEN")
        if not token:
            return None
        given = (
            request.args.get("token")
            or request.headers.get(TOKEN_HEADER)
            or request.cookies.get(TOKEN_COOKIE)
        )
        if not given or not secrets.compare_digest(given, token):
            abort(403, description="this designer requires its access token: open the URL "
                  "with ?token=… as printed when the server started")
        if request.args.get("token") and request.method == "GET":
            # exchanged once for a cookie: the token leaves the address bar (and history)
            query = "&".join(f"{k}={v}" for k, v in request.args.items(multi=True) if k != "token")
            response = redirect(request.path + (f"?{query}" if query else ""), code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
            return response
        return None

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response
