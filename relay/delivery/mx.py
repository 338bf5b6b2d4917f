"""Direct delivery to each recipient domain's own mail servers (RFC 5321 section 5.1).

This module owns the route from a recipient domain to an SMTP session: the MX lookup
(implicit MX from A/AAAA when there is none, RFC 7505 null MX), the order hosts are tried
in (preference, equal preferences shuffled, at most MAX_MX_HOSTS), and one transaction
per domain with opportunistic STARTTLS. Which reply means sent, deferred or failed is
decided in errors.py; DNS answers are classified here:

    NXDOMAIN, null MX, no MX and no address   -> failed  (550 5.1.2 / 556 5.1.10)
    timeout, SERVFAIL, no usable address      -> deferred (451 4.4.3 / 4.4.4)

A host that cannot be reached, refuses the session (greeting, EHLO, STARTTLS, MAIL FROM)
or answers 4xx hands the still undecided recipients to the next host; only a 5xx to RCPT
or to the end of DATA is final (relay/delivery/errors.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from typing import TYPE_CHECKING

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from relay.config import ConfigError, DnsConfig, UpstreamConfig
from relay.delivery.courier import Outcome, Status
from relay.delivery.errors import session_trouble
from relay.delivery.transaction import SenderRefused, transaction

if TYPE_CHECKING:
    from relay.queue.model import Body

__all__ = ["MAX_ADDRESSES", "MAX_MX_HOSTS", "MxCourier"]

MAX_MX_HOSTS = 5  # MX hosts tried per domain and attempt
MAX_ADDRESSES = 10  # connections tried per domain and attempt (a host may have several)
QUIT_TIMEOUT = 5.0


class _Verdict(Exception):
    """A DNS answer that decides the outcome for a whole domain (or host)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome


