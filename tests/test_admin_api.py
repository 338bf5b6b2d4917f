"""The admin HTTP API (`keystore serve`, /api/v1/) against the real server process, with a
real HTTP client: every operation, every role boundary, bad input, unknown ids, the audit
actor, the token throttle, and keys made and revoked over HTTP as an SMTP client meets
them. One server for most of the module (its keystore is shared: each test uses names of
its own); tests that need another config start their own."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import sqlite3
import ssl
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosmtplib
import httpx
import psycopg
import pytest

from keystore import keys
from keystore.http.app import create_app
from keystore.http.site import Site
from keystore.pg import to_pg
from keystore.service import AdminService
from keystore.store import KeyStore
from relay.config import ConfigError, load_config
from tests.support.adminserver import AdminServer, Token, admin_server, create_token, start_admin_server
from tests.support.keystores import BACKENDS, KeystorePlace
from tests.support.procs import free_port, keystore_cli
from tests.support.relayrun import write_config
from tests.support.waiting import wait_until

THROTTLE = "max_failures = 3\nmax_failures_per_address = 6"
PATHS = [
    "/api/v1/me", "/api/v1/workspaces", "/api/v1/workspaces/{name}", "/api/v1/workspaces/{name}/suspend",
    "/api/v1/workspaces/{name}/resume", "/api/v1/mailboxes", "/api/v1/mailboxes/{address}",
    "/api/v1/mailboxes/{address}/suspend", "/api/v1/mailboxes/{address}/resume", "/api/v1/keys",
    "/api/v1/keys/revoke", "/api/v1/keys/{key_id}", "/api/v1/keys/{key_id}/disable",
    "/api/v1/keys/{key_id}/enable", "/api/v1/keys/{key_id}/revoke", "/api/v1/keys/{key_id}/rotate",
    "/api/v1/keys/{key_id}/end-grace", "/api/v1/audit", "/api/v1/admin-tokens",
    "/api/v1/admin-tokens/{token_id}", "/api/v1/admin-tokens/{token_id}/revoke",
    "/api/v1/legacy", "/api/v1/legacy/expire", "/api/v1/mailboxes/{address}/legacy/convert",
]


@pytest.fixture(scope="module", params=BACKENDS)
def place(request, tmp_path_factory) -> KeystorePlace:
    """The API's keystore: every test of the running server runs on sqlite, then on
    PostgreSQL (a database for the module)."""
    folder = tmp_path_factory.mktemp("admin")
    if request.param == "sqlite":
        return KeystorePlace(folder)
    server = request.getfixturevalue("postgres_server")
    return KeystorePlace(folder, server.create_database(f"admin_{uuid.uuid4().hex[:12]}"))


@pytest.fixture(scope="module")
def folder(place) -> Path:
    config = write_config(place.folder, free_port(), auth=THROTTLE)
    assert KeystorePlace(place.folder).config_lines() in config.read_text()
    config.write_text(config.read_text().replace(KeystorePlace(place.folder).config_lines(),
                                                 place.config_lines()))
    assert keystore_cli(config, "init").returncode == 0
    return place.folder


def write_behind_the_api(place: KeystorePlace, sql: str, params: tuple) -> None:
    """A change no keystore version makes (a stand-in for a bug or an older release's data),
    straight into the database."""
    if place.url is None:
        with contextlib.closing(sqlite3.connect(place.folder / "keystore.db")) as db, db:
            db.execute(sql, params)
    else:
        with psycopg.connect(place.url, autocommit=True) as db:
            db.execute(to_pg(sql), params)


@pytest.fixture(scope="module")
def server(folder):
    with admin_server(folder / "relay.toml") as running:
        yield running


@pytest.fixture(scope="module")
def owner(folder) -> Token:
    return create_token(folder / "relay.toml", "root", "owner")


def client(server: AdminServer, token: Token | None = None, *, source: str = "127.0.0.1") -> httpx.Client:
    """A client from `source` (any 127/8 address reaches the server: the throttle counts per
    client address, so tests that fail logins on purpose use one of their own)."""
    return httpx.Client(base_url=server.api(), headers=token.headers if token else {}, timeout=10,
                        transport=httpx.HTTPTransport(local_address=source))


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def error(response: httpx.Response, status: int, code: str) -> str:
    """The error's message, after checking the status and the stable code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]["message"]


def ok(response: httpx.Response, status: int = 200) -> dict:
    assert response.status_code == status, response.text
    return response.json()


def mailbox(api: httpx.Client, workspace: str) -> str:
    address = f"{unique('m')}@example.com"
    ok(api.post("/mailboxes", json={"address": address, "workspace": workspace}), 201)
    return address


def new_key(api: httpx.Client, address: str, **fields) -> dict:
    return ok(api.post("/keys", json={"name": unique("key"), "mailbox": address, **fields}), 201)


def token(api: httpx.Client, role: str, *workspaces: str) -> Token:
    created = ok(api.post("/admin-tokens", json={"name": unique(role), "role": role,
                                                   "workspaces": list(workspaces)}), 201)
    return Token(created["token"]["id"], created["token"]["name"], created["secret"])


# ------------------------------------------------------------ the document


def test_the_openapi_document_is_served_and_lists_every_operation(server):
    doc = ok(httpx.get(server.api("/openapi.json")))
    assert sorted(doc["paths"]) == sorted(PATHS)
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    # request bodies refuse unknown fields, and say so in the document
    assert doc["components"]["schemas"]["KeyIn"]["additionalProperties"] is False
    assert doc["components"]["schemas"]["KeyOut"]["properties"]["created"]["format"] == "date-time"
    refusals = doc["paths"]["/api/v1/keys"]["post"]["responses"]
    assert {"201", "400", "401", "403", "404", "409", "429"} <= set(refusals)
    schema = refusals["403"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ErrorOut"}
    assert httpx.get(server.url + "docs").status_code == 404  # no Swagger UI from a CDN


# --------------------------------------------------------- authentication


def test_no_token_a_bad_token_and_a_revoked_token_are_refused_alike(server, owner):
    with client(server, owner) as api:
        revoked = token(api, "viewer")
        ok(api.post(f"/admin-tokens/{revoked.id}/revoke"))
    unknown = keys.format_key(keys.generate_key_id(), keys.generate_secret(), keys.TOKEN_PREFIX)
    wrong = keys.format_key(owner.id, keys.generate_secret(), keys.TOKEN_PREFIX)
    with client(server, source="127.0.0.2") as anonymous:
        response = anonymous.get("/keys")
        assert "needs an admin token" in error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == 'Bearer realm="keystore"'
        messages = set()
        for presented in ("nonsense", unknown, wrong, revoked.secret, owner.secret.lower()):
            response = anonymous.get("/keys", headers={"Authorization": f"Bearer {presented}"})
            messages.add(error(response, 401, "unauthorized"))
            assert 'error="invalid_token"' in response.headers["www-authenticate"]
        assert messages == {"invalid admin token"}  # nothing tells which part was wrong
        response = anonymous.get("/keys", headers={"Authorization": f"Basic {owner.secret}"})
        error(response, 401, "unauthorized")


def test_failed_token_logins_are_throttled_per_address_as_smtp_auth_is(server, owner):
    """[auth] max_failures = 3, max_failures_per_address = 6: a token that failed 3 times
    from an address gets 429 there without being checked; past 6 failures from the address,
    each other token gets one check there; the owner's token still gets in from that address
    (an owner behind the same NAT as a guesser), as a valid key does at SMTP AUTH."""
    guess = keys.format_key(keys.generate_key_id(), keys.generate_secret(), keys.TOKEN_PREFIX)
    with client(server, source="127.0.0.3") as there, client(server, owner, source="127.0.0.3") as me:
        for presented in ("garbage", guess):  # anything malformed counts as one token
            headers = {"Authorization": f"Bearer {presented}"}
            for _ in range(3):
                error(there.get("/keys", headers=headers), 401, "unauthorized")
            response = there.get("/keys", headers=headers)
            assert "too many failed" in error(response, 429, "throttled")
            assert 1 <= int(response.headers["retry-after"]) <= 300
        assert ok(me.get("/me"))["actor"] == owner.actor
        fresh = keys.format_key(keys.generate_key_id(), keys.generate_secret(), keys.TOKEN_PREFIX)
        another = {"Authorization": f"Bearer {fresh}"}
        error(there.get("/keys", headers=another), 401, "unauthorized")  # one check, answered slowly
        error(there.get("/keys", headers=another), 429, "throttled")
        assert ok(me.get("/me"))["actor"] == owner.actor
    with client(server, source="127.0.0.4") as elsewhere:  # another address has its own budget
        error(elsewhere.get("/keys", headers={"Authorization": f"Bearer {guess}"}), 401, "unauthorized")


# -------------------------------------------------------------- operations


def test_an_owner_manages_mailboxes_and_workspaces(server, owner):
    workspace = unique("ws")
    with client(server, owner) as api:
        address = mailbox(api, workspace)
        assert ok(api.get(f"/mailboxes/{address}"))["workspace"] == workspace
        listed = ok(api.get("/mailboxes", params={"workspace": workspace}))["mailboxes"]
        assert [m["address"] for m in listed] == [address]
        assert workspace in [w["name"] for w in ok(api.get("/workspaces"))["workspaces"]]
        assert ok(api.patch(f"/workspaces/{workspace}", json={"key_limit": 7}))["key_limit"] == 7
        assert ok(api.get(f"/workspaces/{workspace}"))["key_limit"] == 7

        new_key(api, address)
        suspended = ok(api.post(f"/workspaces/{workspace}/suspend", json={"reason": "unpaid"}))
        assert suspended["workspace"]["status"] == "suspended"
        assert suspended["workspace"]["suspended_reason"] == "unpaid"
        assert suspended["mailbox_keys"] == 1
        refused = api.post("/keys", json={"name": "x", "mailbox": address})
        assert "suspended" in error(refused, 409, "conflict")
        error(api.post(f"/workspaces/{workspace}/suspend"), 409, "conflict")
        assert ok(api.post(f"/workspaces/{workspace}/resume"))["workspace"]["status"] == "active"

        assert ok(api.post(f"/mailboxes/{address}/suspend", json={"reason": "left"}))["status"] == "suspended"
        assert ok(api.post(f"/mailboxes/{address}/resume"))["status"] == "active"
        assert "force" in error(api.delete(f"/mailboxes/{address}"), 409, "conflict")
        assert ok(api.delete(f"/mailboxes/{address}", params={"force": "true"}))["keys_deleted"] == 1
        error(api.get(f"/mailboxes/{address}"), 404, "not_found")


def test_an_owner_runs_a_keys_whole_life(server, owner):
    with client(server, owner) as api:
        address = mailbox(api, unique("ws"))
        created = new_key(api, address, owner="ana", note="CRM", rate_limit=30,
                          allow_from=["192.0.2.0/24"], expires="2099-01-01T00:00:00Z")
        key, key_id = created["key"], created["key"]["id"]
        assert created["secret"].startswith(f"rak_{key_id}_")
        assert created["smtp"] == {"host": "relay.test", "starttls_port": None, "tls_port": None,
                                   "username": address}  # the test config listens on port 0
        assert (key["owner"], key["note"], key["rate_limit"], key["allow_from"], key["expires"]) == (
            "ana", "CRM", 30, ["192.0.2.0/24"], "2099-01-01T00:00:00Z")
        assert ok(api.get(f"/keys/{key_id}")) == key
        assert "secret" not in json.dumps(ok(api.get(f"/keys/{key_id}")))

        changed = ok(api.patch(f"/keys/{key_id}", json={"rate_limit": 5, "note": None, "allow_from": None,
                                                          "expires": None, "owner": "bo"}))
        assert (changed["rate_limit"], changed["note"], changed["allow_from"], changed["expires"],
                changed["owner"], changed["name"]) == (5, None, [], None, "bo", key["name"])

        assert ok(api.post(f"/keys/{key_id}/disable"))["status"] == "disabled"
        assert ok(api.post(f"/keys/{key_id}/enable"))["status"] == "active"
        rotated = ok(api.post(f"/keys/{key_id}/rotate", json={"grace": "1h"}))
        assert rotated["secret"] != created["secret"] and rotated["key"]["previous_valid_until"]
        assert ok(api.post(f"/keys/{key_id}/end-grace"))["previous_valid_until"] is None
        error(api.post(f"/keys/{key_id}/end-grace"), 409, "conflict")
        assert ok(api.post(f"/keys/{key_id}/rotate"))["key"]["previous_valid_until"] is None
        assert ok(api.post(f"/keys/{key_id}/revoke"))["status"] == "revoked"
        assert "revoked" in error(api.post(f"/keys/{key_id}/enable"), 409, "conflict")

        assert "confirm" in error(api.delete(f"/keys/{key_id}"), 400, "invalid")
        assert "did not match" in error(api.delete(f"/keys/{key_id}", params={"confirm": "nope"}),
                                        400, "invalid")
        assert ok(api.request("DELETE", f"/keys/{key_id}", json={"confirm": key["name"]}))["id"] == key_id
        error(api.get(f"/keys/{key_id}"), 404, "not_found")
        other = new_key(api, address)["key"]
        assert ok(api.delete(f"/keys/{other['id']}", params={"confirm": other["name"]}))["id"] == other["id"]


def test_keys_are_listed_by_every_filter_and_revoked_by_owner_or_mailbox(server, owner):
    workspace = unique("ws")
    with client(server, owner) as api:
        first, second = mailbox(api, workspace), mailbox(api, workspace)
        mine = new_key(api, first, owner="Contractor", note="nightly export")["key"]
        theirs = new_key(api, second, owner="contractor")["key"]
        shared = ok(api.post("/keys", json={"name": "all", "workspace": workspace}), 201)
        assert shared["smtp"]["username"] is None  # a workspace key: any of its mailboxes
        shared = shared["key"]

        def ids(**params) -> set[str]:
            return {k["id"] for k in ok(api.get("/keys", params=params))["keys"]}

        assert ids(workspace=workspace) == {mine["id"], theirs["id"], shared["id"]}
        assert ids(mailbox=first) == {mine["id"], shared["id"]}  # every key able to send as it
        assert ids(search="NIGHTLY") == {mine["id"]}
        assert ids(workspace=workspace, owner="CONTRACTOR") == {mine["id"], theirs["id"]}
        assert ids(workspace=workspace, unused_for="30d") == set()
        assert ids(workspace=workspace, unused_for="0") == {mine["id"], theirs["id"], shared["id"]}
        assert ids(workspace=workspace, not_rotated_for="90") == set()
        ok(api.post(f"/keys/{theirs['id']}/disable"))
        assert ids(workspace=workspace, status="disabled") == {theirs["id"]}

        revoked = ok(api.post("/keys/revoke", json={"owner": "contractor"}))["keys"]
        assert {k["id"] for k in revoked} == {mine["id"], theirs["id"]}
        assert {k["status"] for k in revoked} == {"revoked"}
        error(api.post("/keys/revoke", json={"owner": "contractor"}), 404, "not_found")
        again = new_key(api, first)["key"]
        by_mailbox = ok(api.post("/keys/revoke", json={"mailbox": first}))["keys"]
        assert [k["id"] for k in by_mailbox] == [again["id"]]
        assert ok(api.get(f"/keys/{shared['id']}"))["status"] == "active"  # the workspace's key stays
        error(api.post("/keys/revoke", json={"owner": "x", "mailbox": first}), 400, "invalid")


def test_admin_tokens_are_created_listed_and_revoked_by_an_owner(server, owner):
    with client(server, owner) as api:
        made = ok(api.post("/admin-tokens", json={"name": "ci", "role": "viewer"}), 201)
        assert made["secret"].startswith(f"rat_{made['token']['id']}_")
        assert made["token"]["created_by"] == owner.actor
        assert made["token"]["id"] in [t["id"] for t in ok(api.get("/admin-tokens"))["tokens"]]
        assert ok(api.get(f"/admin-tokens/{made['token']['id']}"))["role"] == "viewer"
        assert ok(api.post(f"/admin-tokens/{made['token']['id']}/revoke"))["status"] == "revoked"
        error(api.post(f"/admin-tokens/{made['token']['id']}/revoke"), 409, "conflict")
        assert "secret" not in json.dumps(ok(api.get("/admin-tokens")))


def test_the_audit_trail_names_the_token_behind_each_http_change(server, owner):
    with client(server, owner) as api:
        before = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
        address = mailbox(api, unique("ws"))
        key_id = new_key(api, address)["key"]["id"]
        ok(api.post(f"/keys/{key_id}/disable"))
        events = ok(api.get("/audit", params={"key": key_id}))["events"]
        assert [(e["action"], e["actor"]) for e in events] == [
            ("key.create", owner.actor), ("key.disable", owner.actor)]
        assert owner.actor == f"token:root ({owner.id})"
        trail = ok(api.get("/audit", params={"mailbox": address, "since": before}))["events"]
        assert [e["action"] for e in trail] == ["mailbox.add", "key.create", "key.disable"]

        def actions(**params) -> list[str]:
            events = ok(api.get("/audit", params={"mailbox": address, **params}))["events"]
            return [e["action"] for e in events]

        assert actions(limit=1) == ["key.disable"]
        assert actions(since="2099-01-01T00:00:00Z") == []
        assert actions(since="1h") == ["mailbox.add", "key.create", "key.disable"]


# -------------------------------------------------------------------- roles


def test_a_viewer_reads_and_every_write_is_forbidden(server, owner):
    with client(server, owner) as api:
        address = mailbox(api, unique("ws"))
        key_id = new_key(api, address)["key"]["id"]
        viewer = token(api, "viewer")
    with client(server, viewer) as api:
        assert ok(api.get("/me")) == {"actor": viewer.actor, "role": "viewer", "workspaces": None}
        assert ok(api.get(f"/keys/{key_id}"))["id"] == key_id
        assert ok(api.get(f"/mailboxes/{address}"))["address"] == address
        ok(api.get("/audit", params={"key": key_id}))
        writes = [
            api.post("/keys", json={"name": "x", "mailbox": address}),
            api.patch(f"/keys/{key_id}", json={"note": "x"}),
            api.post(f"/keys/{key_id}/disable"),
            api.post(f"/keys/{key_id}/revoke"),
            api.post(f"/keys/{key_id}/rotate"),
            api.delete(f"/keys/{key_id}", params={"confirm": "x"}),
            api.post("/keys/revoke", json={"mailbox": address}),
            api.post("/mailboxes", json={"address": f"{unique()}@example.com", "workspace": "x"}),
            api.post(f"/mailboxes/{address}/suspend"),
            api.delete(f"/mailboxes/{address}"),
            api.get("/admin-tokens"),
        ]
        for response in writes:
            assert "role" in error(response, 403, "forbidden")
    with client(server, owner) as api:
        assert ok(api.get(f"/keys/{key_id}"))["status"] == "active"  # nothing changed


def test_an_editor_of_one_workspace_cannot_see_or_touch_another(server, owner):
    mine, other = unique("wa"), unique("wb")
    with client(server, owner) as api:
        my_mailbox, other_mailbox = mailbox(api, mine), mailbox(api, other)
        other_key = new_key(api, other_mailbox)["key"]["id"]
        editor = token(api, "editor", mine)
    with client(server, editor) as api:
        # its own workspace: keys and mailboxes
        key_id = new_key(api, my_mailbox)["key"]["id"]
        ok(api.patch(f"/keys/{key_id}", json={"note": "mine"}))
        second = mailbox(api, mine)
        ok(api.post(f"/mailboxes/{second}/suspend"))
        # the other: as if it did not exist
        error(api.get(f"/mailboxes/{other_mailbox}"), 404, "not_found")
        error(api.get(f"/keys/{other_key}"), 404, "not_found")
        error(api.post(f"/keys/{other_key}/revoke"), 404, "not_found")
        error(api.delete(f"/keys/{other_key}", params={"confirm": "x"}), 404, "not_found")
        error(api.post(f"/mailboxes/{other_mailbox}/suspend"), 404, "not_found")
        error(api.get(f"/workspaces/{other}"), 404, "not_found")
        error(api.post("/keys", json={"name": "x", "mailbox": other_mailbox}), 404, "not_found")
        error(api.get("/keys", params={"mailbox": other_mailbox}), 404, "not_found")
        assert other not in [w["name"] for w in ok(api.get("/workspaces"))["workspaces"]]
        assert {k["workspace"] for k in ok(api.get("/keys"))["keys"]} == {mine}
        assert {m["workspace"] for m in ok(api.get("/mailboxes"))["mailboxes"]} == {mine}
        assert {e["workspace"] for e in ok(api.get("/audit"))["events"]} == {mine}
        # nor create in it, nor do what only an owner does
        error(api.post("/keys", json={"name": "x", "workspace": other}), 403, "forbidden")
        error(api.post("/mailboxes", json={"address": f"{unique()}@example.com", "workspace": other}),
              403, "forbidden")
        error(api.post(f"/workspaces/{mine}/suspend"), 403, "forbidden")
        error(api.patch(f"/workspaces/{mine}", json={"key_limit": 1000}), 403, "forbidden")
        error(api.get("/admin-tokens"), 403, "forbidden")
        error(api.post("/admin-tokens", json={"name": "me2", "role": "owner"}), 403, "forbidden")
    with client(server, owner) as api:
        assert ok(api.get(f"/keys/{other_key}"))["status"] == "active"
        assert ok(api.get(f"/keys/{key_id}"))["note"] == "mine"


# ---------------------------------------------------------------- bad input


def test_bad_input_is_400_with_a_message_naming_the_problem(server, owner):
    with client(server, owner) as api:
        address = mailbox(api, unique("ws"))
        key_id = new_key(api, address)["key"]["id"]
        cases = [
            (api.post("/mailboxes", json={"address": "not an address", "workspace": "w"}),
             "invalid mailbox address"),
            (api.post("/keys", json={"name": "x", "mailbox": address, "allow_from": ["10.0.0.1/8"]}),
             "10.0.0.1/8"),
            (api.post("/keys", json={"name": "x", "mailbox": address, "rate_limit": -5}), "rate limit"),
            (api.patch(f"/keys/{key_id}", json={"rate_limit": 0}), "rate limit"),
            (api.patch(f"/keys/{key_id}", json={"allow_from": ["nonsense"]}), "nonsense"),
            (api.patch(f"/keys/{key_id}", json={"name": "renamed"}), "name: unknown field"),
            (api.patch(f"/keys/{key_id}", json={}), "nothing to change"),
            (api.post("/keys", json={"name": "x", "mailbox": address, "colour": "red"}),
             "colour: unknown field"),
            (api.post("/keys", json={"name": "x", "mailbox": address, "rate_limit": "lots"}), "rate_limit:"),
            (api.post("/keys", json={"name": "x", "mailbox": address, "rate_limit": True}), "rate_limit:"),
            (api.patch(f"/keys/{key_id}", json={"rate_limit": "5"}), "rate_limit:"),
            (api.post("/keys", json={"name": "x", "mailbox": address, "expires": "soon"}), "expires:"),
            (api.post("/keys", json={"name": "x", "mailbox": address, "expires": "2001-01-01T00:00:00Z"}),
             "expiry is in the past"),
            (api.post("/keys", json={"name": "x", "mailbox": address, "permissions": ["root"]}),
             "unknown permission"),
            (api.post("/keys", json={"name": "x"}), "exactly one mailbox or one workspace"),
            (api.post("/keys", content=b'{"name": "x", ', headers={"Content-Type": "application/json"}),
             "not valid JSON"),
            (api.post("/keys", data={"name": "x"}), "JSON object"),
            (api.post("/keys", json=["x"]), "JSON object"),
            (api.post(f"/keys/{key_id}/rotate", json={"grace": "forever"}), "grace: invalid duration"),
            (api.post(f"/keys/{key_id}/rotate", json={"grace": -1}), "grace"),
            (api.get("/keys", params={"unused_for": "a while"}), "unused_for: invalid duration"),
            (api.get("/keys", params={"status": "lost"}), "unknown status"),
            (api.get("/audit", params={"since": "yesterday"}), "since:"),
            (api.get("/audit", params={"limit": 0}), "limit (query parameter)"),
            (api.post("/admin-tokens", json={"name": "x", "role": "god"}), "role:"),
            (api.patch(f"/workspaces/{unique()}", json={"key_limit": "many"}), "key_limit:"),
        ]
        for response, words in cases:
            assert words in error(response, 400, "invalid"), response.request.url
        big = {"name": "x", "mailbox": address, "note": "x" * (2 << 20)}
        assert "over" in error(api.post("/keys", json=big), 413, "too_large")

        def chunked():  # no Content-Length: the server counts as it reads
            yield b'{"name": "x", "note": "'
            yield from (b"x" * 65536 for _ in range(32))
            yield b'"}'

        response = api.post("/keys", content=chunked(), headers={"Content-Type": "application/json"})
        assert "over" in error(response, 413, "too_large")


def test_numbers_and_times_past_what_the_keystore_holds_are_400_and_the_key_list_still_works(server, owner):
    """JSON has 1e300, Infinity and NaN, and ISO has 9999-12-31T23:59-05:00: a grace or an
    expiry past the year 9999 used to be stored and then fail every answer showing the key
    (the key list a 500 for everyone), an integer past 64 bits a 500 at once."""
    with client(server, owner) as api:
        address = mailbox(api, unique("ws"))
        key_id = new_key(api, address)["key"]["id"]
        raw = {"Content-Type": "application/json"}
        late = "9999-12-31T23:59:59-05:00"
        cases = [
            (api.post(f"/keys/{key_id}/rotate", json={"grace": "99999999999999999999999w"}), "grace:"),
            (api.post(f"/keys/{key_id}/rotate", json={"grace": 1e300}), "grace:"),
            (api.post(f"/keys/{key_id}/rotate", content=b'{"grace": Infinity}', headers=raw), "grace"),
            (api.post(f"/keys/{key_id}/rotate", content=b'{"grace": NaN}', headers=raw), "grace"),
            (api.post("/keys", json={"name": "late", "mailbox": address, "expires": late}), "expires:"),
            (api.patch(f"/keys/{key_id}", json={"expires": late}), "expires:"),
            (api.post("/keys", json={"name": "big", "mailbox": address, "rate_limit": 10**30}),
             "rate_limit:"),
            (api.patch(f"/keys/{key_id}", json={"rate_limit": 10**30}), "rate_limit:"),
            (api.patch(f"/workspaces/{address.split('@')[0]}", json={"key_limit": 10**30}), "key_limit:"),
        ]
        for response, words in cases:
            assert words in error(response, 400, "invalid"), response.request.content
        (key,) = ok(api.get("/keys", params={"mailbox": address}))["keys"]  # nothing made, nothing broken
        assert key["id"] == key_id and key["rotated"] is None and key["expires"] is None
        assert key["rate_limit"] is None


def test_text_that_is_not_unicode_is_400_naming_the_field(server, owner):
    """JSON's \\ud800 escape is a lone surrogate, which no database text can hold: it was a
    500 from deep in the keystore."""
    with client(server, owner) as api:
        address = mailbox(api, unique("ws"))
        key_id = new_key(api, address)["key"]["id"]
        raw = {"Content-Type": "application/json"}
        lone = '"\\ud800"'
        cases = [
            (api.post("/keys", content=f'{{"name": "x", "mailbox": "{address}", "note": {lone}}}',
                      headers=raw), "note:"),
            (api.post("/keys", content=f'{{"name": "x", "mailbox": "{address}", "allow_from": [{lone}]}}',
                      headers=raw), "allow_from:"),
            (api.patch(f"/keys/{key_id}", content=f'{{"owner": {lone}}}', headers=raw), "owner:"),
            (api.post("/mailboxes", content=f'{{"address": {lone}, "workspace": "w"}}', headers=raw),
             "address:"),
            (api.post("/admin-tokens", content=f'{{"name": {lone}, "role": "viewer"}}', headers=raw),
             "name:"),
        ]
        for response, words in cases:
            assert words in error(response, 400, "invalid"), response.request.content
        assert [k["id"] for k in ok(api.get("/keys", params={"mailbox": address}))["keys"]] == [key_id]


def test_a_stored_time_too_late_to_show_does_not_break_the_api(server, owner, place):
    """A keystore may hold a time past the year 9999 (the CLI takes any --grace, an older
    server took any): the API shows it as the latest time ISO 8601 has, rather than a 500
    on the key and on every list holding it."""
    with client(server, owner) as api:
        address = mailbox(api, unique("ws"))
        key_id = new_key(api, address)["key"]["id"]
        write_behind_the_api(place, "UPDATE auth_key SET prev_valid_until = ? WHERE id = ?", (1e30, key_id))
        assert ok(api.get(f"/keys/{key_id}"))["previous_valid_until"] == "9999-12-31T23:59:59Z"
        assert [k["id"] for k in ok(api.get("/keys", params={"mailbox": address}))["keys"]] == [key_id]


def test_unknown_ids_and_endpoints_are_404(server, owner):
    with client(server, owner) as api:
        for path in ("/keys/aaaaaaaaaaaa", "/mailboxes/nobody@example.com", f"/workspaces/{unique()}",
                     "/admin-tokens/aaaaaaaaaaaa", "/nothing/here"):
            error(api.get(path), 404, "not_found")
        for path in ("/keys/aaaaaaaaaaaa/revoke", "/keys/aaaaaaaaaaaa/rotate",
                     "/admin-tokens/aaaaaaaaaaaa/revoke", "/mailboxes/nobody@example.com/suspend",
                     f"/workspaces/{unique()}/suspend"):
            error(api.post(path), 404, "not_found")
        error(api.patch("/keys/aaaaaaaaaaaa", json={"note": "x"}), 404, "not_found")
        error(api.delete("/keys/aaaaaaaaaaaa", params={"confirm": "x"}), 404, "not_found")
        error(httpx.get(server.url + "api/v2/keys"), 404, "not_found")
        bare = httpx.get(server.url + "api")  # the API's own root too: JSON, not the console's page
        error(bare, 404, "not_found")
        assert bare.headers["cache-control"] == "no-store"
        error(api.put("/keys"), 405, "method_not_allowed")


def test_api_answers_are_not_cached(server, owner):
    with client(server, owner) as api:
        response = api.post("/keys", json={"name": "x", "mailbox": mailbox(api, unique("ws"))})
        assert response.status_code == 201
        assert response.headers["cache-control"] == "no-store"  # it holds a secret shown once
        assert response.headers["x-content-type-options"] == "nosniff"


def test_the_access_log_has_no_query_strings_and_no_secrets(server, owner):
    with client(server, owner) as api:
        api.get("/keys", params={"search": "needle-in-query"})
        secret = new_key(api, mailbox(api, unique("ws")))["secret"]
    log = server.log.read_text()
    assert "GET /api/v1/keys 200" in log
    assert "needle-in-query" not in log
    assert owner.secret not in log and secret not in log


def test_a_request_path_forges_no_log_line_and_leaves_no_token_in_the_log(server, owner):
    """The path is logged percent-decoded: `%0a` would start a line of the client's own
    making, and a token pasted into a URL would be written down whole."""
    forged = "2026-01-01 00:00:00,000 WARNING keystore.http: admin login failed client=192.0.2.1"
    with client(server, owner) as api:
        error(api.get("/nothing%0d%0a" + forged.replace(" ", "%20") + "%1b[2J"), 404, "not_found")
        error(api.get(f"/keys/{owner.secret}"), 404, "not_found")
        asyncio.run(wait_until(lambda: f"/keys/rat_{owner.id}_" in server.log.read_text(),
                               what="the access log's line of the second request"))
    lines = server.log.read_text().splitlines()
    assert not [line for line in lines if line.startswith(forged)]
    assert not [line for line in lines if "\x1b" in line]
    assert any("/nothing\\r\\n2026-01-01" in line for line in lines)
    assert owner.secret not in server.log.read_text()


def test_a_bug_answered_500_keeps_the_connection_and_is_logged_once(server, owner, place):
    """uvicorn closes the connection when the app raises after answering, and logs the
    traceback a second time; a script's next request on its kept-alive connection then
    failed with a reset, after a 500 errors.py had already answered and logged."""
    if place.url is not None:  # about the HTTP server, not the engine: once is enough
        pytest.skip("PostgreSQL's typed columns hold no text in a time: no stand-in bug there")
    with client(server, owner) as api:
        key_id = new_key(api, mailbox(api, unique("ws")))["key"]["id"]
    # a row no version writes: a bug's stand-in
    write_behind_the_api(place, "UPDATE auth_key SET rotated = ? WHERE id = ?", ("garbage", key_id))
    connection = http.client.HTTPConnection(server.url.split("//")[1].strip("/"), timeout=10)
    try:
        connection.request("GET", f"/api/v1/keys/{key_id}", headers=owner.headers)
        broken = connection.getresponse()
        assert broken.status == 500 and json.loads(broken.read())["error"]["code"] == "internal"
        connection.request("GET", "/api/v1/me", headers=owner.headers)  # the same connection
        after = connection.getresponse()
        assert after.status == 200 and json.loads(after.read())["actor"] == owner.actor
    finally:
        connection.close()
    log = server.log.read_text()
    assert log.count(f"internal error at GET /api/v1/keys/{key_id}") == 1
    assert "Exception in ASGI application" not in log


# ------------------------------------------------------------------- SMTP


async def test_a_key_created_over_the_api_sends_and_one_revoked_over_it_is_refused(relay_with, sink):
    async with relay_with() as h:
        owner = await asyncio.to_thread(create_token, h.config_path, "provisioning")
        server = await asyncio.to_thread(start_admin_server, h.config_path)
        try:
            async with httpx.AsyncClient(base_url=server.api(), headers=owner.headers, timeout=10) as api:
                mailbox_in = {"address": "crm@example.com", "workspace": "sales"}
                ok(await api.post("/mailboxes", json=mailbox_in), 201)
                created = ok(await api.post("/keys", json={"name": "CRM", "mailbox": "crm@example.com"}), 201)
                smtp = await h.login(created["smtp"]["username"], created["secret"])
                await smtp.sendmail("crm@example.com", ["bob@example.net"],
                                    b"From: crm@example.com\r\nSubject: hi\r\n\r\nhello\r\n")
                await smtp.quit()
                message = await sink.wait_for(1)
                assert message[0].rcpt_tos == ["bob@example.net"]

                async def used() -> bool:  # the relay writes a key's last use within a second
                    key = ok(await api.get(f"/keys/{created['key']['id']}"))
                    return key["last_used"] is not None and key["last_ip"] == "127.0.0.1"

                await wait_until(used, what="the key's last use, shown by the API")

                ok(await api.post(f"/keys/{created['key']['id']}/revoke"))
                with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                    await h.login("crm@example.com", created["secret"])
                assert refused.value.code == 535 and "revoked" in refused.value.message
        finally:
            assert await asyncio.to_thread(server.stop) == 0


# ------------------------------------------------------ the server's faults


async def test_an_unreadable_keystore_is_503_and_a_bug_is_a_logged_500_without_details(tmp_path, caplog):
    """In process (the faults are hard to cause in a running server on purpose): a bug in a
    route answers `internal` and the log has the traceback; a keystore that cannot be read
    answers `unavailable` with Retry-After, not 401, and costs the token no failure."""
    config = load_config(write_config(tmp_path, free_port()))
    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    _, secret = await store.create_token(name="root", role="owner", actor="test")

    class Buggy(AdminService):
        async def workspaces(self, actor):
            raise RuntimeError("a bug")

    app = create_app(Buggy(store), Site("relay.test", 587, 465, False, 3600.0))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    headers = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://admin", headers=headers) as api:
        response = await api.get("/api/v1/workspaces")
        assert "the server's log" in error(response, 500, "internal")
        assert "a bug" not in response.text
        assert "GET /api/v1/workspaces" in caplog.text and "RuntimeError: a bug" in caplog.text
        assert secret not in caplog.text

        await store.close()
        for _ in range(12):  # more than [auth] max_failures: none of them counted
            response = await api.get("/api/v1/keys")
            error(response, 503, "unavailable")
            assert response.headers["retry-after"] == "5"


def test_the_admin_section_of_the_config(tmp_path):
    example = load_config(Path(__file__).resolve().parent.parent / "config.example.toml")
    assert (example.admin.listen, example.admin.session_ttl) == ("127.0.0.1:8025", 8 * 3600)
    path = write_config(tmp_path, free_port())
    base = path.read_text()
    assert load_config(path).admin.listen is None  # no console unless asked for
    for section, problem in [
        ('listen = "nowhere"', "[admin] listen 'nowhere': expected HOST:PORT"),
        ('session_ttl = 0', "[admin] session_ttl: longer than 0"),
        ('listn = "127.0.0.1:1"', "[admin]: unknown key 'listn'"),
    ]:
        path.write_text(base + f"\n[admin]\n{section}\n")
        with pytest.raises(ConfigError) as refused:
            load_config(path)
        assert problem in str(refused.value)


# ----------------------------------------------------------- serve itself


def test_serve_uses_admin_listen_and_serves_https_off_loopback(tmp_path):
    config = write_config(tmp_path, free_port())
    config.write_text(config.read_text() + '\n[admin]\nlisten = "127.0.0.1:0"\n')
    assert keystore_cli(config, "init").returncode == 0
    with admin_server(config, listen=None) as server:
        assert server.url.startswith("http://127.0.0.1:")
        ok(httpx.get(server.api("/openapi.json")))
    with admin_server(config, listen="0.0.0.0:0") as server:
        assert server.url.startswith("https://0.0.0.0:")
        port = server.url.rsplit(":", 1)[1].rstrip("/")
        tls = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        tls.check_hostname = False  # the test certificate names relay.test
        ok(httpx.get(f"https://127.0.0.1:{port}/api/v1/openapi.json", verify=tls))
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"http://127.0.0.1:{port}/api/v1/openapi.json")


def test_serve_refuses_to_start_without_an_address_or_without_tls_off_loopback(tmp_path):
    config = write_config(tmp_path, free_port())
    assert keystore_cli(config, "init").returncode == 0
    result = keystore_cli(config, "serve")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no [admin] listen" in result.stderr

    bare = tmp_path / "bare.toml"
    bare.write_text('[keystore]\npath = "keystore.db"\npepper_file = "pepper"\n')
    result = keystore_cli(bare, "serve", "--listen", "0.0.0.0:0")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "[tls]" in result.stderr

    bare.write_text(bare.read_text() + '[admin]\nlisten = "0.0.0.0:8025"\n')
    result = keystore_cli(bare, "serve")
    assert result.returncode == 2 and "[admin] listen" in result.stderr and "[tls]" in result.stderr

    with admin_server(config) as running:  # a port in use: one line, exit 2
        taken = running.url.rstrip("/").rsplit("/", 1)[1]
        result = keystore_cli(config, "serve", "--listen", taken)
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert "cannot listen" in result.stderr
