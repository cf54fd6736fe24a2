from django.db import models
from django.utils import timezone

from portal.adapters.models import AdapterVersion
from portal.api_keys.models import TenantAPIKey
from portal.base_models.models import BaseModel
from portal.tenants.models import Tenant


class Usage(models.Model):
    """One inference request that reached the serving path, whatever its outcome (one row per request)."""

    class Status(models.TextChoices):
        OK = "ok"
        ERROR = "error"
        CANCELLED = "cancelled"  # the client went away before the end
        TIMEOUT = "timeout"  # the request's deadline passed

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="usage")
    api_key = models.ForeignKey(TenantAPIKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # Empty for the base model alone; SET_NULL keeps the record when the adapter is deleted (``adapter`` stays).
    adapter_version = models.ForeignKey(
        AdapterVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Empty only for a request that failed before its model was known (e.g. an unknown model name).
    base_model = models.ForeignKey(BaseModel, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    model = models.CharField(max_length=200, help_text="the `model` the client sent")
    adapter = models.CharField(max_length=100, blank=True, help_text="the version served, as name@N; empty = base model")
    request_id = models.CharField(max_length=64, unique=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0, help_text="prompt tokens served from a prefix cache")
    # The token counts are the engine's own (from the usage stream): what it computed, not what the portal saw.
    engine_reported = models.BooleanField(default=False)
    # The portal's part (outcome, timings, the client's model name) was recorded; a portal killed mid-request never does.
    portal_reported = models.BooleanField(default=True)
    time_to_first_token = models.FloatField(null=True, blank=True, help_text="seconds")
    total_time = models.FloatField(default=0.0, help_text="seconds, from arrival to the last byte")
    status = models.CharField(max_length=10, choices=Status.choices)
    error_code = models.CharField(max_length=50, blank=True)
    stream = models.BooleanField(default=False)
    created = models.DateTimeField(default=timezone.now, db_index=True, help_text="when the request arrived")

    class Meta:
        ordering = ("-created",)
        indexes = [models.Index(fields=("tenant", "created"), name="usage_tenant_created")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.model} {self.status} {self.prompt_tokens}+{self.completion_tokens}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
