"""Only owners and admins move an adapter's default version, by upload or by hand; a member's first
version of a new adapter is the exception (there is no default to move)."""

import pytest
from django.test import Client
from rest_framework.test import APIClient

from portal.adapters import services
from portal.adapters.errors import AdapterRejected
from portal.adapters.models import Adapter, AdapterVersion
from portal.tenants.models import Membership
from tests.portal import factories

pytestmark = pytest.mark.django_db
Role = Membership.Role
API = "/api/v1/adapters"


@pytest.fixture
def member(tenant_a):
    return factories.user_in(tenant_a[0], role=Role.MEMBER, username="mia")


@pytest.fixture
def admin(tenant_a):
    return factories.user_in(tenant_a[0], role=Role.ADMIN, username="ada")


@pytest.fixture
def bot(tenant_a, base_model, peft_zip, run_on_commit):
    """An adapter whose version 1 is ready and the default."""
    with run_on_commit():
        version = services.adapter_create(
            tenant=tenant_a[0], name="bot", base_model=base_model, upload=factories.archive_upload(peft_zip)
        )
    return Adapter.objects.get(pk=version.adapter_id)


def session_api(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


def stored_files(settings) -> list:
    return sorted(p for p in (settings.MEDIA_ROOT / "adapters").rglob("*") if p.is_file())


def default_number(adapter: Adapter) -> int:
    return Adapter.objects.get(pk=adapter.pk).default_version.number


# ---- the decision


@pytest.mark.parametrize(
    ("role", "first_version", "promote", "expected"),
    [
        (Role.OWNER, False, None, True),
        (Role.ADMIN, False, None, True),
        (Role.ADMIN, False, False, False),
        (Role.ADMIN, False, True, True),
        (Role.MEMBER, False, None, False),
        (Role.MEMBER, False, False, False),
        (Role.MEMBER, True, None, True),
        (Role.MEMBER, True, True, True),
        (Role.MEMBER, True, False, False),
    ],
)
def test_promote_resolves_by_role(bot, role, first_version, promote, expected):
    adapter = None if first_version else bot
    assert services.adapter_upload_promote(role=role, adapter=adapter, promote=promote) is expected


def test_a_member_asking_to_move_the_default_is_refused_naming_the_role(bot):
    with pytest.raises(AdapterRejected) as refused:
        services.adapter_upload_promote(role=Role.MEMBER, adapter=bot, promote=True)
    assert refused.value.code == "forbidden" and refused.value.http_status == 403
    assert refused.value.message == (
        "moving the default version needs the admin role in tenant tenant-a; you are member: "
        "upload without promote, and ask an admin to promote it"
    )


# ---- services


def test_a_members_upload_does_not_move_the_default(bot, member, peft_dir_v2, run_on_commit):
    with run_on_commit():
        version = services.adapter_version_create(
            adapter=bot, upload=factories.parts_upload(peft_dir_v2), uploaded_by=member, role=Role.MEMBER
        )
    version.refresh_from_db()
    assert version.status == AdapterVersion.Status.READY and version.promote_when_ready is False
    assert default_number(bot) == 1


def test_a_member_sending_promote_stores_nothing(bot, member, peft_zip, settings):
    before = stored_files(settings)
    with pytest.raises(AdapterRejected, match="you are member"):
        services.adapter_version_create(
            adapter=bot, upload=factories.archive_upload(peft_zip), uploaded_by=member, role=Role.MEMBER, promote=True
        )
    assert list(bot.versions.values_list("number", flat=True)) == [1]
    assert stored_files(settings) == before


def test_an_admins_upload_moves_the_default_unless_told_not_to(bot, admin, peft_zip, peft_dir_v2, run_on_commit):
    with run_on_commit():
        services.adapter_version_create(adapter=bot, upload=factories.parts_upload(peft_dir_v2), role=Role.ADMIN)
    assert default_number(bot) == 2
    with run_on_commit():
        services.adapter_version_create(
            adapter=bot, upload=factories.archive_upload(peft_zip), role=Role.ADMIN, promote=False
        )
    assert default_number(bot) == 2


def test_a_members_first_version_of_a_new_adapter_becomes_the_default(tenant_a, base_model, member, peft_zip, run_on_commit):
    with run_on_commit():
        version = services.adapter_create(
            tenant=tenant_a[0], name="mine", base_model=base_model, upload=factories.archive_upload(peft_zip),
            uploaded_by=member, role=Role.MEMBER,
        )
    assert Adapter.objects.get(pk=version.adapter_id).default_version_id == version.pk


# ---- REST API


def test_api_a_members_upload_is_kept_off_the_default(bot, member, peft_dir_v2, run_on_commit):
    client = session_api(member)
    with run_on_commit():
        response = client.post(f"{API}/bot/versions", {
            "adapter_config": factories.uploaded(peft_dir_v2 / "adapter_config.json"),
            "adapter_model": factories.uploaded(peft_dir_v2 / "adapter_model.safetensors"),
        })
    assert response.status_code == 202, response.content
    assert response.json()["uploaded_by"] == "mia"
    detail = client.get(f"{API}/bot").json()
    assert detail["default_version"] == 1
    assert [(v["version"], v["status"], v["is_default"]) for v in detail["versions"]] == [
        (2, "ready", False), (1, "ready", True)
    ]


def test_api_a_member_sending_promote_true_gets_403(bot, member, peft_zip, settings):
    before = stored_files(settings)
    response = session_api(member).post(
        f"{API}/bot/versions", {"archive": factories.uploaded(peft_zip), "promote": "true"}
    )
    assert response.status_code == 403
    assert response.json() == {
        "detail": "moving the default version needs the admin role in tenant tenant-a; you are member: "
        "upload without promote, and ask an admin to promote it",
        "code": "forbidden",
    }
    assert bot.versions.count() == 1 and stored_files(settings) == before


@pytest.mark.parametrize(("sent", "promoted"), [({}, True), ({"promote": "true"}, True), ({"promote": "false"}, False)])
def test_api_an_admins_upload_is_promoted_by_default_or_when_asked(bot, admin, peft_zip, sent, promoted):
    response = session_api(admin).post(f"{API}/bot/versions", {"archive": factories.uploaded(peft_zip), **sent})
    assert response.status_code == 202, response.content
    assert AdapterVersion.objects.get(adapter=bot, number=2).promote_when_ready is promoted


def test_api_keys_act_as_admins(bot, key_client, peft_zip):
    assert key_client.post(f"{API}/bot/versions", {"archive": factories.uploaded(peft_zip)}).status_code == 202
    assert AdapterVersion.objects.get(adapter=bot, number=2).promote_when_ready is True


def test_api_a_members_new_adapter_gets_its_first_version_as_default(tenant_a, base_model, member, peft_zip, run_on_commit):
    client = session_api(member)
    with run_on_commit():
        response = client.post(API, {"name": "mine", "archive": factories.uploaded(peft_zip)})
    assert response.status_code == 202, response.content
    assert client.get(f"{API}/mine").json()["default_version"] == 1


def test_setting_the_default_by_hand_needs_an_admin(bot, member, admin):
    refused = session_api(member).post(f"{API}/bot/default", {"version": 1}, format="json")
    assert refused.status_code == 403 and "needs the admin role" in refused.json()["detail"]
    assert session_api(admin).post(f"{API}/bot/default", {"version": 1}, format="json").status_code == 200


# ---- the upload page


def page(user, url: str) -> str:
    client = Client()
    client.force_login(user)
    return client.get(url).content.decode()


def test_the_upload_page_offers_promote_only_to_who_may_use_it(bot, member, admin):
    for_member = page(member, "/adapters/bot/upload/")
    assert 'name="promote"' not in for_member
    assert "the default stays <code>bot@1</code>: moving it needs the admin role" in for_member
    assert 'name="promote"' in page(admin, "/adapters/bot/upload/")
    assert 'name="promote"' in page(member, "/adapters/new/")  # a new adapter has no default to move
