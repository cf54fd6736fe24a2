from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from portal.usage.models import Usage


@admin.register(Usage)
class UsageAdmin(admin.ModelAdmin):
    """Records are written by the serving path only."""

    list_display = ("created", "tenant", "model", "status", "prompt_tokens", "completion_tokens", "total_time")
    list_filter = ("status", "tenant")
    search_fields = ("request_id", "model", "tenant__slug")
    date_hierarchy = "created"

    def get_readonly_fields(self, request: HttpRequest, obj: Usage | None = None) -> list[str]:
        return [f.name for f in Usage._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
