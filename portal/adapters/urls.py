from django.urls import path

from portal.adapters import views

app_name = "adapters"

urlpatterns = [
    path("", views.adapter_list_view, name="list"),
    path("new/", views.adapter_upload_view, name="upload"),
    path("<str:name>/", views.adapter_detail_view, name="detail"),
    path("<str:name>/upload/", views.adapter_upload_view, name="upload-version"),
    path("<str:name>/default/", views.adapter_default_view, name="default"),
    path("<str:name>/delete/", views.adapter_delete_view, name="delete"),
]
