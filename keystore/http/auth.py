"""Admin token logins, for the API (`Authorization: Bearer rat_...`) and the console's
login form alike: `TokenLogins.login` checks a presented token and throttles failures the
way SMTP AUTH does (keystore/throttle.py, sized by the relay's [auth] settings).

What counts as one "username" for the throttle is the token's public id (the part after
`rat_`; anything malformed shares one slot per address), so, as at SMTP AUTH:

* a token that failed `max_failures` times from an address gets 429 there for the rest of
  the window, before its hash is computed;
* an address with `max_failures_per_address` failures is not shut out: tokens that failed
  from it get 429, another token gets one check (a failure answered slowly), so an owner
  behind the same office NAT as a guesser still gets in;
* a good token gives its reservation back and costs the throttle nothing.

Unknown, wrong and revoked tokens get one answer (401 "invalid admin token"), padded to
the same floor as SMTP's refusals; the log names the token id and address, never the
secret.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from keystore import keys
from keystore.http.errors import Throttled, Unauthorized
from keystore.service import Actor, AdminService
from keystore.store import KeystoreUnavailable
from keystore.throttle import FAILURE_FLOOR, FailureLimiter

__all__ = ["TokenLogins", "Throttled", "Unauthorized", "bearer", "client_ip", "request_actor"]

log = logging.getLogger("keystore.http")
_MALFORMED = "-"  # the throttle's "username" for anything that is not a well-formed token


def client_ip(request: Request) -> str:
    """The peer address (uvicorn runs without proxy headers: nothing the client says)."""
    return request.client.host if request.client else "unknown"


class TokenLogins:
    """Checks admin tokens through the AdminService, throttled per client address."""

    def __init__(self, service: AdminService, limiter: FailureLimiter) -> None:
        self.service = service
        self.limiter = limiter

    async def login(self, presented: str, client_ip: str) -> Actor:
        """The actor `presented` stands for; Unauthorized for anything else, Throttled when
        this address has failed too often (then nothing is checked)."""
        started = time.monotonic()
        parsed = keys.parse_key(presented.strip(), keys.TOKEN_PREFIX)
        slot = f"token:{parsed.key_id}" if parsed else _MALFORMED
        attempt = await self.limiter.reserve(client_ip, slot)
        if attempt is None:
            log.warning("admin login throttled client=%s token=%s", client_ip,
                        parsed.key_id if parsed else "malformed")
            raise Throttled(self.limiter.retry_after(client_ip, slot))
        try:
            actor = await self.service.login(presented.strip(), client_ip)
        except KeystoreUnavailable:
            attempt.release()  # not the client's failure
            raise
        except BaseException:
            attempt.failed()  # abandoned mid-check: it still counts, as at SMTP AUTH
            raise
        if actor is None:
            delay = attempt.failed()
            log.warning("admin login failed client=%s token=%s", client_ip,
                        parsed.key_id if parsed else "malformed")
            await asyncio.sleep(started + max(delay, FAILURE_FLOOR) - time.monotonic())
            raise Unauthorized("invalid admin token", presented=True)
        attempt.release()
        return actor


# In the OpenAPI document as the API's security scheme; auto_error off so a missing or
# non-Bearer header gets our 401 with its JSON body rather than FastAPI's 403.
bearer = HTTPBearer(auto_error=False, bearerFormat="rat_...",
                    description="An admin token from `keystore admin-token create`.")


async def request_actor(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Actor:
    """The actor of an API request, from its Authorization header."""
    if credentials is None:
        raise Unauthorized("this endpoint needs an admin token: Authorization: Bearer rat_...")
    logins: TokenLogins = request.app.state.logins
    return await logins.login(credentials.credentials, client_ip(request))
