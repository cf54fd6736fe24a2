"""Test data for the portal, made through the services wherever a service exists."""

from __future__ import annotations

import itertools
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile

from portal.adapters.uploads import AdapterUpload
from portal.api_keys.models import TenantAPIKey
from portal.api_keys.services import api_key_create
from portal.base_models.models import BaseModel
from portal.base_models.services import base_model_register_by_name
from portal.tenants.models import Membership, Tenant
from portal.tenants.services import tenant_create, tenant_member_set

PASSWORD = "a-long-test-password"
_counter = itertools.count(1)


def user_create(username: str | None = None, *, password: str = PASSWORD, **fields):
    username = username or f"user{next(_counter)}"
    return get_user_model().objects.create_user(username=username, password=password, **fields)


def tenant_with_member(slug: str | None = None, *, role: str = Membership.Role.OWNER, username: str | None = None):
    """A tenant and a user who belongs to it."""
    tenant = tenant_create(slug=slug or f"tenant{next(_counter)}")
    user = user_create(username)
    tenant_member_set(tenant=tenant, user=user, role=role)
    return tenant, user


def user_in(tenant: Tenant, *, role: str, username: str | None = None):
    """Another user of an existing tenant, with ``role`` there."""
    user = user_create(username)
    tenant_member_set(tenant=tenant, user=user, role=role)
    return user


def tiny_base_model() -> BaseModel:
    return base_model_register_by_name(model="random:tiny")


def api_key_for(tenant: Tenant, *, scopes=("manage", "inference"), name: str = "test key") -> tuple[TenantAPIKey, str]:
    return api_key_create(tenant=tenant, name=name, scopes=list(scopes))


def uploaded(path: Path, name: str | None = None) -> SimpleUploadedFile:
    return SimpleUploadedFile(name or path.name, path.read_bytes())


def archive_upload(path: Path, name: str | None = None) -> AdapterUpload:
    return AdapterUpload(archive=uploaded(path, name))


def parts_upload(folder: Path, *, weights_name: str = "adapter_model.safetensors") -> AdapterUpload:
    return AdapterUpload(
        adapter_config=uploaded(folder / "adapter_config.json"),
        adapter_model=uploaded(folder / weights_name),
    )
