from django.contrib import admin

from portal.adapters.models import Adapter, AdapterVersion

_VERSION_FIELDS = (
    "number", "status", "error", "sha256", "size_bytes", "promote_when_ready", "uploaded_by", "uploaded_by_key",
    "created_at", "validated_at", "ready_at", "rejected_at", "validation_runs_lost", "files_purged_at",
)


class AdapterVersionInline(admin.TabularInline):
    """Versions are immutable: operators look, the services write."""

    model = AdapterVersion
    extra = 0
    can_delete = False
    fields = _VERSION_FIELDS
    readonly_fields = _VERSION_FIELDS
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False


@admin.register(Adapter)
class AdapterAdmin(admin.ModelAdmin):
    list_display = ("name", "tenant", "base_model", "default_version", "updated_at")
    list_filter = ("tenant", "base_model")
    search_fields = ("name", "tenant__slug")
    readonly_fields = ("tenant", "name", "base_model", "default_version", "created_by", "created_at", "updated_at")
    inlines = (AdapterVersionInline,)


@admin.register(AdapterVersion)
class AdapterVersionAdmin(admin.ModelAdmin):
    list_display = ("__str__", "status", "size_bytes", "created_at", "ready_at")
    list_filter = ("status", "adapter__tenant")
    search_fields = ("adapter__name", "adapter__tenant__slug", "sha256")
    readonly_fields = (*_VERSION_FIELDS, "adapter", "archive", "config_file", "weights_file", "original_filenames", "manifest")

    def has_add_permission(self, request) -> bool:  # noqa: ANN001
        return False
