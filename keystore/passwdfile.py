"""Reading the password files operators bring (issue 13): a Dovecot passwd-file and an
Apache htpasswd file, one user per line, into entries for `KeyStore.import_legacy`.

Every line is judged on its own and problems are reported with the line number, never
with the line (it holds a password hash, or a plain-text password): the import decides
whether one bad line stops it (it does, unless --skip-bad).

Dovecot's passwd-file: `user:password:uid:gid:gecos:home:shell:extra fields`, where only
the first two are needed and the password may carry a `{SCHEME}` prefix
(https://doc.dovecot.org/configuration_manual/authentication/passwd_file/). Of the extra
fields, `allow_nets=` is kept: it becomes the legacy credential's allow-from, so a
password limited to some networks under Dovecot stays limited. `nologin` and `nopassword`
users are refused (they log in with no password, or not at all). htpasswd:
`user:hash`.

A user without a domain (`alice`) needs `--domain` to become a mailbox address.
"""

from __future__ import annotations

import ipaddress

from keystore.legacy import BadLine, HashRefused, LegacyEntry, classify
from keystore.store import StoreError, normalize_address

__all__ = ["BadLine", "LegacyEntry", "read_dovecot_passwd", "read_htpasswd"]

# A user with a character a terminal does not show as itself: an invisible one (a zero-width
# space) makes an address nobody can type, a control one (C1 CSI) is obeyed by terminals that
# list it, and bytes that are not UTF-8 (a Latin-1 file; read as surrogates) cannot be stored.
_UNPRINTABLE = ("not a valid mailbox address: it holds an invisible or control character, or "
                "bytes that are not UTF-8")


def read_dovecot_passwd(text: str, *, domain: str | None = None) -> tuple[list[LegacyEntry], list[BadLine]]:
    return _read(text, domain=domain, dovecot=True)


def read_htpasswd(text: str, *, domain: str | None = None) -> tuple[list[LegacyEntry], list[BadLine]]:
    return _read(text, domain=domain, dovecot=False)


def _read(text: str, *, domain: str | None, dovecot: bool) -> tuple[list[LegacyEntry], list[BadLine]]:
    entries: list[LegacyEntry] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    text = text.removeprefix("\ufeff")  # a byte order mark (a file saved by a Windows editor)
    # only a line feed ends a line (str.splitlines also breaks at \v, \f, U+2028...: a gecos
    # field holding one would shift every later line number from what an editor shows)
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = raw.rstrip("\r\n").split(":")
        user = fields[0].strip()
        if len(fields) < 2 or not user:
            bad.append(BadLine(number, None, "not 'user:password...'"))
            continue
        shown = _shown(user)
        address = _address(user, domain)
        if address is None:
            why = (_UNPRINTABLE if not user.isprintable()
                   else "not a mailbox address; give --domain to import users without one" if "@" not in user
                   else "not a valid mailbox address")
            bad.append(BadLine(number, shown, why))
            continue
        if address in seen:
            bad.append(BadLine(number, shown, f"{address} is also on line {seen[address]}"))
            continue
        seen[address] = number
        try:
            extras = _extras(fields[7:]) if dovecot else {}
            if "nologin" in extras or "nopassword" in extras:
                raise HashRefused("a 'nologin' or 'nopassword' user: nothing to import")
            scheme, password_hash = classify(fields[1], dovecot=dovecot)
            allow_from = _networks(extras.get("allow_nets", ""))
        except HashRefused as exc:
            bad.append(BadLine(number, shown, str(exc)))
            continue
        entries.append(LegacyEntry(number, address, scheme, password_hash, allow_from))
    return entries, bad


def _shown(user: str) -> str:
    """The user as an error message may show it: printable, and not too long."""
    text = "".join(c if c.isprintable() else "?" for c in user)
    return text if len(text) <= 80 else text[:77] + "..."


def _address(user: str, domain: str | None) -> str | None:
    if not user.isprintable():
        return None  # see _UNPRINTABLE
    if "@" not in user:
        if not domain:
            return None
        user = f"{user}@{domain}"
    try:
        return normalize_address(user)
    except StoreError:
        return None


def _extras(fields: list[str]) -> dict[str, str]:
    """Dovecot's extra fields (space separated `key=value` or bare `key`; userdb_ ones are
    the userdb's and ignored here)."""
    found: dict[str, str] = {}
    for word in ":".join(fields).split():
        name, _, value = word.partition("=")
        found[name.lower()] = value
    return found


def _networks(text: str) -> tuple[str, ...]:
    if not text:
        return ()
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.lower() == "local":  # Dovecot's "connections without an IP" (a Unix socket)
            raise HashRefused("allow_nets=local: the relay has no local logins; leave it out or "
                              "name networks")
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise HashRefused(f"allow_nets: {item!r} is not a network") from None
    return tuple(out)
