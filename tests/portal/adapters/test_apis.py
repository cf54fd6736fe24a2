import pytest
from django.core.files.uploadedfile import SimpleUploadedFile, TemporaryUploadedFile
from django.test import RequestFactory
from rest_framework.test import APIClient

from portal.adapters.models import Adapter, AdapterVersion
from portal.adapters.uploads import adapter_upload_from_request
from tests.portal import factories

pytestmark = pytest.mark.django_db
API = "/api/v1/adapters"


def archive(path, name="adapter.zip"):
    return SimpleUploadedFile(name, path.read_bytes())


def test_create_from_an_archive_returns_202_and_the_version_becomes_ready(key_client, base_model, peft_zip, run_on_commit):
    with run_on_commit():
        response = key_client.post(API, {"name": "support-bot", "description": "helps", "archive": archive(peft_zip)})
    assert response.status_code == 202, response.content
    body = response.json()
    assert (body["adapter"], body["version"], body["model"], body["status"]) == ("support-bot", 1, "support-bot@1", "pending")
    assert response["Location"] == body["url"] == f"{API}/support-bot/versions/1"
    assert body["uploaded_by"] == "API key test key"

    version = key_client.get(body["url"]).json()
    assert version["status"] == "ready", version["error"]
    assert version["is_default"] is True
    assert version["manifest"]["rank"] == 4 and len(version["sha256"]) == 64


def test_create_from_two_parts_and_upload_a_second_version(key_client, base_model, peft_dir, peft_dir_v2, run_on_commit):
    with run_on_commit():
        first = key_client.post(API, {
            "name": "parts",
            "adapter_config": archive(peft_dir / "adapter_config.json", "adapter_config.json"),
            "adapter_model": archive(peft_dir / "adapter_model.safetensors", "adapter_model.safetensors"),
        })
        second = key_client.post(f"{API}/parts/versions", {
            "adapter_config": archive(peft_dir_v2 / "adapter_config.json", "adapter_config.json"),
            "adapter_model": archive(peft_dir_v2 / "adapter_model.safetensors", "adapter_model.safetensors"),
            "promote": "false",
        })
    assert (first.status_code, second.status_code) == (202, 202), second.content
    detail = key_client.get(f"{API}/parts").json()
    assert detail["default_version"] == 1  # the second was uploaded with promote=false
    assert [(v["version"], v["status"], v["is_default"]) for v in detail["versions"]] == [
        (2, "ready", False), (1, "ready", True)
    ]
    assert detail["versions"][0]["manifest"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"name": "x"}, 400, "send the adapter"),
        ({"name": "x", "adapter_config": "cfg"}, 400, "send the adapter"),
        ({"name": "x", "archive": "zip", "adapter_model": "weights"}, 400, "not both"),
        ({"archive": "zip"}, 400, "name"),
        ({"name": "Not A Slug", "archive": "zip"}, 400, "not valid"),
        ({"name": "x", "archive": "zip", "base_model": "nope"}, 400, "not served here"),
    ],
)
def test_create_refuses_malformed_requests(key_client, base_model, fields, status, message, peft_zip, peft_dir):
    files = {"zip": archive(peft_zip), "cfg": archive(peft_dir / "adapter_config.json"), "weights": archive(peft_zip)}
    data = {k: files.get(v, v) for k, v in fields.items()}
    response = key_client.post(API, data)
    assert response.status_code == status
    assert message in response.content.decode()
    assert not Adapter.objects.exists()


def test_create_needs_a_base_model_registered(key_client, peft_zip):
    response = key_client.post(API, {"name": "x", "archive": archive(peft_zip)})
    assert response.status_code == 400
    assert "register_base_model" in response.json()["detail"]


def test_create_with_a_taken_name_is_a_conflict(key_client, base_model, peft_zip):
    assert key_client.post(API, {"name": "dup", "archive": archive(peft_zip)}).status_code == 202
    response = key_client.post(API, {"name": "dup", "archive": archive(peft_zip)})
    assert response.status_code == 409
    assert response.json() == {
        "detail": "adapter 'dup' already exists; upload a new version with POST /api/v1/adapters/dup/versions",
        "code": "conflict",
    }


def test_list_is_paginated_and_shows_the_latest_status(key_client, tenant_a, base_model, peft_zip):
    for i in range(3):
        key_client.post(API, {"name": f"a{i}", "archive": archive(peft_zip)})
    body = key_client.get(API).json()
    assert body["count"] == 3 and body["next"] is None
    assert [a["name"] for a in body["results"]] == ["a0", "a1", "a2"]
    assert body["results"][0] | {"created_at": None, "updated_at": None} == {
        "name": "a0", "description": "", "base_model": "random:tiny", "default_version": None,
        "created_at": None, "updated_at": None, "version_count": 1, "latest_version": 1, "latest_status": "pending",
    }
    page = key_client.get(API, {"page": 2})
    assert page.status_code == 404  # past the last page


def test_the_schema_documents_the_list_as_a_page(api_client):
    operation = api_client.get("/api/schema/", HTTP_ACCEPT="application/json").json()["paths"][API]["get"]
    assert [p["name"] for p in operation["parameters"]] == ["page"]
    page = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert page == {"$ref": "#/components/schemas/PaginatedAdapterListItemOutputList"}


