"""REST API for usage (/api/v1/usage): a tenant's requests, tokens and latencies, grouped."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.common.access import access_for_request
from portal.usage.selectors import GROUPINGS, usage_summary

DEFAULT_WINDOW = timedelta(days=30)
_DATETIME_FORMATS = ["iso-8601", "%Y-%m-%d"]


class UsagePercentilesOutput(serializers.Serializer):
    p50 = serializers.FloatField(allow_null=True)
    p95 = serializers.FloatField(allow_null=True)
    p99 = serializers.FloatField(allow_null=True)


class UsageGroupOutput(serializers.Serializer):
    group = serializers.CharField(help_text="name@N or the base model (adapter), key prefix (key), YYYY-MM-DD (day)")
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    statuses = serializers.DictField(child=serializers.IntegerField(), help_text="requests per outcome")
    time_to_first_token = UsagePercentilesOutput(help_text="seconds, over the requests that ended ok")
    total_time = UsagePercentilesOutput(help_text="seconds, over the requests that ended ok")


class UsageSummaryOutput(serializers.Serializer):
    since = serializers.DateTimeField()
    until = serializers.DateTimeField()
    group_by = serializers.CharField()
    groups = UsageGroupOutput(many=True)


class UsageApi(APIView):
    class UsageQueryInput(serializers.Serializer):
        since = serializers.DateTimeField(required=False, input_formats=_DATETIME_FORMATS,
                                          help_text="start, inclusive (default: 30 days before until)")
        until = serializers.DateTimeField(required=False, input_formats=_DATETIME_FORMATS,
                                          help_text="end, exclusive (default: now)")
        group_by = serializers.ChoiceField(choices=GROUPINGS, default="adapter")

    @extend_schema(operation_id="usage_summary", parameters=[UsageQueryInput], responses=UsageSummaryOutput)
    def get(self, request: Request) -> Response:
        access = access_for_request(request)
        query = self.UsageQueryInput(data=request.query_params)
        query.is_valid(raise_exception=True)
        until = query.validated_data.get("until") or timezone.now()
        since = query.validated_data.get("since") or until - DEFAULT_WINDOW
        group_by = query.validated_data["group_by"]
        groups = usage_summary(tenant=access.tenant, since=since, until=until, group_by=group_by)
        return Response(UsageSummaryOutput({"since": since, "until": until, "group_by": group_by, "groups": groups}).data)
