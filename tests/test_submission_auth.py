"""AUTH on the submission listeners: TLS first, PLAIN and LOGIN, one reply for every
kind of wrong credential, and the reason when the key itself is right but unusable."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
import warnings

import aiosmtplib
import pytest

from keystore import keys

INVALID = "5.7.8 Authentication credentials invalid"


def flip(secret: str, at: int) -> str:
    return secret[:at] + ("A" if secret[at] != "A" else "B") + secret[at + 1:]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_ehlo_before_tls_offers_starttls_not_auth(h):
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, start_tls=False, timeout=5)
    await client.connect()
    await client.ehlo()
    assert client.supports_extension("starttls")
    assert not client.supports_extension("auth")
    code, message = await client.execute_command(b"AUTH", b"PLAIN", b64("\0a@b.c\0x").encode())
    assert (code, message) == (538, "5.7.11 Encryption required for requested authentication mechanism")
    code, message = await client.execute_command(b"MAIL", b"FROM:<a@example.com>")
    assert (code, message) == (530, "5.7.0 Authentication required")
    client.close()


async def test_plain_with_initial_response_over_starttls_then_mail(h):
    await h.mailbox("alice@example.com")
    secret = await h.key("alice@example.com")
    client = await h.client()
    assert client.supports_extension("auth")
    assert client.supports_extension("enhancedstatuscodes")
    response = await client.auth_plain("alice@example.com", secret)
    assert (response.code, response.message) == (235, "2.7.0 Authentication successful")
    await client.sendmail("alice@example.com", ["bob@example.net"],
                          b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n")
    await client.quit()
    (message,) = await h.sink.wait_for(1)
    assert message.rcpt_tos == ["bob@example.net"]
    assert b"hello" in message.data


async def test_plain_without_initial_response(h):
    await h.mailbox("alice@example.com")
    secret = await h.key("alice@example.com")
    client = await h.client()
    code, message = await client.execute_command(b"AUTH", b"PLAIN")
    assert (code, message) == (334, "")
    code, message = await client.execute_command(b64(f"\0alice@example.com\0{secret}").encode())
    assert code == 235
    client.close()


async def test_login_mechanism_and_smtplib_client(h):
    await h.mailbox("alice@example.com")
    secret = await h.key("alice@example.com")
    client = await h.client()
    response = await client.auth_login("alice@example.com", secret)
    assert response.code == 235
    client.close()

    def with_smtplib() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", h.port, timeout=5) as smtp:
            smtp.starttls(context=h.tls)
            return smtp.login("alice@example.com", secret)

    code, _ = await asyncio.to_thread(with_smtplib)
    assert code == 235


async def test_implicit_tls_listener_offers_auth_and_no_starttls(h):
    await h.mailbox("alice@example.com")
    secret = await h.key("alice@example.com")
    client = await h.client(implicit=True)
    assert client.supports_extension("auth")
    assert not client.supports_extension("starttls")
    await client.login("alice@example.com", secret)
    await client.sendmail("alice@example.com", ["bob@example.net"], b"From: alice@example.com\r\n\r\nx\r\n")
    await client.quit()
    await h.sink.wait_for(1)


async def test_tls_below_1_2_is_refused(h):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.minimum_version = ssl.TLSVersion.TLSv1
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.implicit_port, use_tls=True,
                             tls_context=context, timeout=5)
    with pytest.raises((aiosmtplib.SMTPConnectError, ssl.SSLError, ConnectionError)):
        await client.connect()


@pytest.mark.parametrize("case", ["unknown mailbox", "unknown key", "wrong secret", "bad checksum",
                                  "malformed", "other mailbox's key"])
async def test_every_wrong_credential_gets_the_same_reply(h, case):
    await h.mailbox("alice@example.com")
    await h.mailbox("carol@example.com")
    secret = await h.key("alice@example.com")
    carol_secret = await h.key("carol@example.com")
    username, password = {
        "unknown mailbox": ("nobody@example.com", secret),
        "unknown key": ("alice@example.com", keys.format_key("aaaaaaaaaaaa", keys.generate_secret())),
        "wrong secret": ("alice@example.com", keys.format_key(secret[4:16], keys.generate_secret())),
        "bad checksum": ("alice@example.com", flip(secret, 20)),
        "malformed": ("alice@example.com", "hunter2"),
        "other mailbox's key": ("alice@example.com", carol_secret),
    }[case]
    client = await h.client()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
        await client.auth_plain(username, password)
    assert (refused.value.code, refused.value.message) == (535, INVALID)
    client.close()


@pytest.mark.parametrize(
    ("state", "reason"),
    [("revoked", "this auth key has been revoked"), ("disabled", "this auth key is disabled"),
     ("suspended", "this mailbox is suspended"), ("no_send", "lacks the email.send permission")],
)
async def test_right_secret_but_unusable_key_names_the_reason(h, state, reason):
    await h.mailbox("alice@example.com")
    store = h.relay.store
    perms = ("mailbox.read",) if state == "no_send" else ("email.send",)
    record, secret = await store.create_key(mailbox="alice@example.com", name="k", actor="t",
                                            permissions=perms)
    if state == "revoked":
        await store.revoke_key(record.id, actor="t")
    elif state == "disabled":
        await store.disable_key(record.id, actor="t")
    elif state == "suspended":
        await store.suspend_mailbox("alice@example.com", reason="billing", actor="t")
    client = await h.client()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
        await client.auth_plain("alice@example.com", secret)
    assert refused.value.code == 535
    assert refused.value.message.startswith(INVALID + ": ")
    assert reason in refused.value.message
    client.close()


async def test_expired_key_names_the_reason(h):
    import time

    await h.mailbox("alice@example.com")
    secret = await h.key("alice@example.com", expires=time.time() + 0.5)
    await asyncio.sleep(0.6)
    client = await h.client()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
        await client.auth_plain("alice@example.com", secret)
    assert "this auth key has expired" in refused.value.message
    client.close()


async def test_workspace_key_authenticates_as_any_mailbox_of_its_workspace(h):
    await h.mailbox("alice@acme.example", workspace="acme")
    await h.mailbox("bob@acme.example", workspace="acme")
    await h.mailbox("eve@other.example", workspace="other")
    secret = await h.key(workspace="acme")
    for address in ("alice@acme.example", "bob@acme.example"):
        client = await h.client()
        assert (await client.auth_plain(address, secret)).code == 235
        client.close()
    client = await h.client()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await client.auth_plain("eve@other.example", secret)
    client.close()


async def test_plain_authzid_must_be_empty_or_the_username(h):
    await h.mailbox("alice@example.com")
    await h.mailbox("bob@example.com")
    secret = await h.key("alice@example.com")
    client = await h.client()
    code, message = await client.execute_command(
        b"AUTH", b"PLAIN", b64(f"bob@example.com\0alice@example.com\0{secret}").encode())
    assert code == 535
    assert "Authorization identity" in message
    code, _ = await client.execute_command(
        b"AUTH", b"PLAIN", b64(f"alice@example.com\0alice@example.com\0{secret}").encode())
    assert code == 235
    client.close()


async def test_bad_base64_and_abort(h):
    client = await h.client()
    code, message = await client.execute_command(b"AUTH", b"PLAIN", b"!!!notbase64")
    assert (code, message) == (501, "5.5.2 Can't decode base64")
    code, _ = await client.execute_command(b"AUTH", b"LOGIN")
    assert code == 334
    code, message = await client.execute_command(b"*")
    assert (code, message) == (501, "5.7.0 Auth aborted")
    client.close()


async def test_repeated_failures_from_one_address_get_421_but_other_addresses_still_work(relay_with):
    async with relay_with(auth='max_failures = 4\nfailure_window = "30s"') as h:
        await h.mailbox("alice@example.com")
        secret = await h.key("alice@example.com")
        replies = []
        for _ in range(5):
            client = await h.client()
            try:
                await client.auth_plain("alice@example.com", "rak_wrong")
            except aiosmtplib.SMTPAuthenticationError as exc:
                replies.append(exc.code)
            except aiosmtplib.SMTPServerDisconnected:
                replies.append("disconnected")
            client.close()
        assert replies[:4] == [535] * 4
        assert replies[4] in (421, "disconnected")
        # even the right key is refused from the blocked address...
        client = await h.client()
        with pytest.raises((aiosmtplib.SMTPAuthenticationError, aiosmtplib.SMTPServerDisconnected)):
            await client.auth_plain("alice@example.com", secret)
        client.close()
        # ...while another address is unaffected
        other = await h.client(source="127.0.0.2")
        assert (await other.auth_plain("alice@example.com", secret)).code == 235
        other.close()


async def test_421_reply_text_on_blocked_address(relay_with):
    async with relay_with(auth="max_failures = 1") as h:
        client = await h.client()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.auth_plain("a@example.com", "nope")
        client.close()
        client = await h.client()
        code, message = await client.execute_command(b"AUTH", b"PLAIN", b64("\0a@example.com\0x").encode())
        assert code == 421
        assert message.startswith("4.7.0 ")


async def test_keystore_unavailable_is_temporary(h):
    await h.mailbox("alice@example.com")
    secret = await h.key("alice@example.com")
    await h.relay.store.close()  # the keystore goes away under a running relay
    client = await h.client()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
        await client.auth_plain("alice@example.com", secret)
    assert (refused.value.code, refused.value.message[:5]) == (454, "4.7.0")
    client.close()
    h.relay.store = None  # already closed


async def test_swaks_sends_through_starttls(h):
    import shutil

    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed (.ci/run installs it)")
    await h.mailbox("alice@example.com")
    secret = await h.key("alice@example.com")
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", f"127.0.0.1:{h.port}", "--tls", "--auth", "PLAIN",
        "--auth-user", "alice@example.com", "--auth-password", secret,
        "--from", "alice@example.com", "--to", "bob@example.net", "--h-Subject", "via swaks",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()
    assert b"250 2.0.0 OK queued as" in output
    (message,) = await h.sink.wait_for(1)
    assert "Subject: via swaks" in message.text
