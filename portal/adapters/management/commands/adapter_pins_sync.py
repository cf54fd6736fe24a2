from typing import Any

import redis
from django.core.management.base import BaseCommand, CommandError

from engine_daemon.protocol import PINNED_ADAPTERS_KEY
from portal.adapters.services import adapter_pins_sync


class Command(BaseCommand):
    help = (
        f"Make {PINNED_ADAPTERS_KEY} (the pins engines read at start) the content of the pinned adapter versions, "
        "telling the engines of each change (safe to run any time; Celery beat runs it every 5 minutes)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            added, removed = adapter_pins_sync()
        except redis.RedisError as exc:
            raise CommandError(f"Redis did not answer ({exc}); run it again once Redis answers") from None
        for sha256 in added:
            self.stdout.write(f"pinned   {sha256}")
        for sha256 in removed:
            self.stdout.write(f"unpinned {sha256}")
        self.stdout.write(f"{PINNED_ADAPTERS_KEY}: added {len(added)}, removed {len(removed)} sha256(s)")
