"""HTML pages for API keys: list, create (the secret is shown once, on the response), revoke."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_GET, require_POST

from portal.api_keys.models import Scope
from portal.api_keys.selectors import api_key_get, api_key_list
from portal.api_keys.services import api_key_create, api_key_revoke
from portal.common.access import access_for_request
from portal.tenants.models import Membership


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(max_length=50)
    scopes = forms.MultipleChoiceField(
        choices=Scope.choices, widget=forms.CheckboxSelectMultiple, initial=[Scope.INFERENCE]
    )
    expires_at = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}), label="Expires (optional)"
    )


def _keys_page(request: HttpRequest, form: ApiKeyCreateForm, *, created=None, secret=None, status=200) -> HttpResponse:
    access = access_for_request(request)
    access.require_role(Membership.Role.ADMIN)
    context = {"keys": api_key_list(tenant=access.tenant), "tenant": access.tenant, "form": form, "created": created,
               "secret": secret}
    response = render(request, "api_keys/list.html", context, status=status)
    add_never_cache_headers(response)  # the page may carry a secret
    return response


@require_GET
@login_required
def api_key_list_view(request: HttpRequest) -> HttpResponse:
    return _keys_page(request, ApiKeyCreateForm())


@require_POST
@login_required
def api_key_create_view(request: HttpRequest) -> HttpResponse:
    access = access_for_request(request)
    access.require_role(Membership.Role.ADMIN)
    form = ApiKeyCreateForm(request.POST)
    if not form.is_valid():
        return _keys_page(request, form, status=400)
    key, secret = api_key_create(tenant=access.tenant, created_by=access.user, **form.cleaned_data)
    return _keys_page(request, ApiKeyCreateForm(), created=key, secret=secret, status=201)


@require_POST
@login_required
def api_key_revoke_view(request: HttpRequest, prefix: str) -> HttpResponse:
    access = access_for_request(request)
    key = api_key_get(tenant=access.tenant, prefix=prefix)
    access.require_role(Membership.Role.ADMIN)
    api_key_revoke(key=key)
    messages.success(request, f"API key {key.name} ({key.prefix}) was revoked.")
    return redirect("api_keys:list")
