"""Staff pin adapter versions on the engines' devices: the row, the set the engines read at start, the events."""

import pytest
from django.db import transaction
from django.test import Client

from engine_daemon.protocol import CONTROL_STREAM, PINNED_ADAPTERS_KEY, ControlEvent
from portal.adapters import services, staging
from portal.adapters.errors import AdapterRejected
from portal.adapters.models import AdapterVersion
from portal.common.errors import NOT_READY, UNAVAILABLE
from tests.portal import factories

Status = AdapterVersion.Status
pytestmark = pytest.mark.django_db


def control_events(redis_client) -> list[ControlEvent]:
    return [ControlEvent.from_redis(fields) for _id, fields in redis_client.xrange(CONTROL_STREAM)]


def pinned_set(redis_client) -> set[str]:
    return {member.decode() for member in redis_client.smembers(PINNED_ADAPTERS_KEY)}


def ready(tenant, base_model, upload, run_on_commit, name="support-bot") -> AdapterVersion:
    with run_on_commit():
        version = services.adapter_create(tenant=tenant, name=name, base_model=base_model, upload=upload)
    version.refresh_from_db()
    assert version.status == Status.READY, version.error
    return version


def pin(version, run_on_commit, *, pinned=True, by=None) -> AdapterVersion:
    with run_on_commit():
        return services.adapter_version_pin_set(version=version, pinned=pinned, by=by)


@pytest.fixture
def operator(db):
    return factories.user_create("operator", is_staff=True)


def test_pin_and_unpin_tell_the_engines_once_committed(tenant_a, base_model, peft_zip, run_on_commit, redis_client,
                                                       operator):
    tenant = tenant_a[0]
    version = ready(tenant, base_model, factories.archive_upload(peft_zip), run_on_commit)
    redis_client.delete(CONTROL_STREAM)  # the staged event

    with run_on_commit():
        services.adapter_version_pin_set(version=version, pinned=True, by=operator)
        assert pinned_set(redis_client) == set() and control_events(redis_client) == []  # not before the commit
    version.refresh_from_db()
    assert version.pinned and version.pinned_by == operator and version.pinned_at is not None
    assert pinned_set(redis_client) == {version.sha256}
    (event,) = control_events(redis_client)
    assert (event.action, event.sha256, event.adapter) == (ControlEvent.ADAPTER_PINNED, version.sha256, "support-bot@1")
    assert (event.tenant_id, event.base_model) == (str(tenant.pk), base_model.name)

    first_pinned_at = version.pinned_at
    pin(version, run_on_commit, by=factories.user_create("another", is_staff=True))  # again: told again, row as it was
    version.refresh_from_db()
    assert version.pinned_by == operator and version.pinned_at == first_pinned_at
    assert [e.action for e in control_events(redis_client)] == [ControlEvent.ADAPTER_PINNED] * 2

    pin(version, run_on_commit, pinned=False, by=operator)
    version.refresh_from_db()
    assert not version.pinned and version.pinned_by is None and version.pinned_at is None
    assert pinned_set(redis_client) == set()
    event = control_events(redis_client)[-1]
    assert (event.action, event.sha256, event.adapter) == (ControlEvent.ADAPTER_UNPINNED, version.sha256, "support-bot@1")
    assert (event.tenant_id, event.base_model) == (str(tenant.pk), base_model.name)


def test_a_pin_rolled_back_tells_nobody(tenant_a, base_model, peft_zip, run_on_commit, redis_client):
    version = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit)
    redis_client.delete(CONTROL_STREAM)
    with run_on_commit(), pytest.raises(RuntimeError), transaction.atomic():
        services.adapter_version_pin_set(version=version, pinned=True, by=None)
        raise RuntimeError("the caller's transaction fails after the pin")
    version.refresh_from_db()
    assert not version.pinned
    assert pinned_set(redis_client) == set() and control_events(redis_client) == []


