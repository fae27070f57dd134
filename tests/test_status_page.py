"""The status page in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium): it loads without console errors, a search finds one tenant among
1,000, a tenant's page shows its TXID, and its Hydrate button hydrates an archived tenant
with the token. A real embedded fleet serves it over HTTP on loopback."""

from __future__ import annotations

import os
import shutil
import sqlite3
from datetime import timedelta

import pytest

from tenantsync.catalogue import TenantState, open_catalogue
from tenantsync.config import Config

from .dbutil import app_db, wait_for, write_rows
from .test_server import TOKEN, call, embedded_fleet

TENANTS = 1000
#: Where the screenshots go when asked (``TENANTSYNC_SCREENSHOTS=docs``), for docs/.
SCREENSHOTS = os.environ.get("TENANTSYNC_SCREENSHOTS")


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if browser is None or not os.access(driver, os.X_OK):
        pytest.fail("chromium and chromedriver: apt-get install chromium chromium-driver (see README)",
                    pytrace=False)
    return browser, driver


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


@pytest.fixture
def fleet_of_1000(tmp_path, file_url):
    data = tmp_path / "data"
    data.mkdir()
    template = tmp_path / "template.db"
    write_rows(conn := app_db(template), 3)
    conn.close()
    for i in range(TENANTS):
        shutil.copyfile(template, data / f"t{i:05d}.db")
    cfg = Config(replica=file_url, globs=(f"{data}/*.db",), catalogue=f"sqlite:///{tmp_path}/cat.db",
                 host="h1", api_token=TOKEN, idle_after=timedelta(seconds=2))
    catalogue = open_catalogue(cfg)
    with embedded_fleet(cfg) as base:
        assert wait_for(lambda: sum(catalogue.count_by_state().values()) == TENANTS
                        and (catalogue.get("t00737.db").txid or 0) > 0, 120)
        yield cfg, base, data, catalogue


def console_errors(chrome) -> list[dict]:
    return [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"]


def test_the_page_finds_a_tenant_shows_it_and_hydrates_it_with_the_token(browser, fleet_of_1000, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    cfg, base, data, catalogue = fleet_of_1000
    wait = WebDriverWait(browser, 30)
    browser.get(base + "/")
    assert "tenantsync" in browser.title
    cards = browser.find_element(By.CLASS_NAME, "cards").text
    assert f"{TENANTS:,}" in cards
    assert len(browser.find_elements(By.CSS_SELECTOR, "#tenants tbody tr")) == 50  # one page of 50
    shot(browser, tmp_path, "status-fleet.png")

    box = browser.find_element(By.ID, "q")
    box.send_keys("t00737")
    box.submit()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#tenants tbody tr")) == 1)
    row = browser.find_element(By.CSS_SELECTOR, "#tenants tbody tr")
    assert row.text.startswith("t00737.db")

    # Archive it through the API, then bring it back from its page with the token.
    status, body = call(f"{base}/tenants/t00737.db/archive", "POST")
    assert status == 200 and body["archived"], body
    assert not (data / "t00737.db").exists()
    row.find_element(By.TAG_NAME, "a").click()
    wait.until(ready.presence_of_element_located((By.ID, "txid")))
    record = catalogue.get("t00737.db")
    assert record.state == TenantState.archived
    assert browser.find_element(By.ID, "txid").text == f"{record.txid:016x}"
    assert browser.find_element(By.ID, "state").text == "archived"
    assert "0000000000000001" in browser.find_element(By.ID, "levels").text
    shot(browser, tmp_path, "status-tenant.png")

    browser.find_element(By.CSS_SELECTOR, "button[data-action=hydrate]").click()
    wait.until(lambda b: "401" in b.find_element(By.ID, "result").text)  # no token typed yet
    assert not (data / "t00737.db").exists()
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "button[data-action=hydrate]").click()
    wait.until(lambda b: "hydrate: done" in b.find_element(By.ID, "result").text)
    assert (data / "t00737.db").exists()
    with sqlite3.connect(data / "t00737.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert catalogue.get("t00737.db").state != TenantState.archived
    # The page refreshes itself: the state shown follows the catalogue.
    wait.until(lambda b: b.find_element(By.ID, "state").text != "archived")
    errors = [e for e in console_errors(browser) if "401" not in e["message"]]  # the refused click above
    assert errors == [], errors


def shot(chrome, tmp_path, name: str) -> None:
    chrome.save_screenshot(str(tmp_path / name))
    if SCREENSHOTS:
        os.makedirs(SCREENSHOTS, exist_ok=True)
        shutil.copyfile(tmp_path / name, os.path.join(SCREENSHOTS, name))
