"""Headless Chromium: log in, upload a PEFT zip, watch the progress bar and the status turn ready."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.portal import factories
from tests.portal.celery_worker import celery_worker

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1280,900",
)


@pytest.fixture
def driver():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()


def test_log_in_upload_and_watch_it_become_ready(driver, live_server, tenant_a, base_model, peft_zip, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60, poll_frequency=0.1)
    driver.get(f"{live_server.url}/adapters/")
    assert "/accounts/login/" in driver.current_url
    driver.find_element(By.ID, "id_username").send_keys("alice")
    driver.find_element(By.ID, "id_password").send_keys(factories.PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(EC.url_to_be(f"{live_server.url}/adapters/"))
    assert "No adapters yet" in driver.page_source

    driver.find_element(By.LINK_TEXT, "Upload an adapter").click()
    wait.until(EC.presence_of_element_located((By.ID, "upload-form")))
    driver.find_element(By.ID, "id_name").send_keys("support-bot")
    driver.find_element(By.ID, "id_description").send_keys("answers tickets")
    driver.find_element(By.ID, "id_archive").send_keys(str(peft_zip))

    with celery_worker(tmp_path / "worker.log"):
        driver.find_element(By.ID, "upload-button").click()
        status = wait.until(EC.presence_of_element_located((By.ID, "upload-status")))
        wait.until(lambda _: status.get_attribute("data-status") in ("ready", "rejected"))
        history = status.get_attribute("data-history").split()
        bar = driver.find_element(By.ID, "upload-bar")
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "portal-upload.png"))

    assert history[-1] == "ready", driver.find_element(By.ID, "upload-error").text
    assert history[0] in ("pending", "validating")  # the page followed it from the start
    assert bar.get_attribute("value") == "100" and int(bar.get_attribute("data-events")) >= 1
    assert driver.find_element(By.ID, "upload-percent").text == "100%"

    driver.find_element(By.ID, "upload-link").click()
    wait.until(EC.url_to_be(f"{live_server.url}/adapters/support-bot/"))
    row = driver.find_element(By.ID, "version-1").text
    assert "default" in row and "ready" in row and "r=4" in row
    driver.save_screenshot(str(ARTIFACTS / "portal-adapter.png"))
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
