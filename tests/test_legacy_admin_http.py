"""Legacy passwords (issue 13) in the admin HTTP API and the web console, against
`keystore serve` as a real process: every key answer says what it is (an auth key, or an
imported password and its scheme) and never the hash; the API lists legacy passwords with
their last use, sets their deadline and converts them to keys, with the roles and
workspaces of keys; the console marks them wherever keys are listed and converts them
behind its CSRF protection, and the relay then takes the new key and ends the password.

Passwords are hashed by the real tools (htpasswd, doveadm) and imported by the real
keystore (tests/support/legacyseed.py); the API part runs on sqlite, then PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from keystore.models import Identity, Reason
from tests.support.adminserver import Token, admin_server, create_token
from tests.support.consolesite import ConsoleSite, console_site, csrf_of, refusal_of
from tests.support.keystores import BACKENDS, KeystorePlace
from tests.support.legacyseed import bcrypt_hash, dovecot_hash, import_lines
from tests.support.procs import free_port, keystore_cli
from tests.support.relayrun import write_config
from tests.support.sink import Sink
from tests.support.waiting import wait_until
from tests.test_admin_api import client, error, mailbox, new_key, ok, token, unique
from tests.test_console_http import badges_of, key_status
from tests.test_console_http import new_key as console_key

PASSWORD = "Tr0ub4dor&3 old"  # not key-shaped: the relay checks it as the legacy password
RETIRED = (b"5.7.8 Authentication credentials invalid: password logins have ended for this "
           b"mailbox; use an auth key as the password")


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    """PASSWORD hashed by the real tools, once: Dovecot's scheme name -> the file's hash."""
    return {"BLF-CRYPT": bcrypt_hash(PASSWORD), "SHA512-CRYPT": dovecot_hash("SHA512-CRYPT", PASSWORD)}


def secrets_of(hashes: dict[str, str]) -> list[str]:
    """What must never appear in an answer: each hash, with and without its {SCHEME}."""
    return [*hashes.values(), *(h.partition("}")[2] for h in hashes.values() if h.startswith("{"))]


# ================================================================== the API


@pytest.fixture(scope="module", params=BACKENDS)
def place(request, tmp_path_factory) -> KeystorePlace:
    folder = tmp_path_factory.mktemp("legacy-api")
    if request.param == "sqlite":
        return KeystorePlace(folder)
    server = request.getfixturevalue("postgres_server")
    return KeystorePlace(folder, server.create_database(f"legacy_{uuid.uuid4().hex[:12]}"))


@pytest.fixture(scope="module")
def folder(place) -> Path:
    config = write_config(place.folder, free_port())
    config.write_text(config.read_text().replace(KeystorePlace(place.folder).config_lines(),
                                                 place.config_lines()))
    assert keystore_cli(config, "init").returncode == 0
    return place.folder


@pytest.fixture(scope="module")
def server(folder):
    with admin_server(folder / "relay.toml") as running:
        yield running


@pytest.fixture(scope="module")
def owner(folder) -> Token:
    return create_token(folder / "relay.toml", "root", "owner")


def seed(place: KeystorePlace, hashes: dict[str, str], workspace: str, *addresses: str,
         scheme: str = "BLF-CRYPT") -> None:
    """Import PASSWORD's `scheme` hash for each address, as `keystore import` would."""
    asyncio.run(import_lines(lambda: place.open(create=False),
                             [(a, hashes[scheme]) for a in addresses], workspace=workspace,
                             dovecot=scheme != "BLF-CRYPT"))


def address_in(workspace: str) -> str:
    return f"{unique('u')}@{workspace}.example"


def elsewhere(api: httpx.Client) -> str:
    """Another workspace (it exists once it has a mailbox), for a token limited to it."""
    workspace = unique("elsewhere")
    mailbox(api, workspace)
    return workspace


def legacy_of(api: httpx.Client, address: str) -> dict:
    """The mailbox's legacy password as the key listing shows it."""
    (found,) = ok(api.get("/keys", params={"mailbox": address, "kind": "legacy"}))["keys"]
    return found


