"""CSRF tokens for the console's forms (OWASP's synchronizer-token pattern).

Every form carries its session's token in a hidden field named `csrf`; a POST whose field
is missing or differs is refused with 403 before anything else happens. The comparison is
constant-time. SameSite=Strict on the session cookie already keeps other sites' forms from
carrying the session; the token is the second, independent lock.
"""

from __future__ import annotations

import hmac

__all__ = ["FIELD", "CsrfRefused", "check"]

FIELD = "csrf"


class CsrfRefused(Exception):
    """A POST without its session's CSRF token, or with another one."""


def check(expected: str, presented: object) -> None:
    """Raise CsrfRefused unless `presented` is `expected` (constant-time)."""
    if not isinstance(presented, str) or not presented or not expected:
        raise CsrfRefused("missing CSRF token")
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise CsrfRefused("wrong CSRF token")
