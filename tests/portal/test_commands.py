import pytest
from django.contrib.auth import authenticate
from django.core.management import CommandError, call_command

from portal.api_keys.services import api_key_authenticate
from portal.base_models.models import BaseModel
from portal.tenants.models import Membership, Tenant

pytestmark = pytest.mark.django_db


def run(*args) -> list[str]:
    from io import StringIO

    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue().strip().splitlines()


def test_create_tenant_creates_the_owner_and_is_safe_to_rerun():
    run("create_tenant", "acme", "--owner", "ann", "--password", "correct-horse-battery")
    tenant = Tenant.objects.get(slug="acme")
    membership = Membership.objects.get(tenant=tenant)
    assert (membership.user.username, membership.role) == ("ann", "owner")
    assert authenticate(username="ann", password="correct-horse-battery") == membership.user

    lines = run("create_tenant", "acme", "--owner", "ann")
    assert "already existed" in lines[-1]
    assert Tenant.objects.count() == 1 and Membership.objects.count() == 1
    assert authenticate(username="ann", password="correct-horse-battery") is not None  # password kept


def test_create_tenant_refuses_a_bad_slug():
    with pytest.raises(CommandError, match="not valid"):
        run("create_tenant", "Bad Slug", "--owner", "ann")


def test_create_api_key_prints_the_secret_last():
    run("create_tenant", "acme", "--owner", "ann")
    lines = run("create_api_key", "acme", "--name", "ci", "--scopes", "inference,manage")
    key, tenant = api_key_authenticate(raw_key=lines[-1], scope="manage")
    assert tenant.slug == "acme" and key.scopes == ["inference", "manage"]
    with pytest.raises(CommandError, match="no tenant"):
        run("create_api_key", "nobody", "--name", "x")
    with pytest.raises(CommandError, match="scopes"):
        run("create_api_key", "acme", "--name", "x", "--scopes", "root")


def test_create_operator_makes_a_staff_user_who_may_open_the_ops_dashboard(client):
    run("create_operator", "ops", "--password", "correct-horse-battery")
    operator = authenticate(username="ops", password="correct-horse-battery")
    assert operator.is_staff and not operator.is_superuser
    assert not Membership.objects.filter(user=operator).exists()  # an operator belongs to no tenant
    client.force_login(operator)
    assert client.get("/ops/").status_code == 200

    lines = run("create_operator", "ops")
    assert "already existed" in lines[-1]
    assert authenticate(username="ops", password="correct-horse-battery") is not None  # password kept
    with pytest.raises(CommandError, match="give --password"):
        run("create_operator", "nobody")


def test_register_base_model():
    lines = run("register_base_model", "random:tiny")
    base = BaseModel.objects.get(name="random:tiny")
    assert base.fingerprint in lines[-1]
    assert (base.hidden_size, base.num_layers, base.projections["v_proj"]) == (64, 2, [64, 32])
    run("register_base_model", "random:tiny")
    assert BaseModel.objects.count() == 1
    with pytest.raises(CommandError, match="neither"):
        run("register_base_model", "no-such-model")
