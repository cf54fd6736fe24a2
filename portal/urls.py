"""The portal's URLs. /v1/ (OpenAI-compatible inference) and /ops/ are added by their apps."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from portal.inference.views import healthz
from portal.ops.views import portal_metrics_view, usage_view
from portal.tenants.views import tenant_switch_view

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="adapters:list", permanent=False)),
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("tenant/switch/", tenant_switch_view, name="tenant-switch"),
    path("adapters/", include("portal.adapters.urls")),
    path("keys/", include("portal.api_keys.urls")),
    path("api/v1/", include("portal.api_urls")),
    path("v1/", include("portal.inference.urls")),
    path("healthz", healthz, name="healthz"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("admin/", admin.site.urls),
    path("ops/", include("portal.ops.urls")),
    path("usage/", usage_view, name="usage"),
    path("metrics", portal_metrics_view, name="metrics"),
]
