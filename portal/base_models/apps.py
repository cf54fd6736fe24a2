from django.apps import AppConfig


class BaseModelsConfig(AppConfig):
    name = "portal.base_models"
    label = "base_models"
