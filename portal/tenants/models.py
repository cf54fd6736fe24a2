import math

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models

SLUG_RE = r"^[a-z0-9](?:[a-z0-9-]{0,48}[a-z0-9])?$"
slug_validator = RegexValidator(SLUG_RE, "use lowercase letters, digits and inner hyphens (at most 50)")
DEFAULT_MAX_IN_FLIGHT = 64


def positive_weight_validator(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValidationError("a fair-share weight is a number above 0 (1 is an even share)")


class Tenant(models.Model):
    """A customer: owns adapters and API keys, shares the GPU with the others under its limits."""

    slug = models.CharField(max_length=50, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=200)
    is_active = models.BooleanField(default=True, help_text="A suspended tenant's keys stop working.")
    # Serving limits, enforced at admission (portal.inference.ratelimits) for all the tenant's keys together;
    # a key may have lower limits of its own on top.
    fair_share_weight = models.FloatField(
        default=1.0, validators=[positive_weight_validator],
        help_text="The tenant's share of the engines when they are busy, against the others' weights (1: even).",
    )
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, default=600, validators=[MinValueValidator(1)],
        help_text="All keys together. Empty: no limit.",
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, default=1_000_000, validators=[MinValueValidator(1)],
        help_text="Prompt and completion tokens, all keys together. Empty: no limit.",
    )
    max_in_flight = models.PositiveIntegerField(
        null=True, blank=True, default=DEFAULT_MAX_IN_FLIGHT, validators=[MinValueValidator(1)],
        help_text="Requests queued or running at once, all keys together. Empty: no cap.",
    )
    # Upload quotas, enforced when an adapter or version is uploaded (portal.adapters.services).
    max_storage_bytes = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Bytes of uploads kept. Empty: LORAFLEET_TENANT_MAX_STORAGE_BYTES; 0: no limit."
    )
    max_adapters = models.PositiveIntegerField(
        null=True, blank=True, help_text="Empty: LORAFLEET_TENANT_MAX_ADAPTERS; 0: no limit."
    )
    max_versions_per_adapter = models.PositiveIntegerField(
        null=True, blank=True, help_text="Empty: LORAFLEET_TENANT_MAX_VERSIONS_PER_ADAPTER; 0: no limit."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("slug",)
        constraints = [
            models.CheckConstraint(condition=models.Q(fair_share_weight__gt=0), name="tenant_fair_share_weight_positive",
                                   violation_error_message="a fair-share weight is a number above 0"),
        ]

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner"
        ADMIN = "admin"
        MEMBER = "member"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=("tenant", "user"), name="membership_unique_per_tenant")]
        ordering = ("tenant__slug",)

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"


ROLE_RANK = {Membership.Role.MEMBER: 0, Membership.Role.ADMIN: 1, Membership.Role.OWNER: 2}


def role_at_least(role: str, required: str) -> bool:
    return ROLE_RANK[Membership.Role(role)] >= ROLE_RANK[Membership.Role(required)]
