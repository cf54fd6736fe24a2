"""Headless Chromium: /ops/ updates in place from a live engine, and its Pin buttons work after each update; the
tenant usage page draws its charts."""

from __future__ import annotations

import random
import re
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from django.utils import timezone

from engine_daemon.protocol import PINNED_ADAPTERS_KEY
from portal.adapters.models import AdapterVersion
from portal.usage.services import usage_record
from tests.portal import factories
from tests.portal.ops.fleet import upload
from tests.portal.ops.test_pins import beat_holding
from tests.portal.test_browser import ARTIFACTS, driver  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def sign_in(driver, live_server, user) -> None:  # noqa: F811
    """A session cookie for the user, as if they had logged in (the login form has its own browser test)."""
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    driver.get(f"{live_server.url}/accounts/login/")
    driver.add_cookie({"name": settings.SESSION_COOKIE_NAME, "value": session.session_key, "path": "/"})


def full_page_screenshot(driver, path) -> None:  # noqa: F811
    """The whole page, not only the window (Chromium's DevTools capture beyond the viewport)."""
    import base64

    width = driver.execute_script("return document.documentElement.scrollWidth")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
    })
    ARTIFACTS.mkdir(exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def severe_errors(driver) -> list:  # noqa: F811
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_ops_dashboard_updates_in_place(driver, live_server, fleet, staff):  # noqa: F811
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # The live region is replaced every 1.5 s: read it in one script call, never through held elements.
    wait = WebDriverWait(driver, 30, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])

    def read(script: str, *args):
        return driver.execute_script(script, *args)

    def shown(name: str) -> str:
        return read("return document.querySelector(`[data-field='${arguments[0]}']`).textContent.trim()", name)

    def rows() -> list[list[str]]:
        return read("return [...document.querySelectorAll('#residency-table tbody tr')]"
                    ".map(r => [r.dataset.adapter, r.dataset.tier, r.innerText])")

    def updates() -> int:
        return int(read("return document.getElementById('ops-live').dataset.updates"))

    fleet.beat()
    sign_in(driver, live_server, staff)
    driver.get(f"{live_server.url}/ops/")
    read("window.loadedOnce = true;")  # gone if the page reloads
    before = int(shown("generated_tokens"))
    fleet.serve(fleet.sha("shouty"))  # host RAM → slot 0, evicting pirate
    fleet.serve(None)
    after = fleet.beat().generated_tokens
    assert after > before
    wait.until(lambda _: updates() >= 1 and shown("generated_tokens") == str(after))
    shouty = next(row for row in rows() if row[0] == fleet.sha("shouty"))
    assert shouty[1] == "gpu" and "GPU rows 0–1" in shouty[2]

    driver.find_element(By.CSS_SELECTOR, "#residency-table a[href$='sort=-requests']").click()  # sorts in place
    wait.until(lambda _: driver.current_url.endswith("?sort=-requests") and "▼" in read(
        "return document.getElementById('residency-table').innerText"))
    assert [row[0] for row in rows()][:2] == [fleet.sha("pirate"), fleet.sha("shouty")]  # 2 requests, then 1
    assert read("return window.loadedOnce === true;")  # never reloaded
    assert read("return document.getElementById('ops-connection').textContent") == "live"

    # For the picture: a little traffic on each adapter, and a malformed entry the engine dead-letters.
    fleet.enqueue_malformed()
    for name in ("pirate", "support-bot", "pirate", "shouty"):
        fleet.serve(fleet.sha(name))
    final = fleet.beat().generated_tokens
    wait.until(lambda _: shown("generated_tokens") == str(final) and "malformed request" in read(
        "return document.body.innerText"))
    full_page_screenshot(driver, ARTIFACTS / "ops-dashboard.png")
    assert severe_errors(driver) == []


