"""REST API for adapters (/api/v1/adapters...): parse, call one selector or service, render."""

from __future__ import annotations

from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.fields import empty
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.adapters.models import Adapter, AdapterVersion
from portal.adapters.selectors import (
    adapter_get,
    adapter_list,
    adapter_version_get,
    adapter_version_list,
    tenant_upload_quota,
)
from portal.adapters.services import (
    adapter_create,
    adapter_default_set,
    adapter_delete,
    adapter_version_create,
)
from portal.adapters.uploads import adapter_upload_from_request
from portal.base_models.selectors import base_model_for_upload
from portal.common.access import access_for_request
from portal.tenants.models import Membership

Role = Membership.Role


class _FormBoolean(serializers.BooleanField):
    """A multipart form that leaves the field out means its default, not False."""

    default_empty_html = empty


class AdapterVersionOutput(serializers.Serializer):
    adapter = serializers.CharField(source="adapter.name")
    version = serializers.IntegerField(source="number")
    model = serializers.CharField(source="model_id", help_text="the `model` value that calls exactly this version")
    status = serializers.ChoiceField(choices=AdapterVersion.Status.choices)
    error = serializers.CharField(help_text="why the upload was rejected, naming the fix")
    is_default = serializers.SerializerMethodField()
    sha256 = serializers.CharField()
    size_bytes = serializers.IntegerField()
    manifest = serializers.JSONField(allow_null=True)
    uploaded_by = serializers.CharField(source="uploader_label")
    created_at = serializers.DateTimeField()
    validated_at = serializers.DateTimeField(allow_null=True)
    ready_at = serializers.DateTimeField(allow_null=True)
    url = serializers.SerializerMethodField()

    def get_is_default(self, version: AdapterVersion) -> bool:
        return version.adapter.default_version_id == version.pk

    def get_url(self, version: AdapterVersion) -> str:
        return version_api_url(version)


def version_api_url(version: AdapterVersion) -> str:
    return reverse("api:adapter-version-detail", kwargs={"name": version.adapter.name, "number": version.number})


