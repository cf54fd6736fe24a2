from django.contrib import admin

from portal.base_models.models import BaseModel


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = ("name", "architecture", "fingerprint", "is_active", "updated_at")
    list_filter = ("is_active", "architecture")
    readonly_fields = ("fingerprint", "descriptor", "registered_at", "updated_at")
