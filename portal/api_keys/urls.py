from django.urls import path

from portal.api_keys import views

app_name = "api_keys"

urlpatterns = [
    path("", views.api_key_list_view, name="list"),
    path("new/", views.api_key_create_view, name="create"),
    path("<str:prefix>/revoke/", views.api_key_revoke_view, name="revoke"),
]