async def log_in(place: KeystorePlace, address: str, secret: str, ip: str) -> Identity | Reason:
    """One login decided by the keystore as the relay asks it; closing it writes the last
    use (and retires a converted password, as the relay's bookkeeping does)."""
    store = await place.open(create=False)
    try:
        return await store.authenticate(address, secret, ip)
    finally:
        await store.close()


def test_every_key_answer_says_its_kind_and_scheme_and_never_the_hash(server, owner, place, hashes):
    ws = unique("ws")
    old, dove = address_in(ws), address_in(ws)
    seed(place, hashes, ws, old)
    seed(place, hashes, ws, dove, scheme="SHA512-CRYPT")
    answers: list[str] = []
    with client(server, owner) as api:
        created = new_key(api, old)
        key = created["key"]
        assert (key["kind"], key["scheme"], key["replaced_by"]) == ("key", None, None)
        listed = {k["id"]: k for k in ok(api.get("/keys", params={"workspace": ws}))["keys"]}
        bcrypt, sha = legacy_of(api, old), legacy_of(api, dove)
        assert set(listed) == {key["id"], bcrypt["id"], sha["id"]}
        assert [bcrypt[f] for f in ("kind", "scheme", "name", "status", "replaced_by")] == [
            "legacy", "BLF-CRYPT", "legacy password", "active", None]
        assert (sha["kind"], sha["scheme"], sha["mailbox"]) == ("legacy", "SHA512-CRYPT", dove)
        assert ok(api.get(f"/keys/{bcrypt['id']}")) == bcrypt == listed[bcrypt["id"]]

        def ids(**params: str) -> set[str]:
            reply = api.get("/keys", params={"workspace": ws, **params})
            answers.append(reply.text)
            return {k["id"] for k in ok(reply)["keys"]}

        assert ids(kind="legacy") == {bcrypt["id"], sha["id"]}
        assert ids(kind="key") == {key["id"]}
        assert "unknown kind 'keys' (use key, legacy)" in error(
            api.get("/keys", params={"kind": "keys"}), 400, "invalid")
        # a legacy password is converted, never rotated: the API says so and how
        rotated = api.post(f"/keys/{bcrypt['id']}/rotate")
        assert f"keystore legacy convert {old}" in error(rotated, 409, "conflict")

        passwords = ok(api.get("/legacy", params={"workspace": ws}))["passwords"]
        assert {(p["mailbox"], p["scheme"], p["state"], p["last_used"], p["last_ip"], p["expires"])
                for p in passwords} == {(old, "BLF-CRYPT", "active", None, None, None),
                                        (dove, "SHA512-CRYPT", "active", None, None, None)}
        for path in (f"/keys/{bcrypt['id']}", f"/keys/{sha['id']}", "/legacy", f"/audit?mailbox={old}",
                     f"/audit?mailbox={dove}", "/keys", "/mailboxes"):
            answers.append(ok(api.get(path)) and api.get(path).text)
    for text in answers:
        for secret in secrets_of(hashes):
            assert secret not in text


def test_the_document_describes_the_legacy_operations_and_says_importing_is_the_clis(server):
    doc = ok(httpx.get(server.api("/openapi.json")))
    assert {"/api/v1/legacy", "/api/v1/legacy/expire", "/api/v1/mailboxes/{address}/legacy/convert"} <= set(
        doc["paths"])
    assert not [p for p in doc["paths"] if "import" in p]
    assert "importing them is the CLI's only (`keystore import`" in doc["info"]["description"]
    key = doc["components"]["schemas"]["KeyOut"]["properties"]
    assert {"kind", "scheme", "replaced_by"} <= set(key)
    assert "password_hash" not in json.dumps(doc)
    convert = doc["paths"]["/api/v1/mailboxes/{address}/legacy/convert"]["post"]
    assert convert["responses"].keys() >= {"201", "403", "404", "409"}


