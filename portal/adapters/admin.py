from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from portal.adapters.errors import AdapterRejected
from portal.adapters.models import Adapter, AdapterVersion
from portal.adapters.services import adapter_version_pin_set

_VERSION_FIELDS = (
    "number", "status", "error", "sha256", "size_bytes", "promote_when_ready", "uploaded_by", "uploaded_by_key",
    "created_at", "validated_at", "ready_at", "rejected_at", "validation_runs_lost", "files_purged_at",
    "pinned", "pinned_at", "pinned_by",
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
    list_display = ("__str__", "status", "pinned", "size_bytes", "created_at", "ready_at")
    list_filter = ("status", "pinned", "adapter__tenant")
    search_fields = ("adapter__name", "adapter__tenant__slug", "sha256")
    readonly_fields = (*_VERSION_FIELDS, "adapter", "archive", "config_file", "weights_file", "original_filenames", "manifest")
    actions = ("pin_on_devices", "unpin_from_devices")

    def has_add_permission(self, request) -> bool:  # noqa: ANN001
        return False

    @admin.action(description="Pin on the engines' devices", permissions=["change"])
    def pin_on_devices(self, request: HttpRequest, queryset: QuerySet[AdapterVersion]) -> None:
        self._pin_set(request, queryset, pinned=True)

    @admin.action(description="Unpin from the engines' devices", permissions=["change"])
    def unpin_from_devices(self, request: HttpRequest, queryset: QuerySet[AdapterVersion]) -> None:
        self._pin_set(request, queryset, pinned=False)

    def _pin_set(self, request: HttpRequest, queryset: QuerySet[AdapterVersion], *, pinned: bool) -> None:
        """The same service as the dashboard's buttons, one version at a time: a refusal names its version."""
        done = []
        for version in queryset.select_related("adapter__tenant"):
            try:
                adapter_version_pin_set(version=version, pinned=pinned, by=request.user)
            except AdapterRejected as exc:
                self.message_user(request, exc.message, messages.ERROR)
            else:
                done.append(str(version))
        if done:
            verb = "Pinned" if pinned else "Unpinned"
            self.message_user(request, f"{verb} {', '.join(done)} on the engines' devices.", messages.SUCCESS)
