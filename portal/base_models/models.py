from functools import cached_property

from django.db import models

from engine_daemon.peft_format import ModelDescriptor


class BaseModel(models.Model):
    """One served base model: the `model` id clients send for no adapter, and what adapters must fit."""

    name = models.CharField(max_length=200, unique=True)
    architecture = models.CharField(max_length=100)
    fingerprint = models.CharField(max_length=16, db_index=True)
    # ModelDescriptor.to_dict(): sizes, heads, and every projection's [in, out].
    descriptor = models.JSONField()
    is_active = models.BooleanField(default=True)
    registered_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name

    @cached_property
    def model_descriptor(self) -> ModelDescriptor:
        return ModelDescriptor.from_dict(self.descriptor)

    @property
    def hidden_size(self) -> int:
        return self.descriptor["hidden_size"]

    @property
    def num_layers(self) -> int:
        return self.descriptor["num_layers"]

    @property
    def projections(self) -> dict[str, list[int]]:
        return self.descriptor["projections"]
