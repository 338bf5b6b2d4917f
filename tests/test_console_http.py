"""The web console over plain HTTP (httpx against `keystore serve` as a real process): the
headers every page carries, the session cookie, sessions that end with their token, CSRF,
roles, and the refusals a person sees. The browser flows are in test_console_browser.py."""

from __future__ import annotations

import json
import re
import sqlite3
import time

import httpx
import pytest

from keystore.http.app import create_app
from keystore.http.console import session as session_module
from keystore.http.site import Site
from keystore.service import AdminService
from keystore.store import KeyStore
from tests.support.consolesite import (
    ConsoleSite,
    console_site,
    csrf_of,
    post_login,
    refusal_of,
    session_cookie,
)
from tests.support.procs import keystore_cli
from tests.support.waiting import wait_until

CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with console_site(tmp_path_factory.mktemp("console-http")) as running:
        yield running


def new_key(client: httpx.Client, mailbox: str, name: str, **fields: str) -> tuple[str, str]:
    """Create a key through the form: (key id, secret) as the result page shows them."""
    form = client.get("/keys/new", params={"mailbox": mailbox})
    assert form.status_code == 200, form.text
    reply = client.post("/keys/new", data={"csrf": csrf_of(form.text), "mailbox": mailbox, "name": name,
                                           "permissions": "email.send", **fields})
    assert reply.status_code == 303, reply.text
    key_id = reply.headers["location"].split("/")[2]
    shown = client.get(reply.headers["location"])
    secret = re.search(r'id="secret"[^>]*>([^<]+)<', shown.text).group(1)
    return key_id, secret


def key_status(client: httpx.Client, key_id: str) -> str:
    page = client.get(f"/keys/{key_id}")
    assert page.status_code == 200, page.text
    return re.search(r'<h1>.*?class="status status-(\w+)"', page.text, re.S).group(1)


def test_every_console_page_carries_the_strict_csp_and_no_store(site: ConsoleSite):
    with site.login("owner") as client:
        key_id, _ = new_key(client, "alice@acme.example", "headers check")
        for path in ("/login", "/", "/workspaces/acme", "/mailboxes/alice@acme.example", "/keys",
                     f"/keys/{key_id}", "/audit", "/no/such/page"):
            reply = client.get(path)
            assert reply.headers["content-security-policy"] == CSP, path
            assert reply.headers["x-content-type-options"] == "nosniff", path
            assert reply.headers["referrer-policy"] == "no-referrer", path
            assert reply.headers["cache-control"] == "no-store", path
        # the page with the secret: rendered once, never cached
        form = client.get(f"/keys/{key_id}")
        rotated = client.post(f"/keys/{key_id}/rotate", data={"csrf": csrf_of(form.text), "grace": "0"})
        shown = client.get(rotated.headers["location"])
        assert 'id="secret"' in shown.text
        assert shown.headers["cache-control"] == "no-store"
        assert shown.headers["content-security-policy"] == CSP
        # nothing inline for the CSP to block: no <script> without src, no style attributes
        for html in (shown.text, client.get(f"/keys/{key_id}").text):
            assert not re.search(r"<script(?![^>]*\bsrc=)", html)
            assert "style=" not in html and "<style" not in html
            assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
        css = client.get("/static/console.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert css.headers["x-content-type-options"] == "nosniff"
    # the API keeps its own headers: JSON, no console CSP
    api = httpx.get(site.server.api("/workspaces"), headers=site.tokens["owner"].headers)
    assert api.status_code == 200 and "content-security-policy" not in api.headers


def test_session_cookie_is_httponly_samesite_strict_and_not_secure_on_loopback_http(site: ConsoleSite):
    with site.client() as client:
        reply = post_login(client, site.tokens["viewer"].secret)
    assert reply.status_code == 303 and reply.headers["location"] == "/"
    parts = session_cookie(reply)
    assert len(parts[0]) > len("keystore_session=") + 40  # a long random id
    assert "HttpOnly" in parts and "SameSite=Strict" in parts and "Path=/" in parts
    assert "Max-Age=3600" in parts  # [admin] session_ttl = "1h"
    assert "Secure" not in parts  # plain HTTP on loopback: a Secure cookie would never come back
    assert site.tokens["viewer"].secret not in str(reply.headers)


async def test_secure_cookie_when_the_site_is_served_over_https(tmp_path):
    """secure_cookies (set by serve.py when it serves HTTPS) adds Secure; and a session
    ends after session_ttl."""
    store = await KeyStore.open(tmp_path / "k.db", tmp_path / "pepper", create=True)
    try:
        _, token = await store.create_token(name="ops", role="owner", actor="test")
        site = Site("relay.test", 587, 465, secure_cookies=True, session_ttl=0.5)
        app = create_app(AdminService(store), site)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="https://console.test") as client:
            form = await client.get("/login")
            reply = await client.post("/login", data={"csrf": csrf_of(form.text), "token": token})
            assert "Secure" in session_cookie(reply)
            assert (await client.get("/")).status_code == 200

            async def logged_out() -> bool:
                return (await client.get("/")).status_code != 200

            await wait_until(logged_out, 5, "the session to end at its session_ttl")
            assert (await client.get("/")).headers["location"] == "/login"
    finally:
        await store.close()


