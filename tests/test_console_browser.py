"""The web console in a real browser: Debian's Chromium, headless, driven by Selenium
through Debian's chromedriver (no browser download), against `keystore serve` as a real
process and the real relay on the same keystore.

One browser for the module (starting Chromium is most of the cost); each test logs in
afresh, so no test depends on another's session.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.consolesite import ConsoleSite, console_site
from tests.support.keystores import KeystorePlace
from tests.support.legacyseed import bcrypt_hash, import_lines
from tests.support.sink import Sink
from tests.support.waiting import wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and (CHROMEDRIVER.exists() or shutil.which("chromedriver"))),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)


def chromium(width: int = 1280, height: int = 900) -> WebDriver:
    """Headless Chromium as CI runs it (root, no /dev/shm to speak of); its console log is
    kept so a test can see what the Content-Security-Policy blocked."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER if CHROMEDRIVER.exists() else "chromedriver")),
                            options=options)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    driver = chromium()
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[ConsoleSite]:
    with console_site(tmp_path_factory.mktemp("console-browser")) as running:
        yield running


def log_in(browser: WebDriver, site: ConsoleSite, role: str = "owner") -> None:
    browser.delete_all_cookies()
    browser.get(site.url + "login")
    browser.find_element(By.ID, "token").send_keys(site.tokens[role].secret)
    browser.find_element(By.CSS_SELECTOR, "form[action='/login'] button[type=submit]").click()
    WebDriverWait(browser, 10).until(expected_conditions.title_contains("Workspaces"))


def click(browser: WebDriver, selector: str) -> None:
    """Click and wait for the next page (the old one goes stale)."""
    element = browser.find_element(By.CSS_SELECTOR, selector)
    element.click()
    # while the old page goes, chromedriver may say "Node ... does not belong to the
    # document" rather than "stale element": look again until it says stale
    WebDriverWait(browser, 10, ignored_exceptions=(WebDriverException,)).until(
        expected_conditions.staleness_of(element))


def text(browser: WebDriver, selector: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, selector).text.strip()


def csp_violations(browser: WebDriver) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser")
            if "Content Security Policy" in entry["message"] or "Refused to" in entry["message"]]


async def test_create_key_send_with_it_revoke_then_login_refused(site: ConsoleSite, browser: WebDriver):
    """The whole life of a key as a person lives it: log in, open the mailbox, create a
    key, copy the secret and the SMTP settings from the page into a mail client, send,
    revoke it in the page; the client's next login is refused."""
    async with Sink() as sink, site.relay(sink):
        log_in(browser, site)
        click(browser, "a[href='/workspaces/acme']")
        click(browser, "a[href='/mailboxes/alice@acme.example']")
        click(browser, "a.button.primary")  # New key
        assert text(browser, "h1") == "New key for mailbox alice@acme.example"
        browser.find_element(By.ID, "name").send_keys("Newsletter tool")
        browser.find_element(By.ID, "owner").send_keys("marketing")
        browser.find_element(By.ID, "note").send_keys("sends the monthly letter")
        click(browser, "#save")

        assert text(browser, "h1") == "Key Newsletter tool created"
        secret = text(browser, "#secret")
        host = text(browser, "#smtp-host")
        port = int(text(browser, "#smtp-port"))
        username = text(browser, "#smtp-username")
        assert (host, port, username) == ("relay.test", site.submission_port, "alice@acme.example")
        assert int(text(browser, "#smtps-port")) == site.submissions_port
        copy = browser.find_element(By.CSS_SELECTOR, "button.copy")
        assert copy.is_displayed()  # copy.js ran (the CSP lets /static/ scripts run)
        copy.click()
        WebDriverWait(browser, 5).until(lambda b: copy.text == "Copied")

        await asyncio.to_thread(site.send, username, secret, subject="made in the console")
        (received,) = await sink.wait_for(1)
        assert received.mail_from == "alice@acme.example"
        assert "Subject: made in the console" in received.text

        click(browser, "a.button[href^='/keys/']")  # Done: go to the key

        def last_use_shown() -> bool:
            browser.refresh()
            return text(browser, "#last-used").endswith("from 127.0.0.1")

        # the relay writes a key's last use within a second (keystore USE_FLUSH_DELAY); it
        # runs on this event loop, so the wait yields to it between looks
        await wait_until(last_use_shown, timeout=5, what="the key page showing its last use")
        click(browser, "#revoke")
        assert text(browser, "h1") == "Revoke key Newsletter tool?"
        click(browser, "#confirm-revoke")
        assert text(browser, ".banner.ok") == "Key revoked: it will never log in again."
        assert text(browser, "h1 .status") == "revoked"

        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            await asyncio.to_thread(site.try_login, username, secret)
        assert refused.value.smtp_code == 535
        assert refused.value.smtp_error == (b"5.7.8 Authentication credentials invalid: "
                                            b"this auth key has been revoked")
        assert len(sink.messages) == 1

        def failure_shown() -> bool:
            browser.refresh()
            return text(browser, "#last-failed").endswith("from 127.0.0.1: revoked")

        await wait_until(failure_shown, timeout=5, what="the key page showing the refused login")
        assert csp_violations(browser) == []


