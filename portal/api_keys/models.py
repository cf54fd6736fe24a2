from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils.crypto import get_random_string
from rest_framework_api_key.crypto import KeyGenerator
from rest_framework_api_key.models import AbstractAPIKey, BaseAPIKeyManager

from portal.tenants.models import Tenant

KEY_PREFIX = "lf_"


class Scope(models.TextChoices):
    INFERENCE = "inference", "inference (call /v1 with the tenant's adapters)"
    MANAGE = "manage", "manage (upload, promote and delete adapters through /api/v1)"


class LorafleetKeyGenerator(KeyGenerator):
    """Keys read ``lf_<8 chars>.<32 chars>``: the part before the dot is the stored, public prefix."""

    def get_prefix(self) -> str:
        return KEY_PREFIX + get_random_string(self.prefix_length)


class TenantAPIKeyManager(BaseAPIKeyManager):
    key_generator = LorafleetKeyGenerator()


class TenantAPIKey(AbstractAPIKey):
    """A tenant's API key: only a sha512 of the secret is stored; the secret is shown once."""

    prefix = models.CharField(max_length=16, unique=True, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    scopes = models.JSONField(default=list)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Limits of this key alone, on top of its tenant's (which count all its keys together).
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)],
        help_text="This key alone, within its tenant's limit. Empty: only the tenant's limit applies.",
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)],
        help_text="This key alone, within its tenant's limit. Empty: only the tenant's limit applies.",
    )

    objects = TenantAPIKeyManager()

    class Meta(AbstractAPIKey.Meta):
        verbose_name = "tenant API key"
        verbose_name_plural = "tenant API keys"

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def is_usable(self) -> bool:
        return not self.revoked and not self.has_expired