@pytest.mark.parametrize("status", [Status.PENDING, Status.VALIDATING, Status.REJECTED])
def test_only_a_ready_version_can_be_pinned(tenant_a, base_model, peft_zip, redis_client, run_on_commit, status):
    version = services.adapter_create(tenant=tenant_a[0], name="support-bot", base_model=base_model,
                                      upload=factories.archive_upload(peft_zip))  # not committed: never validated
    AdapterVersion.objects.filter(pk=version.pk).update(status=status)
    with pytest.raises(AdapterRejected) as refused, run_on_commit():
        services.adapter_version_pin_set(version=version, pinned=True, by=None)
    assert refused.value.code == NOT_READY
    assert f"support-bot@1 is {status}; only a ready version can be pinned" in refused.value.message
    version.refresh_from_db()
    assert not version.pinned
    assert pinned_set(redis_client) == set() and control_events(redis_client) == []


def test_identical_uploads_share_one_pin_until_both_are_unpinned(tenant_a, tenant_b, base_model, peft_zip,
                                                               run_on_commit, redis_client):
    mine = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit, name="one")
    theirs = ready(tenant_b[0], base_model, factories.archive_upload(peft_zip), run_on_commit, name="same-content")
    assert mine.sha256 == theirs.sha256
    sha = mine.sha256
    redis_client.delete(CONTROL_STREAM)

    pin(mine, run_on_commit)
    pin(theirs, run_on_commit)  # already in the set: fine, and the engines hear it again
    assert pinned_set(redis_client) == {sha}
    assert [(e.action, e.adapter) for e in control_events(redis_client)] == [
        (ControlEvent.ADAPTER_PINNED, "one@1"), (ControlEvent.ADAPTER_PINNED, "same-content@1")
    ]

    pin(mine, run_on_commit, pinned=False)  # tenant B's version still holds the content pinned
    assert pinned_set(redis_client) == {sha} and len(control_events(redis_client)) == 2
    assert AdapterVersion.objects.get(pk=theirs.pk).pinned and not AdapterVersion.objects.get(pk=mine.pk).pinned

    pin(theirs, run_on_commit, pinned=False)
    assert pinned_set(redis_client) == set()
    event = control_events(redis_client)[-1]
    assert (event.action, event.sha256, event.adapter, event.tenant_id) == (
        ControlEvent.ADAPTER_UNPINNED, sha, "same-content@1", str(tenant_b[0].pk)
    )


def test_a_pin_saved_while_redis_is_down_says_so(tenant_a, base_model, peft_zip, run_on_commit, settings):
    version = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit)
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    with pytest.raises(AdapterRejected) as refused, run_on_commit():
        services.adapter_version_pin_set(version=version, pinned=True, by=None)
    assert refused.value.code == UNAVAILABLE
    assert "the pin is saved, but the engines were not told" in refused.value.message
    assert "pin it again once Redis answers" in refused.value.message
    assert AdapterVersion.objects.get(pk=version.pk).pinned


def test_deleting_a_pinned_adapter_takes_its_content_out_of_the_set(tenant_a, base_model, peft_zip, run_on_commit,
                                                                    redis_client, settings):
    version = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit)
    pin(version, run_on_commit)
    redis_client.sadd(PINNED_ADAPTERS_KEY, "f" * 64)  # another content, pinned: it stays
    redis_client.delete(CONTROL_STREAM)

    with run_on_commit():
        services.adapter_delete(adapter=version.adapter)

    assert not (settings.ADAPTER_CACHE_DIR / version.sha256).exists()
    assert pinned_set(redis_client) == {"f" * 64}
    (event,) = control_events(redis_client)  # the engines drop the content altogether
    assert (event.action, event.sha256) == (ControlEvent.ADAPTER_DELETED, version.sha256)


def test_deleting_a_pinned_twin_unpins_the_content_an_unpinned_twin_keeps(
    tenant_a, tenant_b, base_model, peft_zip, run_on_commit, redis_client
):
    mine = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit, name="one")
    theirs = ready(tenant_b[0], base_model, factories.archive_upload(peft_zip), run_on_commit, name="same-content")
    pin(mine, run_on_commit)
    redis_client.delete(CONTROL_STREAM)

    with run_on_commit():
        services.adapter_delete(adapter=mine.adapter)

    assert staging.cache_dir_is_complete(theirs.sha256)  # tenant B still serves that content, unpinned now
    assert pinned_set(redis_client) == set()
    (event,) = control_events(redis_client)
    assert (event.action, event.sha256, event.adapter, event.tenant_id) == (
        ControlEvent.ADAPTER_UNPINNED, theirs.sha256, "one", str(tenant_a[0].pk)
    )


