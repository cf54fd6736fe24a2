from __future__ import annotations

from django.db.models import QuerySet

from portal.base_models.errors import BaseModelError
from portal.base_models.models import BaseModel
from portal.common.errors import INVALID


def base_model_list() -> QuerySet[BaseModel]:
    return BaseModel.objects.filter(is_active=True).order_by("name")


def base_model_for_upload(*, name: str | None) -> BaseModel:
    """The base model a new adapter targets: the one named, or the only one served."""
    models = base_model_list()
    if name:
        found = models.filter(name=name).first()
        if found is None:
            raise BaseModelError(
                f"base model {name!r} is not served here; choose one of {[m.name for m in models]}", code=INVALID
            )
        return found
    served = list(models[:2])
    if len(served) == 1:
        return served[0]
    if not served:
        raise BaseModelError(
            "no base model is registered yet; an operator runs python manage.py register_base_model <model>",
            code=INVALID,
        )
    raise BaseModelError(
        f"several base models are served; name one in base_model ({[m.name for m in models]})", code=INVALID
    )
