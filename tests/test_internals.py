"""The private names relay/internals.py relies on still exist in the installed libraries.

A library upgrade that renames one fails here, naming it, instead of somewhere deep in a
session. Each entry of internals.REQUIRED is checked on the class, module or a live
instance it names.
"""

from __future__ import annotations

import asyncio
import importlib

import aiosmtplib.protocol
import pytest
from aiosmtpd.smtp import SMTP

from relay import internals
from tests.support.waiting import wait_until


class _Handler:
    pass


def _instance(what: str, loop: asyncio.AbstractEventLoop) -> object:
    factories = {
        "asyncio.StreamReader": lambda: asyncio.StreamReader(loop=loop),
        "aiosmtpd.smtp.SMTP": lambda: SMTP(_Handler(), loop=loop),
        "aiosmtplib.protocol.SMTPProtocol": lambda: _connected_smtp_protocol(loop),
    }
    if what not in factories:
        pytest.fail(f"tests/test_internals.py has no way to build a live {what}: add one")
    return factories[what]()


def _connected_smtp_protocol(loop: asyncio.AbstractEventLoop) -> aiosmtplib.protocol.SMTPProtocol:
    """Some of aiosmtplib's attributes exist only once a connection is made."""

    class _Transport(asyncio.Transport):
        def get_extra_info(self, name, default=None):
            return default

    protocol = aiosmtplib.protocol.SMTPProtocol(loop=loop)
    protocol.connection_made(_Transport())
    return protocol


def _resolve(what: str) -> object:
    """"pkg.mod.Class" → the class, "pkg.mod" → the module."""
    try:
        return importlib.import_module(what)
    except ModuleNotFoundError:
        module, _, name = what.rpartition(".")
        return getattr(importlib.import_module(module), name)


ON_OBJECTS = [(what, name) for what, name in internals.REQUIRED if not what.endswith(" session")]
ON_SESSIONS = [(what, name) for what, name in internals.REQUIRED if what.endswith(" session")]


@pytest.mark.parametrize(("what", "name"), ON_SESSIONS, ids=[f"{what}.{name}" for what, name in ON_SESSIONS])
async def test_a_private_name_of_a_live_session_is_still_there(h, what, name):
    """Some exist only once a client is connected: checked on a real session."""
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    try:
        await reader.readline()  # the greeting: the session exists
        await wait_until(lambda: h.relay.registry.live, what="the session in the registry")
        (session,) = h.relay.registry.live
        assert hasattr(session, name), f"{what} has no {name!r} any more: relay/internals.py must change"
    finally:
        writer.close()


@pytest.mark.parametrize(("what", "name"), ON_OBJECTS, ids=[f"{what}.{name}" for what, name in ON_OBJECTS])
def test_a_private_name_the_relay_relies_on_is_still_there(what, name):
    loop = asyncio.new_event_loop()
    try:
        if what.endswith(" instance"):
            target = _instance(what.removesuffix(" instance"), loop)
        else:
            target = _resolve(what)
        assert hasattr(target, name), f"{what} has no {name!r} any more: relay/internals.py must change"
    finally:
        loop.close()


def test_the_libraries_reached_into_have_upper_version_bounds():
    """A new major or minor release may move what we touch: pyproject.toml bounds them."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    dependencies = {d.split(">")[0].split("<")[0].split("=")[0].split("[")[0]: d
                    for d in project["project"]["dependencies"]}
    for package in ("aiosmtpd", "aiosmtplib"):
        assert "<" in dependencies[package], f"{package} needs an upper bound: {dependencies[package]}"