def test_deleting_an_unpinned_twin_leaves_the_pin_of_the_other(tenant_a, tenant_b, base_model, peft_zip,
                                                             run_on_commit, redis_client):
    mine = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit, name="one")
    theirs = ready(tenant_b[0], base_model, factories.archive_upload(peft_zip), run_on_commit, name="same-content")
    pin(theirs, run_on_commit)
    redis_client.delete(CONTROL_STREAM)

    with run_on_commit():
        services.adapter_delete(adapter=mine.adapter)

    assert pinned_set(redis_client) == {theirs.sha256}
    assert control_events(redis_client) == []


def test_the_admin_actions_pin_and_unpin_through_the_service(tenant_a, base_model, peft_zip, peft_dir_v2,
                                                              run_on_commit, redis_client):
    good = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit)
    pending = services.adapter_version_create(adapter=good.adapter, upload=factories.parts_upload(peft_dir_v2))
    admin = factories.user_create("root", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(admin)
    url = "/admin/adapters/adapterversion/"

    with run_on_commit():
        response = client.post(url, {"action": "pin_on_devices", "_selected_action": [good.pk, pending.pk]},
                               follow=True)
    page = response.content.decode()
    assert response.status_code == 200
    assert "Pinned tenant-a/support-bot@1 on the engines&#x27; devices." in page
    assert "support-bot@2 is pending; only a ready version can be pinned" in page
    good.refresh_from_db(), pending.refresh_from_db()
    assert good.pinned and good.pinned_by == admin and not pending.pinned
    assert pinned_set(redis_client) == {good.sha256}
    assert "Pin on the engines&#x27; devices" in client.get(url).content.decode()

    with run_on_commit():
        client.post(url, {"action": "unpin_from_devices", "_selected_action": [good.pk]})
    good.refresh_from_db()
    assert not good.pinned and pinned_set(redis_client) == set()
    assert control_events(redis_client)[-1].action == ControlEvent.ADAPTER_UNPINNED


def test_a_staff_user_without_the_change_permission_gets_no_pin_action(db):
    viewer = factories.user_create("viewer", is_staff=True)
    from django.contrib.auth.models import Permission

    viewer.user_permissions.add(Permission.objects.get(codename="view_adapterversion"))
    client = Client()
    client.force_login(viewer)
    page = client.get("/admin/adapters/adapterversion/")
    assert page.status_code == 200
    assert "pin_on_devices" not in page.content.decode()


def test_a_pinned_set_redis_lost_is_rebuilt_and_the_engines_told(tenant_a, tenant_b, base_model, peft_zip,
                                                                  peft_dir_v2, run_on_commit, redis_client):
    twin = ready(tenant_b[0], base_model, factories.archive_upload(peft_zip), run_on_commit, name="unpinned-twin")
    one = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit, name="one")
    two = ready(tenant_a[0], base_model, factories.parts_upload(peft_dir_v2), run_on_commit, name="two")
    pin(one, run_on_commit)
    pin(two, run_on_commit)
    redis_client.delete(PINNED_ADAPTERS_KEY, CONTROL_STREAM)  # Redis restarted without persistence

    added, removed = services.adapter_pins_sync()

    assert added == sorted({one.sha256, two.sha256}) and removed == []
    assert pinned_set(redis_client) == {one.sha256, two.sha256}
    events = {e.sha256: e for e in control_events(redis_client)}
    assert set(events) == {one.sha256, two.sha256} and len(control_events(redis_client)) == 2
    for version in (one, two):  # named after the pinned version, not its older unpinned twin
        event = events[version.sha256]
        assert (event.action, event.adapter, event.tenant_id, event.base_model) == (
            ControlEvent.ADAPTER_PINNED, version.model_id, str(tenant_a[0].pk), base_model.name
        )
    assert twin.sha256 == one.sha256 and twin.pk < one.pk


