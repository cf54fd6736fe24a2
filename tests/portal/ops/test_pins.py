"""The dashboard's Pin and Unpin buttons: who may press them, CSRF, where they lead, what each row shows."""

from __future__ import annotations

import html as html_lib
import re
import time

import pytest
from django.test import Client

from engine_daemon import protocol
from engine_daemon.protocol import PINNED_ADAPTERS_KEY, Heartbeat
from portal.adapters import services
from portal.adapters.models import AdapterVersion
from tests.portal import factories
from tests.portal.ops.fleet import upload

pytestmark = pytest.mark.django_db
QUERY = "tenant=tenant-a&sort=-requests"


def beat_holding(redis_client, base_model: str, *shas: str, engine_pinned: bool = False) -> None:
    """A heartbeat, written as an engine writes it, of one engine holding these adapters in slots."""
    now = time.time()
    adapters = [{"name": sha, "tier": "gpu", "slot": slot, "requests": 1, "pinned": engine_pinned}
                for slot, sha in enumerate(shas)]
    beat = Heartbeat(engine_id="gpu-0", base_model=base_model, device="cuda:0", dtype="bfloat16", started=now - 60,
                     updated=now, adapters=adapters)
    redis_client.hset(protocol.heartbeat_key("gpu-0"), mapping=beat.to_redis())
    redis_client.zadd(protocol.ENGINES_KEY, {"gpu-0": now})


def pin_cell(html: str, sha: str) -> str:
    row = re.search(rf'<tr data-adapter="{sha}".*?</tr>', html, re.S)
    assert row, f"no row for {sha}"
    return re.search(r'<td class="pin" data-pin="\w+">.*?</td>', row.group(0), re.S).group(0)


def pin_state(html: str, sha: str) -> str:
    return re.search(r'data-pin="(\w+)"', pin_cell(html, sha)).group(1)


def pin_form(html: str, sha: str) -> dict[str, str]:
    """The one form of a row's pin cell: where it posts and what it sends."""
    (form,) = re.findall(r"<form .*?</form>", pin_cell(html, sha), re.S)
    fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', form))
    return {"action": html_lib.unescape(re.search(r'action="([^"]*)"', form).group(1)),
            "button": re.sub(r"<[^>]+>", "", re.search(r"<button.*?</button>", form, re.S).group(0)).strip(), **fields}


@pytest.fixture
def bot(tenant_a, base_model, peft_dir, run_on_commit, redis_client) -> AdapterVersion:
    version = upload(tenant_a[0], base_model, "support-bot", peft_dir, run_on_commit)
    beat_holding(redis_client, base_model.name, version.sha256)
    return version


def test_staff_pin_from_the_dashboard_and_come_back_to_the_same_view(staff_client, staff, bot, redis_client,
                                                                      run_on_commit):
    html = staff_client.get(f"/ops/?{QUERY}").content.decode()
    assert pin_state(html, bot.sha256) == "unpinned"
    form = pin_form(html, bot.sha256)
    assert form["action"] == f"/ops/versions/{bot.pk}/pin/?{QUERY}"
    assert form["button"] == "Pin" and form["pinned"] == "1" and form["csrfmiddlewaretoken"]

    with run_on_commit():
        response = staff_client.post(form["action"], {"pinned": form["pinned"]})
    assert response.status_code == 302 and response["Location"] == f"/ops/?{QUERY}#residency"
    bot.refresh_from_db()
    assert bot.pinned and bot.pinned_by == staff
    assert redis_client.smembers(PINNED_ADAPTERS_KEY) == {bot.sha256.encode()}

    page = staff_client.get(response["Location"]).content.decode()
    assert "Pinned tenant-a/support-bot@1: every engine keeps it on its device once loaded." in page
    cell = pin_cell(page, bot.sha256)
    assert pin_state(page, bot.sha256) == "pinned" and "pinned by operator" in cell
    assert pin_form(page, bot.sha256)["button"] == "Unpin" and pin_form(page, bot.sha256)["pinned"] == "0"
    assert "not pinned on this engine yet" in cell  # the engine's heartbeat says it has not applied the pin

    beat_holding(redis_client, bot.adapter.base_model.name, bot.sha256, engine_pinned=True)
    live = staff_client.get(f"/ops/live/?{QUERY}").content.decode()
    assert "not pinned on this engine yet" not in pin_cell(live, bot.sha256)
    row = re.search(rf'<tr data-adapter="{bot.sha256}".*?</tr>', live, re.S).group(0)
    assert "data-engine-pinned" in row  # the engine's own flag, beside the portal's

    with run_on_commit():
        response = staff_client.post(pin_form(live, bot.sha256)["action"], {"pinned": "0"}, follow=True)
    assert "Unpinned tenant-a/support-bot@1: the engines may evict it again." in response.content.decode()
    assert not AdapterVersion.objects.get(pk=bot.pk).pinned and redis_client.smembers(PINNED_ADAPTERS_KEY) == set()