def test_the_legacy_list_shows_who_still_logs_in_with_a_password_and_from_where(server, owner, place, hashes):
    ws = unique("ws")
    used, idle = address_in(ws), address_in(ws)
    seed(place, hashes, ws, used, idle)
    assert isinstance(asyncio.run(log_in(place, used, PASSWORD, "192.0.2.44")), Identity)
    assert asyncio.run(log_in(place, idle, "not it", "192.0.2.45")) is Reason.BAD_CREDENTIALS
    with client(server, owner) as api:
        viewer, stranger = token(api, "viewer"), token(api, "editor", elsewhere(api))
    with client(server, viewer) as api:
        passwords = {p["mailbox"]: p for p in ok(api.get("/legacy", params={"workspace": ws}))["passwords"]}
    assert passwords[used]["last_ip"] == "192.0.2.44"
    assert abs(datetime.fromisoformat(passwords[used]["last_used"]).timestamp() - time.time()) < 120
    # a wrong password is no use
    assert (passwords[idle]["last_used"], passwords[idle]["last_ip"]) == (None, None)
    with client(server, stranger) as api:  # a token of another workspace sees none of them
        assert ok(api.get("/legacy", params={"workspace": ws}))["passwords"] == []
        assert ws not in json.dumps(ok(api.get("/legacy")))


def test_an_editor_sets_a_deadline_within_its_workspace_and_a_viewer_may_not(server, owner, place, hashes):
    ws, other = unique("ws"), unique("ws")
    first, second, theirs = address_in(ws), address_in(ws), address_in(other)
    seed(place, hashes, ws, first, second)
    seed(place, hashes, other, theirs)
    with client(server, owner) as api:
        editor, viewer = token(api, "editor", ws), token(api, "viewer")
    with client(server, viewer) as api:
        assert "needs the editor role; this is viewer" in error(
            api.post("/legacy/expire", json={"after": "30d"}), 403, "forbidden")
    with client(server, editor) as api:
        answer = ok(api.post("/legacy/expire", json={"after": "30d", "mailbox": first}))
        deadline = datetime.fromisoformat(answer["deadline"]).timestamp()
        assert abs(deadline - (time.time() + 30 * 86400)) < 120
        assert [(p["mailbox"], p["expires"], p["state"]) for p in answer["passwords"]] == [
            (first, answer["deadline"], "active")]
        assert legacy_of(api, first)["expires"] == answer["deadline"]

        for body, words in (({"after": "30d", "at": "2031-01-01T00:00:00Z"}, "exactly one of after"),
                            ({}, "exactly one of after"),
                            ({"after": "soon"}, "after: invalid duration 'soon'"),
                            ({"at": "next week"}, "at: "), ({"after": "99999999w"}, "after"),
                            ({"after": "1d", "colour": "red"}, "colour: unknown field")):
            assert words in error(api.post("/legacy/expire", json=body), 400, "invalid"), body

        answer = ok(api.post("/legacy/expire", json={"at": "2031-05-01T12:00:00Z", "workspace": ws}))
        assert answer["deadline"] == "2031-05-01T12:00:00Z"
        assert sorted(p["mailbox"] for p in answer["passwords"]) == sorted([first, second])
        # another workspace's passwords: as if they did not exist, by name or by scope
        error(api.post("/legacy/expire", json={"after": "1d", "workspace": other}), 404, "not_found")
        error(api.post("/legacy/expire", json={"after": "1d", "mailbox": theirs}), 404, "not_found")
        everything = ok(api.post("/legacy/expire", json={"after": "1h"}))["passwords"]
        assert sorted(p["mailbox"] for p in everything) == sorted([first, second])
        trail = ok(api.get("/audit", params={"mailbox": first}))["events"]
        assert "legacy.expire" in {e["action"] for e in trail if e["actor"] == editor.actor}
    with client(server, owner) as api:
        assert legacy_of(api, theirs)["expires"] is None
        past = api.post("/legacy/expire", json={"at": "2020-01-01T00:00:00Z", "mailbox": theirs})
        assert error(past, 400, "invalid") == "expiry is in the past"
        soon = ok(api.post("/legacy/expire", json={"after": "2s", "mailbox": theirs}))
        assert [p["state"] for p in soon["passwords"]] == ["active"]

        def states() -> list[str]:
            return [p["state"] for p in ok(api.get("/legacy", params={"workspace": other}))["passwords"]]

        asyncio.run(wait_until(lambda: states() == ["ended"], timeout=10, what="its deadline passing"))


