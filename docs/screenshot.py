"""Take docs/console-create-key.png: the admin console's page after creating a key (the
secret shown once beside the SMTP settings), as headless Chromium renders it.

    .venv/bin/python docs/screenshot.py [OUTPUT.png]

It builds a throwaway relay folder (config with submission on 587 and submissions on 465,
[admin] public_host smtp.example.com; a keystore with a few mailboxes and keys), starts
`keystore serve` on a free loopback port as an operator would, logs in with an owner
token, creates a key through the form and saves the result page at 1280x900. Needs
Debian's chromium and chromium-driver (as the browser tests do).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from keystore.store import KeyStore  # noqa: E402
from relay.config import load_config  # noqa: E402
from tests.support.adminserver import admin_server, create_token  # noqa: E402
from tests.support.relayrun import write_config  # noqa: E402

WIDTH, HEIGHT = 1280, 900


def relay_folder(folder: Path) -> Path:
    config = write_config(folder, 2525)
    text = (config.read_text()
            .replace('hostname = "relay.test"', 'hostname = "relay.internal"')
            .replace('submission = ["127.0.0.1:0"]', 'submission = ["0.0.0.0:587"]')
            .replace('submissions = ["127.0.0.1:0"]', 'submissions = ["0.0.0.0:465"]'))
    config.write_text(text + '\n[admin]\npublic_host = "smtp.example.com"\n')
    return config


async def seed(config_path: Path) -> None:
    config = load_config(config_path)
    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    try:
        await store.add_mailbox("billing@acme.example", workspace="acme", actor="ops")
        await store.add_mailbox("support@acme.example", workspace="acme", actor="ops")
        await store.create_key(mailbox="billing@acme.example", name="Invoice mailer", owner="finance",
                               actor="ops")
        await store.create_key(workspace="acme", name="Helpdesk", owner="support", actor="ops")
    finally:
        await store.close()


def chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def main() -> int:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "console-create-key.png"
    with tempfile.TemporaryDirectory() as tmp:
        config = relay_folder(Path(tmp))
        asyncio.run(seed(config))
        token = create_token(config, "ops", "owner")
        with admin_server(config) as server:
            browser = chromium()
            try:
                # the page area exactly WIDTH x HEIGHT, whatever the window's own frame takes
                browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                    "width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
                wait = WebDriverWait(browser, 10)
                browser.get(server.url + "login")
                browser.find_element(By.ID, "token").send_keys(token.secret)
                browser.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
                wait.until(expected_conditions.title_contains("Workspaces"))
                browser.get(server.url + "keys/new?mailbox=billing@acme.example")
                browser.find_element(By.ID, "name").send_keys("CRM sync")
                browser.find_element(By.ID, "owner").send_keys("sales-ops")
                browser.find_element(By.ID, "note").send_keys("HubSpot workflow emails")
                browser.find_element(By.ID, "allow_from").send_keys("203.0.113.0/24")
                browser.find_element(By.ID, "save").click()
                wait.until(expected_conditions.presence_of_element_located((By.ID, "secret")))
                browser.save_screenshot(str(output))
            finally:
                browser.quit()
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
