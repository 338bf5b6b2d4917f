"""What the admin app needs to know about the relay it administers, read once from the
relay's config by serve.py: the SMTP settings to hand out beside a new key, and how the
console's session cookies are set. The app never sees the config itself (keystore/ does
not depend on the relay package)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["Site", "is_loopback"]


@dataclass(frozen=True)
class Site:
    smtp_host: str  # [admin] public_host, else [server] hostname
    submission_port: int | None  # the first [server] submission listener's port (STARTTLS)
    submissions_port: int | None  # the first [server] submissions listener's port (implicit TLS)
    secure_cookies: bool  # served over HTTPS: cookies get the Secure flag
    session_ttl: float  # seconds a console login lasts


def is_loopback(host: str) -> bool:
    """Whether a listen host only this machine can reach: 127.0.0.0/8, ::1 or "localhost".
    The admin app serves plain HTTP only there; anything else (0.0.0.0 included) gets TLS."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
