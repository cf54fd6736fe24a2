from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from portal.base_models.errors import BaseModelError
from portal.base_models.services import base_model_register_by_name


class Command(BaseCommand):
    help = (
        "Register a served base model (smollm2-135m-instruct, random:<preset>, an HF directory or a .gguf file) "
        "so that adapters can be validated against it. Safe to run again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            base = base_model_register_by_name(model=options["model"])
        except BaseModelError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"base model {base.name} registered (architecture {base.architecture}, fingerprint {base.fingerprint})")
