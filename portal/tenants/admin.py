from django.contrib import admin

from portal.tenants.models import Membership, Tenant


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ("user",)


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "is_active", "fair_share_weight", "requests_per_minute", "tokens_per_minute",
                    "max_in_flight", "created_at")
    list_filter = ("is_active",)
    search_fields = ("slug", "name")
    fieldsets = (
        (None, {"fields": ("slug", "name", "is_active")}),
        (
            "Serving limits",
            {
                "description": "For all the tenant's keys together; a key may have lower limits of its own "
                               "(API keys). Checked before a request is queued: past one, a 429 names it.",
                "fields": ("fair_share_weight", "requests_per_minute", "tokens_per_minute", "max_in_flight"),
            },
        ),
        (
            "Upload quotas",
            {
                "description": "Empty: the operator's setting (LORAFLEET_TENANT_MAX_*) applies; 0: no limit.",
                "fields": ("max_storage_bytes", "max_adapters", "max_versions_per_adapter"),
            },
        ),
    )
    inlines = (MembershipInline,)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "tenant", "role", "created_at")
    list_filter = ("role",)
    search_fields = ("user__username", "tenant__slug")
    autocomplete_fields = ("user", "tenant")
