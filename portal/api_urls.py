"""/api/v1/: the tenant-facing REST API (adapters and their quota, keys and usage)."""

from django.urls import path

from portal.adapters import apis as adapter_apis
from portal.api_keys import apis as key_apis
from portal.usage import apis as usage_apis

app_name = "api"

urlpatterns = [
    path("adapters", adapter_apis.AdaptersApi.as_view(), name="adapter-list"),
    path("adapters/<str:name>", adapter_apis.AdapterDetailApi.as_view(), name="adapter-detail"),
    path("adapters/<str:name>/versions", adapter_apis.AdapterVersionsApi.as_view(), name="adapter-versions"),
    path(
        "adapters/<str:name>/versions/<int:number>",
        adapter_apis.AdapterVersionDetailApi.as_view(),
        name="adapter-version-detail",
    ),
    path("adapters/<str:name>/default", adapter_apis.AdapterDefaultApi.as_view(), name="adapter-default"),
    path("quota", adapter_apis.UploadQuotaApi.as_view(), name="quota"),
    path("keys", key_apis.ApiKeysApi.as_view(), name="key-list"),
    path("keys/<str:prefix>/revoke", key_apis.ApiKeyRevokeApi.as_view(), name="key-revoke"),
    path("usage", usage_apis.UsageApi.as_view(), name="usage"),
    path("usage/requests", usage_apis.UsageListApi.as_view(), name="usage-requests"),
]
