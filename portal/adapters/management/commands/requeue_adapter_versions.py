from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from portal.adapters.services import adapter_versions_requeue


class Command(BaseCommand):
    help = "Enqueue again the validation or staging of adapter versions left unfinished (safe to run any time)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than-minutes", type=float, default=10.0)

    def handle(self, *args: Any, **options: Any) -> None:
        requeued = adapter_versions_requeue(older_than=timedelta(minutes=options["older_than_minutes"]))
        self.stdout.write(f"requeued {len(requeued)} adapter version(s)")
