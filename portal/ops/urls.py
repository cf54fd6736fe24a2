from django.urls import path

from portal.ops import views

app_name = "ops"

urlpatterns = [
    path("", views.ops_dashboard_view, name="dashboard"),
    path("live/", views.ops_live_view, name="live"),
]