class AdapterOutput(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    base_model = serializers.CharField(source="base_model.name")
    default_version = serializers.IntegerField(source="default_version.number", allow_null=True, default=None)
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class AdapterListItemOutput(AdapterOutput):
    version_count = serializers.IntegerField()
    latest_version = serializers.IntegerField(source="latest_number", allow_null=True)
    latest_status = serializers.CharField(allow_null=True)


class AdapterDetailOutput(AdapterOutput):
    versions = serializers.SerializerMethodField()

    @extend_schema_field(AdapterVersionOutput(many=True))
    def get_versions(self, adapter: Adapter) -> list[dict]:
        return AdapterVersionOutput(adapter_version_list(adapter=adapter), many=True).data


class VersionUploadInput(serializers.Serializer):
    """Either ``archive``, or ``adapter_config`` and ``adapter_model``."""

    archive = serializers.FileField(required=False, help_text="a .zip or .tar.gz of the PEFT adapter folder")
    adapter_config = serializers.FileField(required=False, help_text="adapter_config.json, with adapter_model")
    adapter_model = serializers.FileField(required=False, help_text="adapter_model.safetensors, with adapter_config")
    promote = _FormBoolean(
        required=False,
        help_text="make this version the default once it is ready. Not sent: yes for owners, admins and API keys, "
        "no for members; a member may not send true, except for a new adapter's first version",
    )


class AdapterCreateInput(VersionUploadInput):
    name = serializers.CharField(max_length=64)
    description = serializers.CharField(max_length=2000, required=False, default="", allow_blank=True)
    base_model = serializers.CharField(required=False, help_text="needed only when several base models are served")


def _accepted(version: AdapterVersion) -> Response:
    url = version_api_url(version)
    return Response(AdapterVersionOutput(version).data, status=status.HTTP_202_ACCEPTED, headers={"Location": url})


class AdaptersApi(APIView):
    parser_classes = [MultiPartParser, FormParser]
    pagination_class = PageNumberPagination  # the schema documents the page and its envelope from this

    @extend_schema(operation_id="adapters_list", responses=AdapterListItemOutput(many=True))
    def get(self, request: Request) -> Response:
        access = access_for_request(request)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(adapter_list(tenant=access.tenant), request, view=self)
        return paginator.get_paginated_response(AdapterListItemOutput(page, many=True).data)

    @extend_schema(
        operation_id="adapters_create",
        request={"multipart/form-data": AdapterCreateInput},
        responses={202: AdapterVersionOutput},
        description="Create an adapter with its first version; validation and staging run in the background.",
    )
    def post(self, request: Request) -> Response:
        access = access_for_request(request)
        access.require_role(Role.MEMBER)
        upload = adapter_upload_from_request(request)
        data = AdapterCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        version = adapter_create(
            tenant=access.tenant,
            name=data.validated_data["name"],
            description=data.validated_data["description"],
            base_model=base_model_for_upload(name=data.validated_data.get("base_model")),
            upload=upload,
            uploaded_by=access.user,
            uploaded_by_key=access.api_key,
            role=access.role,
            promote=data.validated_data.get("promote"),
        )
        return _accepted(version)


class AdapterDetailApi(APIView):
    @extend_schema(operation_id="adapters_retrieve", responses=AdapterDetailOutput)
    def get(self, request: Request, name: str) -> Response:
        access = access_for_request(request)
        return Response(AdapterDetailOutput(adapter_get(tenant=access.tenant, name=name)).data)

    @extend_schema(operation_id="adapters_destroy", responses={204: None})
    def delete(self, request: Request, name: str) -> Response:
        access = access_for_request(request)
        adapter = adapter_get(tenant=access.tenant, name=name)
        access.require_role(Role.ADMIN)
        adapter_delete(adapter=adapter)
        return Response(status=status.HTTP_204_NO_CONTENT)


class AdapterVersionsApi(APIView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        operation_id="adapters_versions_create",
        request={"multipart/form-data": VersionUploadInput},
        responses={202: AdapterVersionOutput},
        description="Upload the next version of an adapter.",
    )
    def post(self, request: Request, name: str) -> Response:
        access = access_for_request(request)
        adapter = adapter_get(tenant=access.tenant, name=name)
        access.require_role(Role.MEMBER)
        upload = adapter_upload_from_request(request)
        data = VersionUploadInput(data=request.data)
        data.is_valid(raise_exception=True)
        version = adapter_version_create(
            adapter=adapter,
            upload=upload,
            uploaded_by=access.user,
            uploaded_by_key=access.api_key,
            role=access.role,
            promote=data.validated_data.get("promote"),
        )
        return _accepted(version)


class AdapterVersionDetailApi(APIView):
    @extend_schema(operation_id="adapters_versions_retrieve", responses=AdapterVersionOutput)
    def get(self, request: Request, name: str, number: int) -> Response:
        access = access_for_request(request)
        return Response(AdapterVersionOutput(adapter_version_get(tenant=access.tenant, name=name, number=number)).data)


class AdapterDefaultApi(APIView):
    class AdapterDefaultInput(serializers.Serializer):
        version = serializers.IntegerField(min_value=1)

    @extend_schema(operation_id="adapters_default_set", request=AdapterDefaultInput, responses=AdapterDetailOutput)
    def post(self, request: Request, name: str) -> Response:
        access = access_for_request(request)
        adapter = adapter_get(tenant=access.tenant, name=name)
        access.require_role(Role.ADMIN)
        data = self.AdapterDefaultInput(data=request.data)
        data.is_valid(raise_exception=True)
        adapter = adapter_default_set(adapter=adapter, number=data.validated_data["version"])
        return Response(AdapterDetailOutput(adapter).data)


class QuotaUseOutput(serializers.Serializer):
    used = serializers.IntegerField()
    limit = serializers.IntegerField(allow_null=True, help_text="null: no limit")


class UploadQuotaOutput(serializers.Serializer):
    storage_bytes = QuotaUseOutput(help_text="bytes of the uploads kept (a rejected one's until its files are deleted)")
    adapters = QuotaUseOutput()
    versions = QuotaUseOutput(help_text="versions kept of the adapter named by ?adapter= (without it, 0: a new adapter's)")


class UploadQuotaApi(APIView):
    @extend_schema(
        operation_id="quota_retrieve",
        parameters=[OpenApiParameter("adapter", OpenApiTypes.STR, description="count this adapter's versions")],
        responses=UploadQuotaOutput,
        description="The tenant's upload quotas and what it uses of them; an upload past one is refused with "
        "403 and code quota_exceeded.",
    )
    def get(self, request: Request) -> Response:
        access = access_for_request(request)
        name = request.query_params.get("adapter")
        adapter = adapter_get(tenant=access.tenant, name=name) if name else None
        return Response(UploadQuotaOutput(tenant_upload_quota(tenant=access.tenant, adapter=adapter)).data)
