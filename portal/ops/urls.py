from django.urls import path

from portal.ops import views

app_name = "ops"

urlpatterns = [
    path("", views.ops_dashboard_view, name="dashboard"),
    path("live/", views.ops_live_view, name="live"),
    path("versions/<int:version_id>/pin/", views.ops_adapter_pin_view, name="adapter-pin"),
]