def test_promote_roll_back_and_the_errors_around_them(key_client, base_model, peft_zip, peft_dir_v2, run_on_commit):
    with run_on_commit():
        key_client.post(API, {"name": "bot", "archive": archive(peft_zip)})
        key_client.post(f"{API}/bot/versions", {"archive": archive(peft_zip)})
    key_client.post(f"{API}/bot/versions", {"archive": archive(peft_zip)})  # v3 stays pending

    assert key_client.post(f"{API}/bot/default", {"version": 1}, format="json").json()["default_version"] == 1
    assert key_client.post(f"{API}/bot/default", {"version": 2}, format="json").json()["default_version"] == 2
    pending = key_client.post(f"{API}/bot/default", {"version": 3}, format="json")
    assert (pending.status_code, pending.json()["code"]) == (409, "not_ready")
    missing = key_client.post(f"{API}/bot/default", {"version": 7}, format="json")
    assert missing.status_code == 404
    assert key_client.post(f"{API}/bot/default", {"version": "x"}, format="json").status_code == 400


def test_delete(key_client, base_model, peft_zip, run_on_commit):
    with run_on_commit():
        key_client.post(API, {"name": "gone", "archive": archive(peft_zip)})
        assert key_client.delete(f"{API}/gone").status_code == 204
    assert key_client.get(f"{API}/gone").status_code == 404
    assert key_client.get(f"{API}/gone/versions/1").status_code == 404
    assert not AdapterVersion.objects.exists()


def test_authentication(api_client, tenant_a, base_model):
    assert api_client.get(API).status_code == 401
    assert api_client.get(API)["WWW-Authenticate"].startswith("Bearer")
    for header in ("Bearer lf_nope.nope", "Bearer lf_", "Bearer lf_abcdefgh.wrong-secret"):
        api_client.credentials(HTTP_AUTHORIZATION=header)
        assert api_client.get(API).status_code == 401, header

    key, secret = factories.api_key_for(tenant_a[0], scopes=["inference"])
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    response = api_client.get(API)
    assert response.status_code == 403
    assert "lacks the 'manage' scope" in response.json()["detail"]


def test_session_clients_need_the_csrf_token(tenant_a, base_model, peft_zip):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(tenant_a[1])
    assert client.get(API).status_code == 200
    refused = client.post(API, {"name": "x", "archive": archive(peft_zip)})
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]

    token = client.get("/adapters/new/").cookies["csrftoken"].value
    accepted = client.post(API, {"name": "x", "archive": archive(peft_zip)}, HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == 202, accepted.content
    assert accepted.json()["uploaded_by"] == "alice"


def test_an_upload_past_the_cap_is_cut_off_while_streaming(key_client, base_model, settings, peft_zip):
    settings.LORAFLEET_MAX_UPLOAD_BYTES = 4096  # the zip is larger; the body is read only up to about here
    response = key_client.post(API, {"name": "big", "archive": archive(peft_zip)})
    assert response.status_code == 413
    assert "LORAFLEET_MAX_UPLOAD_BYTES" in response.json()["detail"]
    assert not Adapter.objects.exists()
    assert list(settings.FILE_UPLOAD_TEMP_DIR.iterdir()) == []


def test_an_upload_declaring_a_length_past_the_cap_is_refused_unread(key_client, base_model, settings):
    settings.LORAFLEET_MAX_UPLOAD_BYTES = 1024
    big = SimpleUploadedFile("adapter.zip", b"\0" * (1 << 20) + b"\0" * 4096)
    response = key_client.post(API, {"name": "big", "archive": big})
    assert response.status_code == 413


def test_uploads_stream_to_temporary_files_not_memory(settings):
    body = SimpleUploadedFile("adapter.zip", b"PK\x03\x04" + b"\0" * 100)
    request = RequestFactory().post(API, {"archive": body})
    upload = adapter_upload_from_request(request)
    assert isinstance(upload.archive, TemporaryUploadedFile)
    assert upload.archive.temporary_file_path().startswith(str(settings.FILE_UPLOAD_TEMP_DIR))


def test_schema_and_docs_are_served_without_a_cdn(api_client):
    schema = api_client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in ("/api/v1/adapters", "/api/v1/adapters/{name}/versions/{number}", "/api/v1/adapters/{name}/default",
                 "/api/v1/keys"):
        assert path in paths
    assert "tenantApiKey" in schema.json()["components"]["securitySchemes"]
    docs = api_client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "/static/drf_spectacular_sidecar/" in html and "cdn" not in html.lower()


def test_the_openapi_schema_is_valid_and_has_no_warnings(tmp_path):
    from django.core.management import call_command

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    assert "/api/v1/adapters/{name}/versions:" in (tmp_path / "schema.yaml").read_text()


def test_a_nul_byte_in_a_path_or_query_is_a_400_on_every_database(api_client, tenant_a, base_model):
    _key, secret = factories.api_key_for(tenant_a[0])
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    for url in ("/api/v1/adapters/%00", "/api/v1/quota?adapter=%00"):
        response = api_client.get(url)
        assert response.status_code in (400, 404), (url, response.status_code)  # PostgreSQL: 400; SQLite: 404
