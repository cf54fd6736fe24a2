from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "portal.inference"
    label = "inference"
