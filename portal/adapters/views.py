"""HTML pages for adapters. Uploads go to the REST API (from the page's script, with progress)."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from portal.adapters.errors import AdapterRejected
from portal.adapters.selectors import adapter_get, adapter_list, adapter_version_list, tenant_upload_quota
from portal.adapters.services import adapter_default_set, adapter_delete, adapter_promote_allowed
from portal.base_models.selectors import base_model_list
from portal.common.access import access_for_request
from portal.common.errors import INVALID
from portal.tenants.models import Membership

Role = Membership.Role


@require_GET
@login_required
def adapter_list_view(request: HttpRequest) -> HttpResponse:
    access = access_for_request(request)
    page = Paginator(adapter_list(tenant=access.tenant), 25).get_page(request.GET.get("page"))
    return render(request, "adapters/list.html", {"page": page})


@require_GET
@login_required
def adapter_detail_view(request: HttpRequest, name: str) -> HttpResponse:
    access = access_for_request(request)
    adapter = adapter_get(tenant=access.tenant, name=name)
    context = {"adapter": adapter, "versions": adapter_version_list(adapter=adapter), "can_manage": access.role != Role.MEMBER}
    return render(request, "adapters/detail.html", context)


@require_GET
@login_required
def adapter_upload_view(request: HttpRequest, name: str | None = None) -> HttpResponse:
    """The upload form: a new adapter, or (with ``name``) a new version of one."""
    access = access_for_request(request)
    adapter = adapter_get(tenant=access.tenant, name=name) if name else None
    if adapter is None:
        api_url = reverse("api:adapter-list")
    else:
        api_url = reverse("api:adapter-versions", kwargs={"name": adapter.name})
    context = {
        "adapter": adapter,
        "api_url": api_url,
        "base_models": base_model_list(),
        "max_upload_bytes": settings.LORAFLEET_MAX_UPLOAD_BYTES,
        "can_promote": adapter_promote_allowed(role=access.role, adapter=adapter),
        "quota": tenant_upload_quota(tenant=access.tenant, adapter=adapter),
    }
    return render(request, "adapters/upload.html", context)


@require_POST
@login_required
def adapter_default_view(request: HttpRequest, name: str) -> HttpResponse:
    access = access_for_request(request)
    adapter = adapter_get(tenant=access.tenant, name=name)
    access.require_role(Role.ADMIN)
    number_text = request.POST.get("version", "")
    if not number_text.isdigit():
        raise AdapterRejected("choose the version to make the default", code=INVALID)
    number = int(number_text)
    adapter = adapter_default_set(adapter=adapter, number=number)
    messages.success(request, f"{adapter.name}@{number} is now the default version.")
    return redirect("adapters:detail", name=adapter.name)


@require_POST
@login_required
def adapter_delete_view(request: HttpRequest, name: str) -> HttpResponse:
    access = access_for_request(request)
    adapter = adapter_get(tenant=access.tenant, name=name)
    access.require_role(Role.ADMIN)
    adapter_delete(adapter=adapter)
    messages.success(request, f"Adapter {name} was deleted.")
    return redirect("adapters:list")