def test_revoking_the_token_ends_its_console_sessions(site: ConsoleSite):
    token = keystore_cli(site.config, "admin-token", "create", "--name", "leaver", "--role", "owner",
                         "--json")
    assert token.returncode == 0, token.stderr
    created = json.loads(token.stdout)
    with site.login(site.tokens["owner"]) as other, site.client() as client:
        assert post_login(client, created["secret"]).status_code == 303
        assert client.get("/").status_code == 200
        revoked = keystore_cli(site.config, "admin-token", "revoke", created["id"])
        assert revoked.returncode == 0, revoked.stderr
        after = client.get("/")
        assert after.status_code == 303 and after.headers["location"] == "/login"
        assert client.get("/keys").status_code == 303  # the session is gone, not just one page
        assert other.get("/").status_code == 200  # other tokens' sessions go on


def test_post_without_or_with_a_wrong_csrf_token_is_refused_and_changes_nothing(site: ConsoleSite):
    with site.login("owner") as client, site.login("editor") as other:
        key_id, _ = new_key(client, "alice@acme.example", "csrf target")
        other_token = csrf_of(other.get("/").text)
        for data in ({}, {"csrf": ""}, {"csrf": "x" * 43}, {"csrf": other_token}):
            reply = client.post(f"/keys/{key_id}/disable", data=data)
            assert reply.status_code == 403, data
            assert "CSRF" in refusal_of(reply.text)
        assert key_status(client, key_id) == "active"
        reply = client.post(f"/keys/{key_id}/delete", data={"confirm": "csrf target"})
        assert reply.status_code == 403
        assert client.get(f"/keys/{key_id}").status_code == 200
        # the login form too: no cookie-and-field pair, no login
        with site.client() as fresh:
            assert fresh.post("/login", data={"token": site.tokens["owner"].secret}).status_code == 403


def test_a_viewer_sees_no_write_buttons_and_its_posts_are_refused(site: ConsoleSite):
    with site.login("owner") as owner:
        key_id, _ = new_key(owner, "carol@acme.example", "viewer target")
    with site.login("viewer") as viewer:
        page = viewer.get(f"/keys/{key_id}")
        assert page.status_code == 200
        assert "/disable" not in page.text and "/revoke" not in page.text and "/delete" not in page.text
        assert "New key" not in viewer.get("/mailboxes/carol@acme.example").text
        token = csrf_of(page.text)  # the logout form's: a valid token of this session
        for action, data in (("disable", {}), ("revoke", {}), ("rotate", {"grace": "0"}),
                             ("delete", {"confirm": "viewer target"}), ("edit", {"owner": "mallory"})):
            reply = viewer.post(f"/keys/{key_id}/{action}", data={"csrf": token, **data})
            assert reply.status_code == 403, action
            assert "needs the editor role; this is viewer" in refusal_of(reply.text)
        reply = viewer.post("/workspaces/acme/suspend", data={"csrf": token})
        assert reply.status_code == 403
        assert viewer.get("/keys/new", params={"mailbox": "carol@acme.example"}).status_code == 403
        for form in ("edit", "revoke"):  # nor the forms of the writes: they would only be refused
            reply = viewer.get(f"/keys/{key_id}/{form}")
            assert reply.status_code == 403, form
            assert "needs the editor role; this is viewer" in refusal_of(reply.text)
    with site.login("owner") as owner:
        assert key_status(owner, key_id) == "active"
        assert "Suspend" in owner.get("/").text