def test_converting_shows_the_key_once_and_the_password_retires_at_its_first_use(server, owner, place,
                                                                                 hashes):
    ws = unique("ws")
    old = address_in(ws)
    seed(place, hashes, ws, old)
    with client(server, owner) as api:
        editor, viewer = token(api, "editor", ws), token(api, "viewer")
        stranger = token(api, "editor", elsewhere(api))
        keyed = mailbox(api, ws)  # a mailbox without a legacy password
        password = legacy_of(api, old)
    convert = f"/mailboxes/{old}/legacy/convert"
    with client(server, viewer) as api:
        assert "needs the editor role; this is viewer" in error(api.post(convert), 403, "forbidden")
    with client(server, stranger) as api:
        assert "unknown mailbox" in error(api.post(convert), 404, "not_found")
    with client(server, editor) as api:
        assert "has no legacy password to convert" in error(
            api.post(f"/mailboxes/{keyed}/legacy/convert"), 404, "not_found")
        error(api.post(f"/mailboxes/nobody@{ws}.example/legacy/convert"), 404, "not_found")
        assert "unknown field" in error(api.post(convert, json={"nom": "x"}), 400, "invalid")

        reply = api.post(convert, json={"name": "Thunderbird"})
        converted = ok(reply, 201)
        assert reply.headers["cache-control"] == "no-store"
        key, legacy = converted["key"], converted["legacy"]
        assert converted["secret"].startswith(f"rak_{key['id']}_")
        assert [key[f] for f in ("kind", "name", "mailbox", "status")] == [
            "key", "Thunderbird", old, "active"]
        assert converted["smtp"]["username"] == old
        assert (legacy["id"], legacy["kind"], legacy["status"], legacy["replaced_by"]) == (
            password["id"], "legacy", "active", key["id"])
        assert converted["secret"] not in json.dumps(ok(api.get(f"/keys/{key['id']}")))
        assert f"already has key {key['id']}" in error(api.post(convert), 409, "conflict")
        # until the key is used, the password keeps working and is listed with its replacement
        (listed,) = ok(api.get("/legacy", params={"workspace": ws}))["passwords"]
        assert (listed["state"], listed["replaced_by"]) == ("active", key["id"])

    assert isinstance(asyncio.run(log_in(place, old, converted["secret"], "192.0.2.9")), Identity)
    with client(server, editor) as api:
        assert ok(api.get("/legacy", params={"workspace": ws}))["passwords"] == []
        (retired,) = ok(api.get("/legacy", params={"workspace": ws, "all": "true"}))["passwords"]
        assert (retired["id"], retired["state"], retired["status"]) == (password["id"], "retired", "revoked")
        events = [(e["action"], e["actor"]) for e in ok(api.get("/audit", params={"mailbox": old}))["events"]]
        assert ("legacy.convert", editor.actor) in events and ("legacy.retire", "relay") in events
        assert "has no legacy password to convert" in error(api.post(convert), 404, "not_found")
    assert asyncio.run(log_in(place, old, PASSWORD, "192.0.2.9")) is Reason.PASSWORD_RETIRED


# ============================================================== the console


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with console_site(tmp_path_factory.mktemp("legacy-console")) as running:
        yield running


async def console_seed(site: ConsoleSite, hashes: dict[str, str]) -> tuple[str, str]:
    """A new mailbox of workspace acme with PASSWORD imported: (address, its credential's id)."""
    address = f"{unique('u')}@acme.example"
    await import_lines(lambda: KeystorePlace(site.folder).open(create=False),
                       [(address, hashes["BLF-CRYPT"])], workspace="acme")
    reply = httpx.get(site.server.api("/keys"), params={"mailbox": address, "kind": "legacy"},
                      headers=site.tokens["owner"].headers)
    (found,) = reply.json()["keys"]
    return address, found["id"]


def shown(html: str, element_id: str) -> str:
    """The text of one element of a page, tags and surrounding space removed."""
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</(?:dd|p|section)>', html, re.S)
    assert match, f"the page has no #{element_id}"
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", match.group(1))).strip()