def test_the_live_fragment_carries_forms_that_pass_the_csrf_check(staff, bot, run_on_commit):
    """The page swaps the fragment in every 1.5 s: the buttons it brings must post as the first page's did."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    client.get("/ops/")  # the page sets the CSRF cookie, as a browser's first visit does
    live = client.get(f"/ops/live/?{QUERY}").content.decode()
    form = pin_form(live, bot.sha256)

    refused = client.post(form["action"], {"pinned": "1"})  # no token: refused, nothing pinned
    assert refused.status_code == 403 and not AdapterVersion.objects.get(pk=bot.pk).pinned
    with run_on_commit():
        response = client.post(form["action"], {"pinned": "1", "csrfmiddlewaretoken": form["csrfmiddlewaretoken"]})
    assert response.status_code == 302 and AdapterVersion.objects.get(pk=bot.pk).pinned


def test_only_staff_may_pin(client, tenant_a, bot):
    url = f"/ops/versions/{bot.pk}/pin/"
    anonymous = client.post(url, {"pinned": "1"})
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/accounts/login/")
    member = Client()
    member.force_login(tenant_a[1])  # the tenant's owner, not staff
    response = member.post(url, {"pinned": "1"})
    assert response.status_code == 403 and b"for staff" in response.content
    assert not AdapterVersion.objects.get(pk=bot.pk).pinned


def test_pinning_is_a_post(staff_client, bot):
    assert staff_client.get(f"/ops/versions/{bot.pk}/pin/?pinned=1").status_code == 405
    assert not AdapterVersion.objects.get(pk=bot.pk).pinned


def test_bad_requests_say_what_to_send(staff_client, bot):
    bad = staff_client.post(f"/ops/versions/{bot.pk}/pin/", {"pinned": "yes"})
    assert bad.status_code == 400 and b"send pinned=1 to pin the version, or pinned=0 to unpin it" in bad.content
    gone = staff_client.post("/ops/versions/999999/pin/", {"pinned": "1"})
    assert gone.status_code == 404 and b"no adapter version 999999" in gone.content


def test_a_version_not_ready_has_no_button_and_is_refused(staff_client, tenant_a, base_model, peft_zip, bot,
                                                          redis_client):
    pending = services.adapter_version_create(adapter=bot.adapter, upload=factories.archive_upload(peft_zip))
    # An engine that holds content whose only version is not ready (as after a failed re-stage): nothing to pin.
    AdapterVersion.objects.filter(pk=pending.pk).update(sha256="e" * 64)
    beat_holding(redis_client, base_model.name, bot.sha256, "e" * 64)
    html = staff_client.get("/ops/").content.decode()
    assert pin_state(html, "e" * 64) == "none" and "<form" not in pin_cell(html, "e" * 64)

    response = staff_client.post(f"/ops/versions/{pending.pk}/pin/?{QUERY}", {"pinned": "1"},
                                 HTTP_REFERER=f"http://testserver/ops/?{QUERY}", follow=True)
    assert "support-bot@2 is pending; only a ready version can be pinned" in response.content.decode()
    assert not AdapterVersion.objects.get(pk=pending.pk).pinned
    assert redis_client.smembers(PINNED_ADAPTERS_KEY) == set()


def test_identical_uploads_show_each_pin_and_unpinning_one_says_the_other_holds(
    staff_client, tenant_b, base_model, peft_dir, bot, redis_client, run_on_commit
):
    twin = upload(tenant_b[0], base_model, "same-content", peft_dir, run_on_commit)
    assert twin.sha256 == bot.sha256
    with run_on_commit():
        for version in (bot, twin):
            services.adapter_version_pin_set(version=version, pinned=True, by=None)
    html = staff_client.get("/ops/").content.decode()
    buttons = [re.sub(r"<[^>]+>", "", b).strip() for b in re.findall(r"<button.*?</button>", pin_cell(html, bot.sha256), re.S)]
    assert buttons == ["Unpin tenant-a/support-bot@1", "Unpin tenant-b/same-content@1"]

    with run_on_commit():
        response = staff_client.post(f"/ops/versions/{bot.pk}/pin/", {"pinned": "0"}, follow=True)
    page = response.content.decode()
    assert "its content stays pinned on the engines for the identical upload tenant-b/same-content@1" in page
    assert redis_client.smembers(PINNED_ADAPTERS_KEY) == {bot.sha256.encode()}
    assert pin_form(page, bot.sha256)["action"] == f"/ops/versions/{twin.pk}/pin/"
