from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser


class Command(BaseCommand):
    help = (
        "Create an operator: a staff user who may open the ops dashboard (/ops/), not a superuser. "
        "Safe to run again; --password resets the password."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--password", help="set the password (required when the user is new)")

    def handle(self, *args: Any, **options: Any) -> None:
        username, password = options["username"], options["password"]
        user = get_user_model().objects.filter(username=username).first()
        if user is None and not password:
            raise CommandError(f"{username} does not exist yet: give --password")
        if user is None:
            user = get_user_model().objects.create_user(username=username, password=password, is_staff=True)
            self.stdout.write(f"operator {username} created")
            return
        user.is_staff = True
        if password:
            user.set_password(password)
        user.save()
        self.stdout.write(f"operator {username} already existed; staff flag ensured")