def test_the_console_marks_a_legacy_password_wherever_keys_are_listed(site: ConsoleSite, hashes):
    address, legacy_id = asyncio.run(console_seed(site, hashes))
    pages: list[str] = []
    with site.login("owner") as owner:
        key_id, _ = console_key(owner, address, "Phone")
        mailbox_page = owner.get(f"/mailboxes/{address}").text
        assert shown(mailbox_page, "legacy-password").startswith(
            "This mailbox has a legacy password: a BLF-CRYPT hash imported from the old mail server")
        assert f'href="/keys/{legacy_id}">Convert it to an auth key</a>' in mailbox_page
        assert shown(mailbox_page, "mailbox-legacy") == "yes (BLF-CRYPT)"
        assert badges_of(mailbox_page, legacy_id) == ["legacy"]
        assert badges_of(mailbox_page, key_id) == []
        legacy_list = owner.get("/keys", params={"kind": "legacy", "q": address}).text
        assert "<h1>Legacy passwords</h1>" in legacy_list
        assert set(re.findall(r'data-key-id="(\w+)"', legacy_list)) == {legacy_id}
        every = owner.get("/keys", params={"q": address}).text
        assert set(re.findall(r'data-key-id="(\w+)"', every)) == {legacy_id, key_id}
        assert badges_of(every, legacy_id) == ["legacy"]
        assert 'href="/keys?kind=legacy"' in every  # the menu's way to them
        workspace_page = owner.get("/workspaces/acme").text
        row = re.search(rf'<a href="/mailboxes/{address}">{address}</a>(.*?)</td>', workspace_page)
        assert row and 'class="badge badge-legacy"' in row.group(1)
        assert 'badge-legacy' not in re.search(r'<a href="/mailboxes/alice@acme.example">.*?</td>',
                                               workspace_page).group(0)

        page = owner.get(f"/keys/{legacy_id}").text
        assert re.search(r'<h1>legacy password <span class="status status-active">active</span> '
                         r'<span class="badge badge-legacy">legacy</span></h1>', page)
        assert "An imported legacy password" in page
        assert shown(page, "legacy-scheme") == "BLF-CRYPT"
        assert shown(page, "legacy-deadline") == "none: it works until converted or revoked"
        assert shown(page, "legacy-replacement") == "none yet"
        assert 'id="convert"' in page and "/rotate" not in page  # converted, never rotated
        assert 'id="legacy"' not in owner.get(f"/keys/{key_id}").text
        assert 'id="rotate"' in owner.get(f"/keys/{key_id}").text
        pages += [mailbox_page, legacy_list, every, page]

    # a deadline set over the API shows on both pages
    deadline = httpx.post(site.server.api("/legacy/expire"), json={"after": "30d", "mailbox": address},
                          headers=site.tokens["editor"].headers)
    assert deadline.status_code == 200, deadline.text
    with site.login("viewer") as viewer:
        page = viewer.get(f"/keys/{legacy_id}").text
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC \(in (29|30) days\)",
                            shown(page, "legacy-deadline"))
        assert "/convert" not in page and 'id="convert"' not in page  # a viewer gets no button...
        reply = viewer.post(f"/keys/{legacy_id}/convert", data={"csrf": csrf_of(page)})
        assert reply.status_code == 403  # ...nor a conversion by posting the form itself
        assert refusal_of(reply.text) == "converting a legacy password needs the editor role; this is viewer"
        mailbox_page = viewer.get(f"/mailboxes/{address}").text
        assert " until 20" in shown(mailbox_page, "legacy-password")
        assert f'href="/keys/{legacy_id}">See the legacy password</a>' in mailbox_page
        pages += [page, mailbox_page, reply.text, viewer.get(f"/audit?key={legacy_id}").text]

        # past its deadline, the mailbox page says the password has stopped working
        soon = httpx.post(site.server.api("/legacy/expire"), json={"after": "1s", "mailbox": address},
                          headers=site.tokens["editor"].headers)
        assert soon.status_code == 200, soon.text

        def banner() -> str:
            return shown(viewer.get(f"/mailboxes/{address}").text, "legacy-password")

        asyncio.run(wait_until(lambda: "stopped working" in banner(), timeout=10, what="the deadline"))
        assert "which stopped working at its deadline, 20" in banner() and "still log in" not in banner()
    for html in pages:
        for secret in secrets_of(hashes):
            assert secret not in html


