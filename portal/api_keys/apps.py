from django.apps import AppConfig


class ApiKeysConfig(AppConfig):
    name = "portal.api_keys"
    label = "api_keys"

    def ready(self) -> None:
        from portal.api_keys import schema  # noqa: F401  (registers the OpenAPI description of Bearer keys)
