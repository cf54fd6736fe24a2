from __future__ import annotations

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

from portal.base_models.models import BaseModel
from portal.tenants.models import Tenant

ADAPTER_NAME_RE = r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$"
adapter_name_validator = RegexValidator(
    ADAPTER_NAME_RE, "use lowercase letters, digits, '-' and '_' (at most 64, starting and ending alphanumeric)"
)


class Adapter(models.Model):
    """A tenant's named LoRA adapter; clients call it as ``name`` (its default version) or ``name@N``."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="adapters")
    name = models.CharField(max_length=64, validators=[adapter_name_validator])
    description = models.TextField(blank=True, max_length=2000)
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="adapters")
    # Always a ready version of this adapter (services keep it so), or empty until one is ready.
    default_version = models.ForeignKey(
        "AdapterVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=("tenant", "name"), name="adapter_name_unique_per_tenant")]
        ordering = ("name",)

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name}"


def _upload_to(version: AdapterVersion, filename: str) -> str:
    adapter = version.adapter
    return f"adapters/{adapter.tenant_id}/{adapter.pk}/v{version.number}/{filename}"


class AdapterVersion(models.Model):
    """One immutable upload of an adapter; only its status moves, forward: pending → validating → ready | rejected."""

    class Status(models.TextChoices):
        PENDING = "pending"
        VALIDATING = "validating"
        READY = "ready"
        REJECTED = "rejected"

    adapter = models.ForeignKey(Adapter, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING, db_index=True)
    error = models.TextField(blank=True)
    # What the upload was: one archive, or the two PEFT files as separate parts.
    archive = models.FileField(upload_to=_upload_to, max_length=300, blank=True)
    config_file = models.FileField(upload_to=_upload_to, max_length=300, blank=True)
    weights_file = models.FileField(upload_to=_upload_to, max_length=300, blank=True)
    original_filenames = models.JSONField(default=dict, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    promote_when_ready = models.BooleanField(default=True)
    # Set by validation: the cache key and AdapterManifest.to_dict().
    sha256 = models.CharField(max_length=64, blank=True, db_index=True)
    manifest = models.JSONField(null=True, blank=True)
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    uploaded_by_key = models.ForeignKey(
        "api_keys.TenantAPIKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    validated_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    rejected_at = models.DateTimeField(null=True, blank=True)
    # Validation runs that started and never came back (their worker died): counted before each run and
    # taken back when it returns, so a version that kills its worker is not redelivered forever.
    validation_runs_lost = models.PositiveSmallIntegerField(default=0)
    # Set when a rejected version's uploaded files were deleted after the retention period.
    files_purged_at = models.DateTimeField(null=True, blank=True)
    # Staff keep this version on the engines' devices once loaded (protocol.PINNED_ADAPTERS_KEY holds its sha256).
    pinned = models.BooleanField(default=False)
    pinned_at = models.DateTimeField(null=True, blank=True)
    pinned_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=("adapter", "number"), name="adapter_version_number_unique"),
            models.CheckConstraint(
                condition=~models.Q(status="ready") | ~models.Q(sha256=""), name="ready_version_has_sha256"
            ),
        ]
        ordering = ("adapter", "-number")

    def __str__(self) -> str:
        return f"{self.adapter}@{self.number}"

    @property
    def model_id(self) -> str:
        """What a client sends as ``model`` to call exactly this version."""
        return f"{self.adapter.name}@{self.number}"

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.READY, self.Status.REJECTED)

    @property
    def uploader_label(self) -> str:
        if self.uploaded_by_id:
            return self.uploaded_by.get_username()
        if self.uploaded_by_key_id:
            return f"API key {self.uploaded_by_key.name}"
        return ""