def test_an_editor_of_one_workspace_does_not_see_another(site: ConsoleSite):
    with site.login("editor") as editor:
        assert editor.get("/mailboxes/dave@other.example").status_code == 404
        assert "other" not in re.findall(r'href="/workspaces/([^"]+)"', editor.get("/").text)
        form = editor.get("/").text
        reply = editor.post("/keys/new", data={"csrf": csrf_of(form), "mailbox": "dave@other.example",
                                               "name": "sneaky", "permissions": "email.send"})
        assert reply.status_code == 404
        assert "unknown mailbox" in refusal_of(reply.text)


def test_delete_needs_the_key_name_typed(site: ConsoleSite):
    with site.login("editor") as client:
        key_id, _ = new_key(client, "alice@acme.example", "Old CRM")
        token = csrf_of(client.get(f"/keys/{key_id}").text)
        for typed in ("", "old crm", "Old CRM2", key_id):
            reply = client.post(f"/keys/{key_id}/delete", data={"csrf": token, "confirm": typed})
            assert reply.status_code == 400, typed
            assert refusal_of(reply.text) == "confirmation did not match the key's name; nothing deleted"
            assert client.get(f"/keys/{key_id}").status_code == 200
        reply = client.post(f"/keys/{key_id}/delete", data={"csrf": token, "confirm": "Old CRM"})
        assert reply.status_code == 303 and reply.headers["location"] == "/mailboxes/alice@acme.example"
        assert f"Key &#39;Old CRM&#39; ({key_id}) deleted." in client.get(reply.headers["location"]).text
        gone = client.get(f"/keys/{key_id}")
        assert gone.status_code == 404 and refusal_of(gone.text) == f"unknown key: {key_id}"


def test_the_secret_is_shown_once(site: ConsoleSite):
    with site.login("owner") as client:
        key_id, secret = new_key(client, "alice@acme.example", "once")
        assert secret.startswith(f"rak_{key_id}_")
        again = client.get(f"/keys/{key_id}/secret")
        assert again.status_code == 303 and again.headers["location"] == f"/keys/{key_id}"
        page = client.get(f"/keys/{key_id}").text
        assert "shown once only" in page and secret not in page


def test_refusals_show_on_the_form_with_a_4xx(site: ConsoleSite):
    with site.login("owner") as client:
        form = client.get("/keys/new", params={"mailbox": "carol@acme.example"})
        bad = {"csrf": csrf_of(form.text), "mailbox": "carol@acme.example", "name": "bad nets",
               "permissions": "email.send", "allow_from": "10.0.0.1/8", "note": "kept <b>as typed</b>"}
        reply = client.post("/keys/new", data=bad)
        assert reply.status_code == 400
        assert "'10.0.0.1/8' is not a network" in refusal_of(reply.text)
        assert "kept &lt;b&gt;as typed&lt;/b&gt;" in reply.text  # the form keeps what was typed, escaped
        reply = client.post("/keys/new", data={**bad, "allow_from": "", "expires": "2001-01-01"})
        assert reply.status_code == 400 and refusal_of(reply.text) == "expiry is in the past"
        # a suspended mailbox takes no new key: 409, and the reason
        mailbox = client.get("/mailboxes/carol@acme.example")
        assert client.post("/mailboxes/carol@acme.example/suspend",
                           data={"csrf": csrf_of(mailbox.text), "reason": "audit"}).status_code == 303
        reply = client.post("/keys/new", data={**bad, "allow_from": ""})
        assert reply.status_code == 409
        assert refusal_of(reply.text) == ("mailbox carol@acme.example is suspended; "
                                          "resume it before creating keys for it")
        assert client.post("/mailboxes/carol@acme.example/resume",
                           data={"csrf": csrf_of(mailbox.text)}).status_code == 303