async def test_a_password_converted_in_the_console_gives_way_to_the_key_at_the_relay(site: ConsoleSite,
                                                                                     hashes):
    """As a person migrates a mailbox: its users send with their old password; an editor
    converts it in the console (CSRF-checked) and hands over the key shown once; the
    client sends with the key, the relay retires the password, and the old password is
    refused with the reply that says to use a key."""
    address, legacy_id = await console_seed(site, hashes)
    async with Sink() as sink, site.relay(sink):
        await asyncio.to_thread(site.send, address, PASSWORD, subject="with the old password")
        await sink.wait_for(1)
        with site.login("editor") as editor:
            page = editor.get(f"/keys/{legacy_id}").text
            forged = editor.post(f"/keys/{legacy_id}/convert", data={"name": "Thunderbird"})
            assert forged.status_code == 403 and "CSRF" in refusal_of(forged.text)
            assert shown(editor.get(f"/keys/{legacy_id}").text, "legacy-replacement") == "none yet"

            token = csrf_of(page)
            reply = editor.post(f"/keys/{legacy_id}/convert", data={"csrf": token, "name": "Thunderbird"})
            assert reply.status_code == 303, reply.text
            key_id = reply.headers["location"].split("/")[2]
            assert reply.headers["location"] == f"/keys/{key_id}/secret"
            secret_page = editor.get(reply.headers["location"]).text
            assert "<h1>Key Thunderbird created</h1>" in secret_page
            assert shown(secret_page, "converted").startswith(
                "This key replaces the mailbox's legacy password")
            assert shown(secret_page, "smtp-username") == address
            secret = re.search(r'id="secret"[^>]*>([^<]+)<', secret_page).group(1)
            assert secret.startswith(f"rak_{key_id}_")

            page = editor.get(f"/keys/{legacy_id}").text
            assert shown(page, "legacy-replacement") == (
                f"Thunderbird {key_id} active: this password is retired at its first login")
            assert 'id="convert"' not in page
            again = editor.post(f"/keys/{legacy_id}/convert", data={"csrf": token})
            assert again.status_code == 409 and f"already has key {key_id}" in refusal_of(again.text)
            wrong = editor.post(f"/keys/{key_id}/convert", data={"csrf": token})
            assert wrong.status_code == 400
            assert refusal_of(wrong.text).startswith(f"{key_id} is an auth key, not a legacy password")
            rotate = editor.post(f"/keys/{legacy_id}/rotate", data={"csrf": token, "grace": "0"})
            assert rotate.status_code == 409
            assert "is a legacy password: it is not rotated" in refusal_of(rotate.text)

            await asyncio.to_thread(site.send, address, secret, subject="with the key")
            await sink.wait_for(2)

            def retired() -> bool:
                return key_status(editor, legacy_id) == "revoked"

            # the relay writes the key's use within a second and retires the password then;
            # it runs on this event loop, so the wait yields to it between looks
            await wait_until(retired, timeout=10, what="the converted password retired")
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                await asyncio.to_thread(site.try_login, address, PASSWORD)
            assert (refused.value.smtp_code, refused.value.smtp_error) == (535, RETIRED)

            page = editor.get(f"/keys/{legacy_id}").text
            assert shown(page, "legacy-replacement") == f"Thunderbird {key_id} active"
            assert 'id="convert"' not in page
            mailbox_page = editor.get(f"/mailboxes/{address}").text
            assert 'id="legacy-password"' not in mailbox_page
            assert shown(mailbox_page, "mailbox-legacy") == "none"
            trail = editor.get("/audit", params={"key": legacy_id}).text
            assert re.search(r"<td>token:acme-admin \(\w+\)</td><td>legacy.convert</td>", trail)
            assert "<td>relay</td><td>legacy.retire</td>" in trail
    assert [m.mail_from for m in sink.messages] == [address, address]