def test_content_nobody_pins_leaves_the_set_with_an_event(tenant_a, base_model, peft_zip, peft_dir_v2,
                                                          run_on_commit, redis_client):
    kept = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit, name="kept")
    unpinned = ready(tenant_a[0], base_model, factories.parts_upload(peft_dir_v2), run_on_commit, name="unpinned")
    pin(kept, run_on_commit)
    stray = "f" * 64  # no version has it
    redis_client.sadd(PINNED_ADAPTERS_KEY, stray, unpinned.sha256)  # an unpin whose SREM was lost, and a stray
    redis_client.delete(CONTROL_STREAM)

    added, removed = services.adapter_pins_sync()

    assert added == [] and removed == sorted([stray, unpinned.sha256])
    assert pinned_set(redis_client) == {kept.sha256}
    events = {e.sha256: e for e in control_events(redis_client)}
    assert len(control_events(redis_client)) == 2
    assert (events[unpinned.sha256].action, events[unpinned.sha256].adapter, events[unpinned.sha256].base_model) == (
        ControlEvent.ADAPTER_UNPINNED, "unpinned@1", base_model.name
    )
    assert (events[stray].action, events[stray].adapter, events[stray].base_model) == (
        ControlEvent.ADAPTER_UNPINNED, None, None  # every engine hears it, whatever its base model
    )


def test_a_set_in_step_publishes_nothing(tenant_a, base_model, peft_zip, run_on_commit, redis_client):
    assert services.adapter_pins_sync() == ([], [])  # nothing pinned, nothing listed
    version = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit)
    pin(version, run_on_commit)
    redis_client.delete(CONTROL_STREAM)

    assert services.adapter_pins_sync() == ([], [])
    assert pinned_set(redis_client) == {version.sha256} and control_events(redis_client) == []


def test_a_pin_applied_between_the_read_and_the_lock_is_not_told_again(tenant_a, base_model, peft_zip, run_on_commit,
                                                                       redis_client, monkeypatch):
    version = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit)
    pin(version, run_on_commit)
    redis_client.delete(CONTROL_STREAM)
    monkeypatch.setattr(staging, "pinned_adapters", lambda: set())  # read just before the pin reached Redis

    assert services.adapter_pins_sync() == ([], [])
    assert pinned_set(redis_client) == {version.sha256} and control_events(redis_client) == []


def test_the_command_prints_what_it_changed(tenant_a, base_model, peft_zip, run_on_commit, redis_client):
    from io import StringIO

    from django.core.management import call_command

    def sync() -> list[str]:
        out = StringIO()
        call_command("adapter_pins_sync", stdout=out)
        return out.getvalue().splitlines()

    version = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit)
    pin(version, run_on_commit)
    redis_client.delete(PINNED_ADAPTERS_KEY)
    redis_client.sadd(PINNED_ADAPTERS_KEY, "f" * 64)

    assert sync() == [f"pinned   {version.sha256}", f"unpinned {'f' * 64}", "lf:pinned: added 1, removed 1 sha256(s)"]
    assert pinned_set(redis_client) == {version.sha256}
    assert sync() == ["lf:pinned: added 0, removed 0 sha256(s)"]


def test_the_command_says_when_redis_does_not_answer(settings):
    from django.core.management import CommandError, call_command

    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    with pytest.raises(CommandError, match="Redis did not answer .*; run it again once Redis answers"):
        call_command("adapter_pins_sync")


def test_beat_heals_the_set_every_five_minutes(tenant_a, base_model, peft_zip, run_on_commit, redis_client):
    from portal.adapters import tasks
    from portal.celery import app

    (entry,) = [e for e in app.conf.beat_schedule.values() if e["task"] == tasks.sync_adapter_pins.name]
    assert entry["schedule"] == 300
    assert tasks.sync_adapter_pins.name in app.tasks and tasks.sync_adapter_pins.acks_late is True

    version = ready(tenant_a[0], base_model, factories.archive_upload(peft_zip), run_on_commit)
    pin(version, run_on_commit)
    redis_client.delete(PINNED_ADAPTERS_KEY)
    tasks.sync_adapter_pins.delay()
    assert pinned_set(redis_client) == {version.sha256}
