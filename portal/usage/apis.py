"""REST API for usage: a tenant's summary over a window (/api/v1/usage) and its requests, a page at a time
(/api/v1/usage/requests)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.common.access import access_for_request
from portal.usage.models import Usage
from portal.usage.selectors import DEFAULT_WINDOW, GROUPINGS, MAX_WINDOW, usage_list, usage_summary

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
    cached_tokens = serializers.IntegerField(help_text="of the prompt tokens, those served from a prefix cache")
    total_tokens = serializers.IntegerField()
    statuses = serializers.DictField(child=serializers.IntegerField(), help_text="requests per outcome")
    time_to_first_token = UsagePercentilesOutput(help_text="seconds, over the requests that ended ok")
    total_time = UsagePercentilesOutput(help_text="seconds, over the requests that ended ok")


class UsageSummaryOutput(serializers.Serializer):
    since = serializers.DateTimeField()
    until = serializers.DateTimeField()
    group_by = serializers.CharField()
    groups = UsageGroupOutput(many=True)


class UsageRecordOutput(serializers.Serializer):
    request_id = serializers.CharField()
    created = serializers.DateTimeField(help_text="when the request arrived")
    model = serializers.CharField(help_text="the model the client sent")
    adapter = serializers.CharField(help_text="the version served, as name@N; empty for the base model")
    api_key = serializers.CharField(source="api_key.prefix", allow_null=True, default=None,
                                    help_text="the key's prefix; null for none, or once deleted")
    status = serializers.ChoiceField(choices=Usage.Status.choices)
    error_code = serializers.CharField()
    stream = serializers.BooleanField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    cached_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    time_to_first_token = serializers.FloatField(allow_null=True, help_text="seconds")
    total_time = serializers.FloatField(help_text="seconds, from arrival to the last byte")


class UsageApi(APIView):
    class UsageQueryInput(serializers.Serializer):
        since = serializers.DateTimeField(
            required=False, input_formats=_DATETIME_FORMATS,
            help_text=f"start, inclusive (default: {DEFAULT_WINDOW.total_seconds() / 3600:.0f} hours before until)",
        )
        until = serializers.DateTimeField(required=False, input_formats=_DATETIME_FORMATS,
                                          help_text=f"end, exclusive (default: now); at most {MAX_WINDOW.days} days "
                                          "after since, a longer window is refused with 400")
        group_by = serializers.ChoiceField(choices=GROUPINGS, default="adapter")

    @extend_schema(
        operation_id="usage_summary", parameters=[UsageQueryInput], responses=UsageSummaryOutput,
        description=f"Requests, tokens, outcomes and latency percentiles in [since, until), grouped. The window "
        f"spans at most {MAX_WINDOW.days} days: ask for a longer period one window at a time.",
    )
    def get(self, request: Request) -> Response:
        access = access_for_request(request)
        query = self.UsageQueryInput(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response(UsageSummaryOutput(usage_summary(tenant=access.tenant, **query.validated_data)).data)


class UsagePagination(CursorPagination):
    """Newest first; a cursor stays valid however many requests arrive meanwhile (usage is append-only)."""

    ordering = ("-created", "-id")
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000
    page_size_query_description = f"requests per page (default {page_size}, at most {max_page_size})"


class UsageListApi(APIView):
    pagination_class = UsagePagination  # also tells the schema that the answer is a page

    class UsageListQueryInput(serializers.Serializer):
        since = serializers.DateTimeField(required=False, input_formats=_DATETIME_FORMATS,
                                          help_text="requests that arrived at or after this")
        until = serializers.DateTimeField(required=False, input_formats=_DATETIME_FORMATS,
                                          help_text="requests that arrived before this")

    @extend_schema(operation_id="usage_list", parameters=[UsageListQueryInput], responses=UsageRecordOutput(many=True),
                   description="The tenant's requests, newest first, a page at a time: follow `next`.")
    def get(self, request: Request) -> Response:
        access = access_for_request(request)
        query = self.UsageListQueryInput(data=request.query_params)
        query.is_valid(raise_exception=True)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(usage_list(tenant=access.tenant, **query.validated_data), request, view=self)
        return paginator.get_paginated_response(UsageRecordOutput(page, many=True).data)
