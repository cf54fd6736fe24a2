from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from portal.api_keys.errors import ApiKeyError
from portal.api_keys.services import api_key_create
from portal.tenants.models import Tenant


class Command(BaseCommand):
    help = "Create an API key for a tenant. The secret is the last line printed; it is not stored and not shown again."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("tenant", help="the tenant's slug")
        parser.add_argument("--name", required=True)
        parser.add_argument("--scopes", default="inference", help="comma-separated: inference,manage")

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = Tenant.objects.filter(slug=options["tenant"]).first()
        if tenant is None:
            raise CommandError(f"no tenant {options['tenant']!r}; create it with create_tenant first")
        scopes = [s.strip() for s in options["scopes"].split(",") if s.strip()]
        try:
            key, secret = api_key_create(tenant=tenant, name=options["name"], scopes=scopes)
        except ApiKeyError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"API key {key.prefix} ({', '.join(key.scopes)}) for tenant {tenant.slug}:")
        self.stdout.write(secret)