class MxCourier:
    def __init__(self, upstream: UpstreamConfig, dns: DnsConfig, *, local_hostname: str) -> None:
        self.name = upstream.name
        self._upstream = upstream
        self._local_hostname = local_hostname
        self._resolver = _make_resolver(dns)
        self.max_connections = upstream.max_connections
        self._slots = asyncio.Semaphore(upstream.max_connections)

    async def deliver(self, mail_from: str, recipients: list[str], body: Body) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        by_domain: dict[str, list[str]] = {}
        for rcpt in recipients:
            domain = rcpt.rpartition("@")[2].rstrip(".").lower()
            if "@" not in rcpt or not domain:
                outcomes[rcpt] = Outcome(Status.FAILED, f"550 5.1.3 {rcpt}: no domain in the address")
            else:
                by_domain.setdefault(domain, []).append(rcpt)
        results = await asyncio.gather(
            *(self._deliver_domain(domain, mail_from, rcpts, body) for domain, rcpts in by_domain.items()),
            return_exceptions=True,
        )
        for rcpts, result in zip(by_domain.values(), results, strict=True):
            if isinstance(result, Exception):  # a bug, not the network: retry rather than bounce
                bug = Outcome(Status.DEFERRED, f"451 4.3.0 unexpected MX delivery error: {result!r}")
                result = dict.fromkeys(rcpts, bug)
            elif isinstance(result, BaseException):
                raise result
            outcomes.update(result)
        return outcomes

    async def close(self) -> None:
        """Nothing to release: every session is closed when its transaction ends."""

    async def _deliver_domain(
        self, domain: str, mail_from: str, rcpts: list[str], body: Body
    ) -> dict[str, Outcome]:
        pending = list(dict.fromkeys(rcpts))
        try:
            hosts, fallback = await self._route(domain)
        except _Verdict as verdict:
            return dict.fromkeys(pending, verdict.outcome)
        outcomes = dict.fromkeys(pending, fallback)
        attempts = 0
        for host in hosts:
            try:
                addresses = await self._addresses(host)
            except _Verdict as verdict:
                if attempts == 0:  # a remote reply, once there is one, says more than DNS
                    outcomes.update(dict.fromkeys(pending, verdict.outcome))
                continue
            for address in addresses:
                if attempts == MAX_ADDRESSES:
                    return outcomes
                attempts += 1
                outcomes.update(await self._session(address, mail_from, pending, body))
                pending = [r for r in pending if outcomes[r].status is Status.DEFERRED]
                if not pending:
                    return outcomes
        return outcomes

    async def _route(self, domain: str) -> tuple[list[str], Outcome]:
        """The hosts to try, best first, and the outcome if none of them has an address."""
        if domain.startswith("["):
            raise _Verdict(Outcome(Status.FAILED, f"550 5.1.2 {domain}: no delivery to address literals"))
        try:
            dns.name.from_text(domain)
        except (dns.exception.DNSException, UnicodeError) as exc:
            raise _Verdict(Outcome(Status.FAILED, f"550 5.1.2 {domain}: invalid domain ({exc})")) from None
        try:
            records = await self._query(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise _Verdict(Outcome(Status.FAILED, f"550 5.1.2 {domain}: domain does not exist")) from None
        if not records:  # no MX: the domain itself is the implicit MX
            return [domain], Outcome(Status.FAILED, f"550 5.1.2 {domain}: no MX and no address records")
        hosts = _by_preference(records)
        if not hosts:
            raise _Verdict(Outcome(Status.FAILED, f"556 5.1.10 {domain} does not accept mail (null MX)"))
        no_address = Outcome(Status.DEFERRED, f"451 4.4.4 {domain}: none of its MX hosts has an address")
        return hosts[:MAX_MX_HOSTS], no_address

    async def _addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses; raises _Verdict only if a lookup failed and none was found."""
        found: list[str] = []
        problem: _Verdict | None = None
        for rdtype in ("A", "AAAA"):
            try:
                found += [record.address for record in await self._query(host, rdtype)]
            except dns.resolver.NXDOMAIN:
                break
            except _Verdict as verdict:
                problem = verdict
        if not found and problem is not None:
            raise problem
        usable = [a for a in dict.fromkeys(found) if self._upstream.allow_private_targets or _public(a)]
        if found and not usable:
            # a domain pointing its MX at our loopback or private network is trying to make
            # the relay deliver inside it
            raise _Verdict(Outcome(Status.FAILED, f"550 5.4.4 {host} has only private or loopback addresses"))
        return usable

    async def _query(self, name: str, rdtype: str) -> list:
        """The records ([] for NODATA); NXDOMAIN propagates; anything else is a temporary _Verdict."""
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return []
        except dns.resolver.NXDOMAIN:
            raise
        except dns.exception.DNSException as exc:
            reply = f"451 4.4.3 DNS lookup of {name} {rdtype} failed: {exc}"
            raise _Verdict(Outcome(Status.DEFERRED, reply)) from None
        return list(answer)

    async def _session(
        self, address: str, mail_from: str, rcpts: list[str], body: Body
    ) -> dict[str, Outcome]:
        up = self._upstream
        client = aiosmtplib.SMTP(
            hostname=address,
            port=up.effective_port,
            local_hostname=self._local_hostname,
            timeout=up.timeout,
            start_tls=None,  # upgrade when offered; MX hosts rarely have certificates we could verify
            validate_certs=False,
        )
        async with self._slots:
            try:
                await client.connect()
            except Exception as exc:  # noqa: BLE001 - this host is unusable now; try the next
                client.close()
                return dict.fromkeys(rcpts, session_trouble(address, exc))
            try:
                return (await transaction(client, address, mail_from, rcpts, body)).outcomes
            except SenderRefused as refused:
                return dict.fromkeys(rcpts, refused.outcome)
            finally:
                await _quit(client)


# IPv6 forms that carry an IPv4 address the packets end up at: NAT64's well-known prefix
# (RFC 6052), the SIIT "IPv4-translated" form (RFC 2765) and the deprecated IPv4-compatible
# form (RFC 4291); IPv4-mapped and 6to4 (RFC 3056) have their own ipaddress properties.
_IPV4_IN_LOW_BITS = tuple(map(ipaddress.IPv6Network, ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96")))
# RFC 8215 local-use NAT64: a translator inside the operator's own network, whatever follows.
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")


def _public(address: str) -> bool:
    """Whether an MX target is on the public internet. An IPv6 address that embeds an IPv4
    one reaches that address (through a NAT64 translator or 6to4 relay, or the host's own
    stack), so `64:ff9b::127.0.0.1` or `2002:0a00:0001::` is as private as the IPv4 inside."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL_USE:
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and any(ip in network for network in _IPV4_IN_LOW_BITS):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
        if embedded is not None:
            return embedded.is_global
    return ip.is_global


def _make_resolver(config: DnsConfig) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
    if config.nameservers:
        resolver.port = config.port  # before nameservers: the port is attached to them then
        try:
            resolver.nameservers = list(config.nameservers)
        except ValueError as exc:  # neither an IP address nor a DNS-over-HTTPS URL
            raise ConfigError(f"[dns] nameservers: {exc}") from None
    resolver.timeout = resolver.lifetime = float(config.timeout)
    resolver.cache = dns.resolver.LRUCache(512)  # honours TTLs
    return resolver


def _by_preference(records: list) -> list[str]:
    """Exchange names, lowest preference first, equal preferences shuffled; "." dropped."""
    groups: dict[int, list[str]] = {}
    for record in records:
        if record.exchange != dns.name.root:
            groups.setdefault(record.preference, []).append(record.exchange.to_text())
    hosts: list[str] = []
    for preference in sorted(groups):
        random.shuffle(groups[preference])
        hosts += groups[preference]
    return list(dict.fromkeys(hosts))


async def _quit(client: aiosmtplib.SMTP) -> None:
    if not client.is_connected:
        return
    try:
        await asyncio.wait_for(client.quit(), QUIT_TIMEOUT)
    except Exception:  # noqa: BLE001 - the mail is decided; a rude goodbye changes nothing
        client.close()
