"""Response headers and the access token required when serving beyond loopback."""

from __future__ import annotations

import ipaddress
import secrets

from flask import Flask, Response, abort, request

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


def install(app: Flask) -> None:
    """Add the CSP and related headers, and enforce ``app.config['TOKEN']`` when it is set."""

    @app.before_request
    def _require_token() -> None:
        token = app.config.get("TOKEN")
        if not token:
            return
        given = (
            request.args.get("token")
            or request.headers.get(TOKEN_HEADER)
            or request.cookies.get(TOKEN_COOKIE)
        )
        if not given or not secrets.compare_digest(given, token):
            abort(403, description="this designer requires its access token: open the URL "
                  "with ?token=… as printed when the server started")

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        token = app.config.get("TOKEN")
        if token and request.args.get("token") == token:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response
