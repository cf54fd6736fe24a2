import pytest

from portal.adapters import services
from portal.adapters.errors import AdapterRejected
from portal.adapters.selectors import adapter_list, adapter_resolve_for_request, model_ids_for_tenant
from tests.portal import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def bot(tenant_a, base_model, peft_zip, peft_dir_v2, run_on_commit):
    """Tenant A's adapter 'bot': v1 and v2 ready (v2 default), v3 still pending."""
    with run_on_commit():
        v1 = services.adapter_create(
            tenant=tenant_a[0], name="bot", base_model=base_model, upload=factories.archive_upload(peft_zip)
        )
        v2 = services.adapter_version_create(adapter=v1.adapter, upload=factories.parts_upload(peft_dir_v2))
    v3 = services.adapter_version_create(adapter=v1.adapter, upload=factories.archive_upload(peft_zip))
    for v in (v1, v2, v3):
        v.refresh_from_db()
    return v1, v2, v3


def test_a_name_resolves_to_the_default_version(tenant_a, bot):
    resolved = adapter_resolve_for_request(tenant=tenant_a[0], model="bot")
    assert resolved.version == bot[1]
    assert (resolved.adapter_name, resolved.adapter_sha256, resolved.model_id) == ("bot@2", bot[1].sha256, "bot@2")
    assert resolved.base_model.name == "random:tiny"


def test_name_at_n_resolves_to_that_version(tenant_a, bot):
    assert adapter_resolve_for_request(tenant=tenant_a[0], model="bot@1").version == bot[0]


def test_a_base_model_name_resolves_to_no_adapter(tenant_a, bot):
    resolved = adapter_resolve_for_request(tenant=tenant_a[0], model="random:tiny")
    assert resolved.version is None and resolved.adapter_sha256 is None and resolved.model_id == "random:tiny"


@pytest.mark.parametrize("model", ["nope", "bot@9", "bot@x", "bot@", "@1", "random:other", ""])
def test_unknown_models_are_not_found(tenant_a, bot, model):
    with pytest.raises(AdapterRejected) as error:
        adapter_resolve_for_request(tenant=tenant_a[0], model=model)
    assert error.value.code == "not_found"


def test_a_version_not_ready_is_named_as_such(tenant_a, bot):
    with pytest.raises(AdapterRejected, match="bot@3 is pending") as error:
        adapter_resolve_for_request(tenant=tenant_a[0], model="bot@3")
    assert error.value.code == "not_ready"


def test_an_adapter_with_no_ready_version_is_not_ready(tenant_a, base_model, peft_zip):
    services.adapter_create(tenant=tenant_a[0], name="new", base_model=base_model, upload=factories.archive_upload(peft_zip))
    with pytest.raises(AdapterRejected, match="no ready version yet"):
        adapter_resolve_for_request(tenant=tenant_a[0], model="new")


def test_another_tenants_adapter_is_not_found(tenant_b, bot):
    for model in ("bot", "bot@1", "bot@2"):
        with pytest.raises(AdapterRejected) as error:
            adapter_resolve_for_request(tenant=tenant_b[0], model=model)
        assert error.value.code == "not_found"


def test_model_ids_for_tenant(tenant_a, tenant_b, bot):
    assert model_ids_for_tenant(tenant=tenant_a[0]) == ["random:tiny", "bot", "bot@1", "bot@2"]
    assert model_ids_for_tenant(tenant=tenant_b[0]) == ["random:tiny"]


def test_adapter_list_annotations(tenant_a, bot):
    (adapter,) = adapter_list(tenant=tenant_a[0])
    assert (adapter.version_count, adapter.latest_number, adapter.latest_status) == (3, 3, "pending")
