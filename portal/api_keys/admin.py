from django.contrib import admin
from rest_framework_api_key.admin import APIKeyModelAdmin
from rest_framework_api_key.models import APIKey

from portal.api_keys.models import TenantAPIKey


@admin.register(TenantAPIKey)
class TenantAPIKeyAdmin(APIKeyModelAdmin):
    list_display = (*APIKeyModelAdmin.list_display, "tenant", "scopes", "requests_per_minute", "tokens_per_minute",
                    "last_used_at")
    list_filter = (*APIKeyModelAdmin.list_filter, "tenant")
    search_fields = (*APIKeyModelAdmin.search_fields, "tenant__slug")


# The library's own untenanted key model is not used by lorafleet; keep it out of the operators' way.
if admin.site.is_registered(APIKey):
    admin.site.unregister(APIKey)