def test_tenant_usage_page_draws_its_charts(driver, live_server, tenant_a, base_model):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    tenant, user = tenant_a
    keys = [factories.api_key_for(tenant, name=name)[0] for name in ("production", "staging")]
    rng = random.Random(5)
    now = timezone.now()
    n = 0
    for model, rate in (("support-bot@2", 6), ("pirate@1", 3), (base_model.name, 2)):
        for hour in range(24):
            for _ in range(rng.randint(rate // 2, rate)):
                n += 1
                total = rng.lognormvariate(-0.8 if model == base_model.name else -0.3, 0.5)
                # No base model given: the page groups each record under the model it names.
                usage_record(tenant=tenant, request_id=f"r{n}", model=model,
                             api_key=keys[1] if n % 3 == 0 else keys[0], status="ok" if n % 17 else "error",
                             created=now - timedelta(hours=hour, minutes=rng.randint(0, 59)), total_time=total,
                             time_to_first_token=total / 5, prompt_tokens=rng.randint(20, 200),
                             completion_tokens=rng.randint(10, 120))

    wait = WebDriverWait(driver, 30, poll_frequency=0.1)
    sign_in(driver, live_server, user)
    driver.get(f"{live_server.url}/usage/")
    table = driver.find_element(By.ID, "usage-table")
    assert {"support-bot@2", "pirate@1", base_model.name} <= set(re.findall(r"[\w:@.-]+", table.text))
    assert len(driver.find_elements(By.CSS_SELECTOR, "svg path.series")) == 4 * 3  # 4 charts, 3 lines each
    full_page_screenshot(driver, ARTIFACTS / "usage-by-adapter.png")

    Select(driver.find_element(By.ID, "id_group")).select_by_value("key")
    driver.find_element(By.CSS_SELECTOR, "#usage-period button[type=submit]").click()
    wait.until(lambda _: "group=key" in driver.current_url)
    assert "production" in driver.find_element(By.ID, "usage-table").text
    full_page_screenshot(driver, ARTIFACTS / "usage-by-key.png")
    assert severe_errors(driver) == []


def test_a_pin_button_swapped_in_by_the_live_refresh_pins(driver, live_server, tenant_a, base_model, peft_dir, staff,  # noqa: F811
                                                          redis_client, run_on_commit):
    from selenium.webdriver.support.ui import WebDriverWait

    bot = upload(tenant_a[0], base_model, "support-bot", peft_dir, run_on_commit)
    beat_holding(redis_client, base_model.name, bot.sha256)
    wait = WebDriverWait(driver, 30, poll_frequency=0.1)

    def read(script: str):
        return driver.execute_script(script)

    def updates() -> int:
        return int(read("return document.getElementById('ops-live').dataset.updates"))

    def button() -> str:  # the row's button, looked up afresh each time: the fragment is replaced every 1.5 s
        return f"document.querySelector(\"tr[data-adapter='{bot.sha256}'] td.pin button\")"

    sign_in(driver, live_server, staff)
    driver.get(f"{live_server.url}/ops/?sort=-requests")
    wait.until(lambda _: updates() >= 2)  # the buttons on the page now came with a swapped-in fragment
    assert read(f"return {button()}.textContent.trim()") == "Pin"
    read(f"{button()}.click()")
    wait.until(lambda _: "Pinned tenant-a/support-bot@1" in read("return document.body.innerText"))
    assert driver.current_url.endswith("/ops/?sort=-requests#residency")
    assert AdapterVersion.objects.get(pk=bot.pk).pinned
    assert redis_client.smembers(PINNED_ADAPTERS_KEY) == {bot.sha256.encode()}
    full_page_screenshot(driver, ARTIFACTS / "ops-pinned.png")

    # A button with the keyboard's focus stays where it is: the refresh waits until it loses the focus.
    wait.until(lambda _: updates() >= 1 and read(f"return {button()}.textContent.trim()") == "Unpin")
    read(f"{button()}.focus()")
    held = updates()
    time.sleep(3.5)  # more than two refresh intervals
    assert updates() == held and read("return document.activeElement.textContent.trim()") == "Unpin"
    read("document.activeElement.blur()")
    wait.until(lambda _: updates() > held)
    assert severe_errors(driver) == []
