from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from portal.tenants.errors import TenantError
from portal.tenants.services import tenant_bootstrap


class Command(BaseCommand):
    help = "Create a tenant with an owner (the user is created when missing). Safe to run again."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug")
        parser.add_argument("--owner", required=True, help="username of the owner")
        parser.add_argument("--password", help="set the owner's password (to sign in to the web UI)")
        parser.add_argument("--name", default="", help="display name (default: the slug)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            tenant, created = tenant_bootstrap(
                slug=options["slug"], owner_username=options["owner"], password=options["password"], name=options["name"]
            )
        except TenantError as exc:
            raise CommandError(exc.message) from None
        verb = "created" if created else "already existed; owner ensured"
        self.stdout.write(f"tenant {tenant.slug} {verb} (owner {options['owner']})")
