"""The HTML pages: login, adapters, keys; CSRF on every form."""

import pytest
from django.test import Client

from portal.adapters import services
from portal.adapters.models import Adapter
from portal.api_keys.models import TenantAPIKey
from portal.tenants.models import Membership
from portal.tenants.services import tenant_member_set
from tests.portal import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def browser(tenant_a):
    client = Client()
    client.force_login(tenant_a[1])
    return client


@pytest.fixture
def bot(tenant_a, base_model, peft_zip, run_on_commit):
    with run_on_commit():
        v1 = services.adapter_create(tenant=tenant_a[0], name="bot", base_model=base_model,
                                     upload=factories.archive_upload(peft_zip))
        services.adapter_version_create(adapter=v1.adapter, upload=factories.archive_upload(peft_zip))
    return v1.adapter


def test_pages_need_a_login(client, db):
    for url in ("/adapters/", "/adapters/new/", "/keys/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_login_and_logout(tenant_a):
    client = Client(enforce_csrf_checks=True)
    page = client.get("/accounts/login/")
    assert page.status_code == 200 and b'name="csrfmiddlewaretoken"' in page.content
    token = page.cookies["csrftoken"].value
    wrong = client.post("/accounts/login/", {"username": "alice", "password": "nope", "csrfmiddlewaretoken": token})
    assert b"did not match" in wrong.content
    response = client.post("/accounts/login/", {"username": "alice", "password": factories.PASSWORD, "csrfmiddlewaretoken": token})
    assert response.status_code == 302 and response["Location"] == "/adapters/"
    assert b"tenant-a" in client.get("/adapters/").content
    token = client.cookies["csrftoken"].value
    assert client.post("/accounts/logout/", {"csrfmiddlewaretoken": token}).status_code == 302
    assert client.get("/adapters/").status_code == 302


def test_forms_need_the_csrf_token(tenant_a, bot):
    client = Client(enforce_csrf_checks=True)
    client.force_login(tenant_a[1])
    assert client.post("/adapters/bot/delete/").status_code == 403
    assert client.post("/keys/new/", {"name": "x", "scopes": ["inference"]}).status_code == 403
    assert Adapter.objects.filter(name="bot").exists() and not TenantAPIKey.objects.exists()


def test_adapter_list_and_detail(browser, bot):
    listing = browser.get("/adapters/").content.decode()
    assert 'href="/adapters/bot/"' in listing and "bot@2" in listing
    detail = browser.get("/adapters/bot/").content.decode()
    assert 'id="version-2"' in detail and 'id="version-1"' in detail
    assert "Roll back to @1" in detail and "r=4 · q_proj, v_proj" in detail
    assert "data-status-url" not in detail  # nothing left to follow


def test_a_version_in_progress_is_followed_live(browser, bot, peft_zip):
    services.adapter_version_create(adapter=bot, upload=factories.archive_upload(peft_zip))
    detail = browser.get("/adapters/bot/").content.decode()
    assert 'data-status-url="/api/v1/adapters/bot/versions/3"' in detail


def test_upload_pages_post_to_the_api(browser, bot):
    new = browser.get("/adapters/new/").content.decode()
    assert 'action="/api/v1/adapters"' in new and 'name="name"' in new and "data-upload" in new
    version = browser.get("/adapters/bot/upload/").content.decode()
    assert 'action="/api/v1/adapters/bot/versions"' in version and 'name="name"' not in version


def test_roll_back_promote_and_delete(browser, bot):
    response = browser.post("/adapters/bot/default/", {"version": "1"}, HTTP_REFERER="http://testserver/adapters/bot/")
    assert response.status_code == 302
    assert Adapter.objects.get(pk=bot.pk).default_version.number == 1
    assert "bot@1 is now the default" in browser.get("/adapters/bot/").content.decode()

    bad = browser.post("/adapters/bot/default/", {"version": "9"}, HTTP_REFERER="http://testserver/adapters/bot/")
    assert bad.status_code == 404

    assert browser.post("/adapters/bot/delete/")["Location"] == "/adapters/"
    assert not Adapter.objects.filter(pk=bot.pk).exists()


def test_a_refused_action_goes_back_with_its_message(browser, bot, peft_zip):
    services.adapter_version_create(adapter=bot, upload=factories.archive_upload(peft_zip))  # v3, pending
    response = browser.post("/adapters/bot/default/", {"version": "3"}, HTTP_REFERER="http://testserver/adapters/bot/")
    assert response.status_code == 302 and response["Location"] == "http://testserver/adapters/bot/"
    assert "only a ready version can be the default" in browser.get("/adapters/bot/").content.decode()


def test_members_see_no_manage_buttons_and_cannot_post_them(tenant_a, bot):
    member = factories.user_create("mia")
    tenant_member_set(tenant=tenant_a[0], user=member, role=Membership.Role.MEMBER)
    client = Client()
    client.force_login(member)
    detail = client.get("/adapters/bot/").content.decode()
    assert "Roll back" not in detail and "Delete bot" not in detail
    assert client.post("/adapters/bot/delete/").status_code == 403
    assert client.get("/keys/").status_code == 403


def test_api_keys_page_shows_a_new_secret_once(browser, tenant_a):
    response = browser.post("/keys/new/", {"name": "laptop", "scopes": ["inference", "manage"]})
    assert response.status_code == 201
    page = response.content.decode()
    key = TenantAPIKey.objects.get(name="laptop")
    secret = page.split('id="new-key-secret">')[1].split("<")[0]
    assert secret.startswith(key.prefix + ".") and "no-store" in response["Cache-Control"]
    later = browser.get("/keys/").content.decode()
    assert key.prefix in later and secret not in later

    assert browser.post("/keys/new/", {"name": "", "scopes": []}).status_code == 400
    browser.post(f"/keys/{key.prefix}/revoke/")
    assert TenantAPIKey.objects.get(pk=key.pk).revoked
    assert "revoked" in browser.get("/keys/").content.decode()


def test_switching_tenants(browser, tenant_a, tenant_b, bot):
    tenant_member_set(tenant=tenant_b[0], user=tenant_a[1], role=Membership.Role.MEMBER)
    assert "bot" in browser.get("/adapters/").content.decode()
    browser.post("/tenant/switch/", {"tenant": "tenant-b"})
    assert 'href="/adapters/bot/"' not in browser.get("/adapters/").content.decode()
    assert browser.get("/adapters/bot/").status_code == 404
    browser.post("/tenant/switch/", {"tenant": "not-mine"})  # ignored
    assert browser.get("/adapters/bot/").status_code == 404


def test_a_user_in_no_tenant_is_told_what_to_do(db):
    client = Client()
    client.force_login(factories.user_create("loner"))
    response = client.get("/adapters/")
    assert response.status_code == 403 and b"belongs to no tenant" in response.content


def test_static_files_are_served_by_the_project(client):
    for path in ("/static/portal/app.js", "/static/portal/app.css"):
        response = client.get(path)
        assert response.status_code == 200
        body = b"".join(response.streaming_content) if response.streaming else response.content
        assert b"http" not in body.replace(b"XMLHttpRequest", b"")  # nothing fetched from elsewhere


def test_staff_see_everything_in_the_admin(tenant_a, tenant_b, bot):
    admin_user = factories.user_create("root", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(admin_user)
    for url in ("/admin/tenants/tenant/", "/admin/tenants/membership/", "/admin/base_models/basemodel/",
                "/admin/adapters/adapter/", "/admin/adapters/adapterversion/", "/admin/api_keys/tenantapikey/",
                f"/admin/adapters/adapter/{bot.pk}/change/"):
        assert client.get(url).status_code == 200, url
    assert b"tenant-b" in client.get("/admin/tenants/tenant/").content
