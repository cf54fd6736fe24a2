"""/v1/: the OpenAI-compatible API. Bearer keys, no sessions, so no CSRF."""

from django.urls import path, re_path
from django.views.decorators.csrf import csrf_exempt

from portal.inference import views

app_name = "v1"

urlpatterns = [
    path("models", csrf_exempt(views.ModelsApi.as_view()), name="models"),
    path("models/<path:model>", csrf_exempt(views.ModelDetailApi.as_view()), name="model-detail"),
    path("chat/completions", csrf_exempt(views.ChatCompletionsApi.as_view()), name="chat-completions"),
    path("completions", csrf_exempt(views.CompletionsApi.as_view()), name="completions"),
    # Last: whatever is left, a newline in the path too.
    re_path(r"^(?P<path>(?s:.*))$", csrf_exempt(views.endpoint_not_found), name="not-found"),
]