def test_numbers_and_times_past_what_the_keystore_holds_are_refused_and_break_no_page(site: ConsoleSite):
    """A rate limit past 64 bits was a 500; a grace of 9...9 days (infinite once a float)
    was stored, and from then on the key's page was a 500. A time the keystore holds
    past the year 9999 (the CLI takes any --grace) shows as the latest there is."""
    with site.login("owner") as client:
        key_id, _ = new_key(client, "alice@acme.example", "bounds")
        token = csrf_of(client.get(f"/keys/{key_id}").text)
        form = client.get("/keys/new", params={"mailbox": "alice@acme.example"})
        reply = client.post("/keys/new", data={"csrf": csrf_of(form.text), "mailbox": "alice@acme.example",
                                               "name": "huge", "permissions": "email.send",
                                               "rate_limit": "9" * 40})
        assert reply.status_code == 400 and "rate limit" in refusal_of(reply.text)
        reply = client.post(f"/keys/{key_id}/edit", data={"csrf": token, "rate_limit": "\N{SUPERSCRIPT TWO}"})
        assert reply.status_code == 400 and "rate limit" in refusal_of(reply.text)  # a digit int() refuses
        reply = client.post(f"/keys/{key_id}/rotate", data={"csrf": token, "grace": "9" * 400 + "d"})
        assert reply.status_code == 400 and "grace: at most" in refusal_of(reply.text)
        page = client.get(f"/keys/{key_id}")
        assert page.status_code == 200 and "Rotated</dt><dd>never" in page.text
        with sqlite3.connect(site.folder / "keystore.db") as db:
            db.execute("UPDATE auth_key SET prev_valid_until = ?, expires = ? WHERE id = ?",
                       (1e30, 1e30, key_id))
        page = client.get(f"/keys/{key_id}")
        assert page.status_code == 200 and "9999-12-31 23:59 UTC" in page.text
        assert client.get(f"/keys/{key_id}/edit").status_code == 200
        assert client.get("/mailboxes/alice@acme.example").status_code == 200


def test_one_token_logging_in_over_and_over_does_not_push_out_other_tokens_sessions(monkeypatch):
    """Sessions are capped (the oldest go first past the cap): any token, a viewer's too,
    could log in that many times and so log every owner out. Each token now only pushes
    out its own oldest sessions."""
    monkeypatch.setattr(session_module, "MAX_SESSIONS", 40)  # 10 000 logins otherwise
    sessions = session_module.SessionStore(ttl=3600)
    owner = sessions.create("owner-token")
    viewer = [sessions.create("viewer-token") for _ in range(100)]
    assert sessions.get(owner.id) is owner
    assert sessions.get(viewer[-1].id) is viewer[-1]  # the newest of the busy token live on
    assert sessions.get(viewer[0].id) is None


