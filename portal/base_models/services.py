from __future__ import annotations

from django.db import transaction

from engine_daemon.model_source import ModelNotFound
from engine_daemon.peft_format import ModelDescriptor, describe_base_model
from portal.base_models.errors import BaseModelError
from portal.base_models.models import BaseModel
from portal.common.errors import CONFLICT, INVALID


@transaction.atomic
def base_model_register(*, descriptor: ModelDescriptor) -> BaseModel:
    """Record a base model the engine serves; registering the same model again is a no-op.

    A name may not change architecture once adapters were validated against it: they would no
    longer fit, and the engine would refuse them one request at a time.
    """
    existing = BaseModel.objects.select_for_update().filter(name=descriptor.name).first()
    if existing is not None:
        if existing.fingerprint != descriptor.fingerprint and existing.adapters.exists():
            raise BaseModelError(
                f"base model {descriptor.name!r} is registered with architecture {existing.fingerprint}, "
                f"this one is {descriptor.fingerprint}, and adapters were validated against the old one; "
                "serve the new model under another name",
                code=CONFLICT,
            )
        existing.architecture = descriptor.architecture
        existing.fingerprint = descriptor.fingerprint
        existing.descriptor = descriptor.to_dict()
        existing.is_active = True
        existing.save()
        return existing
    return BaseModel.objects.create(
        name=descriptor.name,
        architecture=descriptor.architecture,
        fingerprint=descriptor.fingerprint,
        descriptor=descriptor.to_dict(),
    )


def base_model_register_by_name(*, model: str) -> BaseModel:
    """Describe a model the way the engine resolves it (no torch), then register it."""
    try:
        descriptor = describe_base_model(model)
    except ModelNotFound as exc:
        raise BaseModelError(str(exc), code=INVALID) from None
    return base_model_register(descriptor=descriptor)