def test_a_form_posted_without_its_csrf_token_is_refused(site: ConsoleSite, browser: WebDriver):
    """The page's own Disable form, its hidden token removed (as a forged form would lack
    it): 403, the refusal page, and the key still active."""
    log_in(browser, site, "editor")
    browser.get(site.url + "keys/new?mailbox=carol@acme.example")
    browser.find_element(By.ID, "name").send_keys("CSRF target")
    click(browser, "#save")
    key_url = browser.find_element(By.CSS_SELECTOR, "a.button[href^='/keys/']").get_attribute("href")
    browser.get(key_url)
    browser.execute_script("document.querySelector(\"form[action$='/disable'] input[name=csrf]\").remove()")
    click(browser, "#disable")
    assert text(browser, "h1") == "Form refused"
    assert "nothing was changed" in text(browser, "#refusal")
    # the status the browser got: the same request again, with the browser's own session
    session = {c["name"]: c["value"] for c in browser.get_cookies()}
    reply = httpx.post(key_url + "/disable", cookies=session, follow_redirects=False)
    assert reply.status_code == 403
    browser.get(key_url)
    assert text(browser, "h1 .status") == "active"
    # the same form with its token works
    click(browser, "#disable")
    assert text(browser, "h1 .status") == "disabled"


def test_with_javascript_off_every_action_still_works(site: ConsoleSite, browser: WebDriver):
    """Only the copy button needs a script: with JavaScript off an editor creates a key
    (its secret selectable, the button hidden), edits it, rotates it with a grace, ends
    the grace, disables it and deletes it by typing its name."""
    browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        log_in(browser, site, "editor")
        browser.get(site.url + "mailboxes/alice@acme.example")
        click(browser, "a.button.primary")
        browser.find_element(By.ID, "name").send_keys("No-JS tool")
        browser.find_element(By.CSS_SELECTOR, "input[value='mailbox.read']").click()
        browser.find_element(By.ID, "allow_from").send_keys("192.0.2.0/24")
        click(browser, "#save")
        assert text(browser, "#secret").startswith("rak_")
        assert not browser.find_element(By.CSS_SELECTOR, "button.copy").is_displayed()
        click(browser, "a.button[href^='/keys/']")
        assert text(browser, "#allow-from") == "192.0.2.0/24"
        assert "email.send, mailbox.read" in text(browser, "#key-facts")
        key_url = browser.current_url

        click(browser, "a[href$='/edit']")
        browser.find_element(By.ID, "owner").send_keys("ops team")
        browser.find_element(By.ID, "rate_limit").send_keys("20")
        click(browser, "#save")
        assert text(browser, ".banner.ok") == "Key saved: owner, rate limit."

        grace = browser.find_element(By.CSS_SELECTOR, "input[name=grace]")
        grace.clear()
        grace.send_keys("2h")
        click(browser, "#rotate")
        assert text(browser, "h1") == "Key No-JS tool rotated"
        assert text(browser, "#secret").startswith("rak_")
        browser.get(key_url)
        click(browser, "#end-grace")
        assert text(browser, ".banner.ok") == "Rotation grace ended: the previous secret no longer works."
        click(browser, "#disable")
        assert text(browser, "h1 .status") == "disabled"

        browser.find_element(By.CSS_SELECTOR, "input[name=confirm]").send_keys("No-JS")
        click(browser, "#delete")
        assert text(browser, "#refusal") == "confirmation did not match the key's name; nothing deleted"
        browser.find_element(By.CSS_SELECTOR, "input[name=confirm]").send_keys("No-JS tool")
        click(browser, "#delete")
        assert browser.current_url == site.url + "mailboxes/alice@acme.example"
        assert text(browser, ".banner.ok").startswith("Key 'No-JS tool' (")
    finally:
        browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})


def test_a_viewer_gets_no_write_controls_and_no_page_breaks_the_csp(site: ConsoleSite, browser: WebDriver):
    """Every page a viewer can reach renders with no CSP violation and no write control
    (the log-out form aside); no page but the secret's loads a script. A legacy password
    (issue 13) is marked as one on its page, with its scheme, and offers a viewer no
    conversion."""
    asyncio.run(import_lines(lambda: KeystorePlace(site.folder).open(create=False),
                             [("erin@acme.example", bcrypt_hash("old password"))], workspace="acme"))
    (legacy,) = httpx.get(site.server.api("/keys"), params={"mailbox": "erin@acme.example", "kind": "legacy"},
                          headers=site.tokens["viewer"].headers).json()["keys"]
    log_in(browser, site, "viewer")
    for path in ("", "workspaces/acme", "mailboxes/alice@acme.example", "keys?q=acme", "keys?report=unused",
                 "audit", "mailboxes/erin@acme.example", "keys?kind=legacy", f"keys/{legacy['id']}"):
        browser.get(site.url + path)
        assert browser.find_elements(By.CSS_SELECTOR, "main h1"), path
        assert not browser.find_elements(By.CSS_SELECTOR, "main form[method=post]"), path
        assert not browser.find_elements(By.CSS_SELECTOR, "main a[href*='/keys/new']"), path
        assert browser.find_elements(By.CSS_SELECTOR, "script") == [], path
    assert text(browser, "h1 .badge-legacy") == "legacy"  # the legacy password's page, last
    assert text(browser, "#legacy-scheme") == "BLF-CRYPT"
    assert text(browser, ".who .role") == "viewer"
    assert csp_violations(browser) == []