def test_a_form_field_that_is_not_text_is_400(site: ConsoleSite):
    """A multipart form may name any charset for its fields; raw_unicode_escape turns
    `\\ud800` into a lone surrogate, which no database text holds (it was a 500)."""
    with site.login("owner") as client:
        token = csrf_of(client.get("/keys/new", params={"mailbox": "alice@acme.example"}).text)
        fields = {"csrf": token, "mailbox": "alice@acme.example", "name": "surrogate",
                  "permissions": "email.send", "note": "\\ud800"}
        body = b"".join(f'--B\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                        for name, value in fields.items()) + b"--B--\r\n"
        reply = client.post("/keys/new", content=body, headers={
            "Content-Type": "multipart/form-data; boundary=B; charset=raw_unicode_escape"})
        assert reply.status_code == 400
        assert refusal_of(reply.text) == "note: not text (a lone UTF-16 surrogate)"
        assert "surrogate" not in client.get("/mailboxes/alice@acme.example").text


def test_logging_in_again_ends_the_session_it_replaces(site: ConsoleSite):
    """The login form open in two tabs, both used: the browser keeps the second session's
    cookie, and the first session must not live on unseen in the server until its time is
    up (its cookie may have been copied)."""
    with site.client() as client:
        nonce = csrf_of(client.get("/login").text)
        owner, viewer = site.tokens["owner"].secret, site.tokens["viewer"].secret
        assert client.post("/login", data={"csrf": nonce, "token": owner}).status_code == 303
        first = client.cookies["keystore_session"]
        client.cookies.set("keystore_login", nonce)  # the other tab's form, as its cookie was
        assert client.post("/login", data={"csrf": nonce, "token": viewer}).status_code == 303
        assert client.cookies["keystore_session"] != first
        assert client.get("/").status_code == 200
    with site.client() as stale:
        stale.cookies.set("keystore_session", first)
        reply = stale.get("/")
        assert reply.status_code == 303 and reply.headers["location"] == "/login"


def test_edit_rotate_with_grace_end_grace_and_the_audit_trail(site: ConsoleSite):
    owner = site.tokens["owner"]
    with site.login(owner) as client:
        key_id, first = new_key(client, "alice@acme.example", "Billing", owner="pat", note="invoices")
        token = csrf_of(client.get(f"/keys/{key_id}").text)
        reply = client.post(f"/keys/{key_id}/edit", data={
            "csrf": token, "owner": "sam", "note": "invoices", "route": "", "rate_limit": "30",
            "expires": "", "allow_from": "192.0.2.0/24\n2001:db8::/48"})
        assert reply.status_code == 303
        page = client.get(f"/keys/{key_id}").text
        assert "Key saved: owner, rate limit, allow from." in page
        assert "192.0.2.0/24, 2001:db8::/48" in page and "30 messages per minute" in page
        rotated = client.post(f"/keys/{key_id}/rotate", data={"csrf": token, "grace": "1h"})
        shown = client.get(rotated.headers["location"]).text
        second = re.search(r'id="secret"[^>]*>([^<]+)<', shown).group(1)
        assert second != first and "The previous secret keeps working until" in shown
        assert "/end-grace" in client.get(f"/keys/{key_id}").text
        ended = client.post(f"/keys/{key_id}/end-grace", data={"csrf": token})
        assert ended.status_code == 303
        page = client.get(f"/keys/{key_id}").text
        assert "the previous secret no longer works" in page and "/end-grace" not in page
        again = client.post(f"/keys/{key_id}/end-grace", data={"csrf": token})
        assert again.status_code == 409 and "has no rotation grace running" in refusal_of(again.text)
        trail = client.get("/audit", params={"key": key_id}).text
        for action in ("key.create", "key.update", "key.rotate", "key.end_grace"):
            assert action in trail
        assert f"token:ops ({owner.id})" in trail


def test_failed_logins_are_refused_alike_then_throttled(site: ConsoleSite):
    with site.client() as client:
        statuses = []
        for attempt in ("rat_nonsense", site.tokens["owner"].secret[:-1] + "x", "", "rat_x", "rat_y"):
            form = client.get("/login")
            reply = client.post("/login", data={"csrf": csrf_of(form.text), "token": attempt})
            statuses.append(reply.status_code)
            if reply.status_code == 401:
                assert refusal_of(reply.text) == "That admin token was not accepted."
            if reply.status_code == 429:
                assert int(reply.headers["retry-after"]) >= 1
                assert "Too many failed logins" in refusal_of(reply.text)
                break
        assert statuses[0] == 401 and statuses[-1] == 429, statuses


def age_key(site: ConsoleSite, key_id: str, *, days: float, rotated_days: float | None = None) -> None:
    """Make a key look `days` old (created then, never used since): waiting 30 days for the
    badge is not an option, and the keystore has no other way to have an old key."""
    now = time.time()
    with sqlite3.connect(site.folder / "keystore.db") as db:
        db.execute("UPDATE auth_key SET created = ?, last_used = NULL, rotated = ? WHERE id = ?",
                   (now - days * 86400, None if rotated_days is None else now - rotated_days * 86400, key_id))


def badges_of(html: str, key_id: str) -> list[str]:
    row = re.search(rf'<tr data-key-id="{key_id}">(.*?)</tr>', html, re.S)
    assert row, f"key {key_id} is not listed"
    return re.findall(r'class="badge [^"]*">([^<]+)<', row.group(1))


def test_key_lists_badge_unused_and_rotation_due_keys_and_report_them(site: ConsoleSite):
    with site.login("owner") as client:
        fresh, _ = new_key(client, "alice@acme.example", "fresh")
        idle, _ = new_key(client, "alice@acme.example", "idle")
        ancient, _ = new_key(client, "alice@acme.example", "ancient")
        rotated, _ = new_key(client, "alice@acme.example", "old but rotated")
        age_key(site, idle, days=45)
        age_key(site, ancient, days=120)
        age_key(site, rotated, days=120, rotated_days=10)
        page = client.get("/mailboxes/alice@acme.example").text
        assert badges_of(page, fresh) == []
        assert badges_of(page, idle) == ["unused"]
        assert badges_of(page, ancient) == ["unused", "rotation due"]
        assert badges_of(page, rotated) == ["unused"]
        unused = client.get("/keys", params={"report": "unused"}).text
        assert {idle, ancient, rotated} <= set(re.findall(r'data-key-id="(\w+)"', unused))
        assert fresh not in unused
        due = client.get("/keys", params={"report": "rotation"}).text
        assert ancient in due and rotated not in due and idle not in due
        # a disabled key is not nagged about
        token = csrf_of(page)
        assert client.post(f"/keys/{ancient}/disable", data={"csrf": token}).status_code == 303
        assert badges_of(client.get("/mailboxes/alice@acme.example").text, ancient) == []
        # nor is an expired one (it cannot log in), as the reports leave it out
        with sqlite3.connect(site.folder / "keystore.db") as db:
            db.execute("UPDATE auth_key SET expires = ? WHERE id = ?", (time.time() - 60, idle))
        assert badges_of(client.get("/mailboxes/alice@acme.example").text, idle) == []
        assert idle not in client.get("/keys", params={"report": "unused"}).text


def test_search_by_name_owner_workspace_and_note(site: ConsoleSite):
    with site.login("owner") as client:
        crm, _ = new_key(client, "alice@acme.example", "Zebra CRM", owner="Quentin", note="the yak account")
        other, _ = new_key(client, "dave@other.example", "Zebra backup")

        def found(**params: str) -> set[str]:
            reply = client.get("/keys", params=params)
            assert reply.status_code == 200
            return set(re.findall(r'data-key-id="(\w+)"', reply.text))

        assert found(q="zebra") >= {crm, other}
        assert crm in found(q="quentin") and other not in found(q="quentin")
        assert crm in found(q="YAK") and other not in found(q="yak")
        assert found(q="zebra", workspace="other") == {other}
        assert crm in found(owner="quentin")
        assert found(q="no such thing anywhere") == set()


def test_a_mailbox_page_lists_every_key_able_to_send_as_it(site: ConsoleSite):
    with site.login("owner") as client:
        own, _ = new_key(client, "carol@acme.example", "carol's own")
        form = client.get("/keys/new", params={"workspace": "acme"})
        assert "New key for workspace acme" in form.text
        reply = client.post("/keys/new", data={"csrf": csrf_of(form.text), "workspace": "acme",
                                               "name": "acme-wide", "permissions": "email.send"})
        assert reply.status_code == 303
        workspace_key = reply.headers["location"].split("/")[2]
        shown = client.get(reply.headers["location"]).text
        assert "any active mailbox of workspace acme" in shown and "carol@acme.example" in shown
        page = client.get("/mailboxes/carol@acme.example").text
        listed = set(re.findall(r'data-key-id="(\w+)"', page))
        assert {own, workspace_key} <= listed
        assert workspace_key in client.get("/workspaces/acme").text
        assert workspace_key not in client.get("/mailboxes/dave@other.example").text


def test_an_owner_suspends_and_resumes_a_workspace(site: ConsoleSite):
    with site.login("owner") as client:
        token = csrf_of(client.get("/").text)
        reply = client.post("/workspaces/other/suspend", data={"csrf": token, "reason": "unpaid"})
        assert reply.status_code == 303
        page = client.get("/").text
        assert "Workspace other suspended: every key of it is refused at login." in page
        assert "/workspaces/other/resume" in page and "unpaid" in page
        again = client.post("/workspaces/other/suspend", data={"csrf": token})
        assert again.status_code == 409 and refusal_of(again.text) == "workspace other is already suspended"
        assert client.post("/workspaces/other/resume", data={"csrf": token}).status_code == 303
        assert "/workspaces/other/suspend" in client.get("/").text
    with site.login("editor") as editor:
        reply = editor.post("/workspaces/acme/suspend", data={"csrf": csrf_of(editor.get("/").text)})
        assert reply.status_code == 403
        assert refusal_of(reply.text) == "suspending a workspace needs the owner role; this is editor"


def test_log_out_ends_the_session(site: ConsoleSite):
    with site.login("viewer") as client:
        token = csrf_of(client.get("/").text)
        assert client.get("/login").headers["location"] == "/"  # logged in: no form
        assert client.post("/logout", data={}).status_code == 403  # logging out is a form too
        reply = client.post("/logout", data={"csrf": token})
        assert reply.status_code == 303 and reply.headers["location"] == "/login"
        assert "Max-Age=0" in session_cookie(reply)
        assert client.get("/").headers["location"] == "/login"
