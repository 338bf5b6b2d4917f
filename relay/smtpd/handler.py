"""RelayHandler: aiosmtpd's hooks, wired to auth, policy and the queue.

Glue only: each hook asks the module that owns the rule and returns its reply. One
handler object serves every connection, so per-session state lives on `session`.
Never name a helper here `auth_*` or `handle_*`: aiosmtpd would take it for a mechanism
or a hook.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from base64 import b64decode

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import MISSING, AuthResult, Envelope, Session

from keystore.clusterlimits import LimitsUnavailable, SendRates
from keystore.models import Identity
from relay import maillog, policy, replies
from relay.auth import Authenticator, split_plain
from relay.config import Config
from relay.metrics import Metrics
from relay.queue import FileBody, Queue, QueueItem, SpoolFull, new_queue_id
from relay.signing import DkimSigner
from relay.smtpd.data import MessageBody
from relay.smtpd.server import AuthLineTooLong, RelaySMTP

__all__ = ["RelayHandler"]

log = logging.getLogger("relay.smtpd")

# A header block longer than this is checked on a thread: the email parser is pure Python
# (about 1 ms per 10 KB), and other sessions must not wait for it.
_HEADER_ON_LOOP = 16 * 1024


class RelayHandler:
    def __init__(
        self, config: Config, authenticator: Authenticator, queue: Queue, signer: DkimSigner,
        metrics: Metrics | None = None, rates: SendRates | None = None,
    ) -> None:
        self._server_cfg = config.server
        self._authenticator = authenticator
        self._queue = queue
        self._signer = signer
        self._metrics = metrics or Metrics()
        # `rates`: the cluster's (keystore/pglimits.py) when the relay has one, else its own
        self._rates: SendRates = rates or policy.RateLimiter(config.server.rate_per_minute)
        # set at shutdown: a session finishing its message may not start another (a
        # pipelining client would otherwise slip one in before it is told)
        self.stopping = False

    def reconfigure(self, config: Config, signer: DkimSigner) -> None:
        """A reload: every session's next command sees the new limits and DKIM keys; the
        per-key rate buckets carry on (a reload is no way round a rate limit)."""
        self._server_cfg = config.server
        self._signer = signer
        self._rates.per_minute = config.server.rate_per_minute

    # ------------------------------------------------------------------ EHLO

    async def handle_EHLO(self, server, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        return responses[:-1] + ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    # ------------------------------------------------------------------ AUTH

    async def auth_PLAIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        if not await _on_tls(server):
            return AuthResult(success=False, handled=True)
        try:
            blob = await _first_response(server, args, prompt="")
        except AuthLineTooLong:
            return await self._exchange_too_long(server, "")
        if blob is MISSING:
            return AuthResult(success=False, handled=True)
        parts = split_plain(blob)
        if parts is None:
            await server.push(replies.AUTH_CANNOT_SPLIT)
            return AuthResult(success=False, handled=True)
        authzid, username, secret = parts
        if authzid and authzid != username:
            return AuthResult(success=False, handled=False, message=replies.AUTH_AUTHZID)
        return await self._login(server, username, secret)

    async def auth_LOGIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        if not await _on_tls(server):
            return AuthResult(success=False, handled=True)
        try:
            user_blob = await _first_response(server, args, prompt="Username:")
        except AuthLineTooLong:
            return await self._exchange_too_long(server, "")
        if user_blob is MISSING:
            return AuthResult(success=False, handled=True)
        try:
            secret_blob = await server.challenge_auth("Password:")
        except AuthLineTooLong:
            return await self._exchange_too_long(server, user_blob.decode("utf-8", "replace"))
        if secret_blob is MISSING:
            return AuthResult(success=False, handled=True)
        try:
            username, secret = user_blob.decode("utf-8"), secret_blob.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False)
        return await self._login(server, username, secret)

    async def _login(self, server: RelaySMTP, username: str, secret: str) -> AuthResult:
        result = await self._authenticator.login(username, secret, _client_ip(server.session))
        if result.identity is not None:
            return AuthResult(success=True, auth_data=result.identity, message=result.reply)
        if result.close:
            await server.hang_up(result.reply)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=result.reply)

    async def _exchange_too_long(self, server: RelaySMTP, username: str) -> AuthResult:
        """RFC 4954's reply to an overlong answer; it counts as a failed AUTH (for the
        username, when LOGIN gave one first)."""
        self._authenticator.exchange_failed(username, _client_ip(server.session))
        await server.push(replies.AUTH_LINE_TOO_LONG)
        return AuthResult(success=False, handled=True)

    # ------------------------------------------------------------- MAIL/RCPT

    async def handle_PROXY(self, server: RelaySMTP, session: Session, envelope: Envelope,
                           proxy_data: ProxyData) -> bool:
        """Only on a listener behind a load balancer (relay/smtpd/proxy.py)."""
        return server.accept_proxy(proxy_data)

    async def handle_MAIL(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.stopping:
            await server.hang_up(replies.SHUTTING_DOWN)
            return replies.SHUTTING_DOWN
        identity = session.auth_data if session.authenticated else None
        if not isinstance(identity, Identity):
            self._metrics.message_refused("auth_required")
            return replies.AUTH_REQUIRED
        current = await self._authenticator.recheck(identity)
        if isinstance(current, str):
            maillog.rejected(session.peer, identity.key_id, current)
            self._metrics.message_refused(_recheck_reason(current), identity.key_id)
            return current
        session.auth_data = current
        if not policy.sender_allowed(current, address):
            maillog.rejected(session.peer, current.key_id, replies.SENDER_NOT_OWNED)
            self._metrics.message_refused("sender_not_owned", current.key_id)
            return replies.SENDER_NOT_OWNED
        try:
            allowed = await self._rates.allow(current.key_id, current.rate_limit)
        except LimitsUnavailable:  # never let it through unlimited; the client retries
            maillog.rejected(session.peer, current.key_id, replies.RATE_UNAVAILABLE)
            # the shared rates live in the keystore's database (the limits say why, once)
            self._metrics.message_refused("keystore_unavailable", current.key_id)
            return replies.RATE_UNAVAILABLE
        if not allowed:
            maillog.rejected(session.peer, current.key_id, replies.RATE_LIMITED)
            self._metrics.message_refused("rate_limited", current.key_id)
            return replies.RATE_LIMITED
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.MAIL_OK

    async def handle_RCPT(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if not policy.deliverable_address(address):
            return replies.BAD_RECIPIENT
        if address in envelope.rcpt_tos:
            return replies.RCPT_OK
        if len(envelope.rcpt_tos) >= self._server_cfg.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.RCPT_OK

    # ------------------------------------------------------------------ DATA

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        identity: Identity = session.auth_data
        body: MessageBody = envelope.body  # type: ignore[attr-defined]  # see RelaySMTP.smtp_DATA
        header = body.header + b"\r\n" if body.header_done else body.header
        if len(header) > _HEADER_ON_LOOP:  # parsing is pure Python: keep big ones off the loop
            info = await asyncio.to_thread(
                policy.check_headers, identity, header, check_from=self._server_cfg.check_header_from)
        else:
            info = policy.check_headers(identity, header, check_from=self._server_cfg.check_header_from)
        if isinstance(info, str):
            maillog.rejected(session.peer, identity.key_id, info)
            self._metrics.message_refused("header", identity.key_id)
            return info
        # The key may have been revoked while the message arrived: ask the keystore itself.
        current = await self._authenticator.recheck(identity, fresh=True)
        if isinstance(current, str):
            reply = _refused_at_data(current)
            maillog.rejected(session.peer, identity.key_id, reply)
            self._metrics.message_refused(_recheck_reason(current), identity.key_id)
            return reply
        now = time.time()
        queue_id = new_queue_id()
        hostname = self._server_cfg.hostname
        trace = policy.received_header(
            helo=session.host_name or "unknown", client_ip=_client_ip(session),
            hostname=hostname, queue_id=queue_id, tls=server.tls_info or "plaintext",
            key_id=identity.key_id, when=now,
        )
        added = policy.missing_headers(info, hostname=hostname, queue_id=queue_id, when=now)
        try:
            content: bytes | FileBody
            if body.on_disk:  # Queue.put closes the FileBody once the spool has it
                content = FileBody(b"", await body.file_fd(), body.size)
                try:
                    signature = await self._sign_file(added, content, header)
                except BaseException:
                    content.close()
                    raise
                content.head = trace + signature + added
                content.size += len(content.head)
            else:
                message = body.content()
                signature = await self._signer.sign_async(added + message)
                content = trace + signature + added + message
        except OSError as exc:
            log.error("cannot read the message back from its file: %s", exc)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self._metrics.message_refused("spool_full" if full else "spool_error", identity.key_id)
            return replies.SPOOL_FULL if full else replies.SPOOL_ERROR
        item = QueueItem(
            id=queue_id, created=now, mail_from=envelope.mail_from, recipients=list(envelope.rcpt_tos),
            key_id=identity.key_id, mailbox=identity.mailbox, route=identity.route, body=content,
        )
        try:
            # shielded: if the client drops mid-commit, the commit still completes and the
            # message is still scheduled: stored and sent, or absent, never between
            await asyncio.shield(self._queue.put(item))
        except SpoolFull:
            log.error("spool is full; refusing message from key %s", identity.key_id)
            self._metrics.message_refused("spool_full", identity.key_id)
            return replies.SPOOL_FULL
        except Exception:
            log.exception("spool write failed")
            self._metrics.message_refused("spool_error", identity.key_id)
            return replies.SPOOL_ERROR
        maillog.queued(session.peer, item)
        self._metrics.message_accepted(identity.key_id)
        return replies.QUEUED.format(queue_id=queue_id)

    async def _sign_file(self, added: bytes, content: FileBody, header: bytes) -> bytes:
        """A DKIM signature over a message on disk: dkimpy needs it whole in memory, so
        this is the one step where a big message is read back whole (only when its From:
        domain has a key)."""
        if not self._signer.signs(header):
            return b""
        whole = await asyncio.to_thread(content.read)
        return await self._signer.sign_async(added + whole)

    async def handle_exception(self, error: Exception) -> str:
        log.error("error in SMTP session: %r", error, exc_info=error)
        return replies.SPOOL_ERROR


async def _first_response(server: RelaySMTP, args: list[str], *, prompt: str):
    """The initial response given with the AUTH command, or the answer to a 334 prompt;
    MISSING once a 501 has been sent (bad base64, or the client aborted with `*`). An
    initial response `=` is an empty one (RFC 4954 section 4)."""
    if len(args) == 1:
        return await server.challenge_auth(prompt)
    if args[1] == "=":
        return b""
    try:
        return b64decode(args[1], validate=True)
    except ValueError:
        await server.push(replies.AUTH_BAD_BASE64)
        return MISSING


async def _on_tls(server: RelaySMTP) -> bool:
    """Defence in depth under aiosmtpd's own check: never take a secret in plaintext."""
    if server.tls_info is None:
        await server.push(replies.AUTH_NEEDS_TLS)
        return False
    return True


def _recheck_reason(reply: str) -> str:
    """The metrics reason for a recheck's refusal: a 4xx is the keystore not answering."""
    return "keystore_unavailable" if reply.startswith("4") else "key_unusable"


def _refused_at_data(reply: str) -> str:
    """The recheck's AUTH-style refusal ("535 5.7.8 ...: this auth key has been revoked")
    as an end-of-data reply that names the same reason."""
    code, _, text = reply.partition(" ")
    if code.startswith("4"):
        return reply  # temporary (keystore unavailable): the client tries again
    text = text.partition(" ")[2]  # past the enhanced code
    return replies.REVOKED_DURING_DATA.format(reason=text.partition(": ")[2] or text)


def _client_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)
