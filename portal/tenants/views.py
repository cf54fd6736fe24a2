from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from portal.common.access import SESSION_TENANT_KEY
from portal.tenants.selectors import membership_list_for_user


@require_POST
@login_required
def tenant_switch_view(request: HttpRequest) -> HttpResponse:
    """Act for another of the user's tenants from now on (sessions and session-authenticated API calls)."""
    membership = membership_list_for_user(user=request.user).filter(tenant__slug=request.POST.get("tenant")).first()
    if membership is not None:
        request.session[SESSION_TENANT_KEY] = membership.tenant_id
    return redirect("adapters:list")
