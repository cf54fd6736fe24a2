"""REST API for API keys (/api/v1/keys): signed-in people only; a key cannot mint or revoke keys."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api_keys.models import Scope, TenantAPIKey
from portal.api_keys.selectors import api_key_get, api_key_list
from portal.api_keys.services import api_key_create, api_key_revoke
from portal.common.access import access_for_request
from portal.tenants.models import Membership


class ApiKeyOutput(serializers.Serializer):
    prefix = serializers.CharField(help_text="the public part of the key, before the dot; identifies it")
    name = serializers.CharField()
    scopes = serializers.ListField(child=serializers.CharField())
    created = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(source="expiry_date", allow_null=True)
    last_used_at = serializers.DateTimeField(allow_null=True)
    revoked = serializers.BooleanField()
    revoked_at = serializers.DateTimeField(allow_null=True)


class ApiKeyCreatedOutput(ApiKeyOutput):
    key = serializers.CharField(help_text="the secret: shown this once, never stored")


class ApiKeysApi(APIView):
    authentication_classes = [SessionAuthentication]

    class ApiKeyCreateInput(serializers.Serializer):
        name = serializers.CharField(max_length=50)
        scopes = serializers.ListField(
            child=serializers.ChoiceField(choices=Scope.choices), default=[Scope.INFERENCE], allow_empty=False
        )
        expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)

    @extend_schema(operation_id="keys_list", responses=ApiKeyOutput(many=True))
    def get(self, request: Request) -> Response:
        access = access_for_request(request)
        access.require_role(Membership.Role.ADMIN)
        return Response(ApiKeyOutput(api_key_list(tenant=access.tenant), many=True).data)

    @extend_schema(operation_id="keys_create", request=ApiKeyCreateInput, responses={201: ApiKeyCreatedOutput})
    def post(self, request: Request) -> Response:
        access = access_for_request(request)
        access.require_role(Membership.Role.ADMIN)
        data = self.ApiKeyCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        key, secret = api_key_create(tenant=access.tenant, created_by=access.user, **data.validated_data)
        return Response({**ApiKeyOutput(key).data, "key": secret}, status=status.HTTP_201_CREATED)


class ApiKeyRevokeApi(APIView):
    authentication_classes = [SessionAuthentication]

    @extend_schema(operation_id="keys_revoke", request=None, responses=ApiKeyOutput)
    def post(self, request: Request, prefix: str) -> Response:
        access = access_for_request(request)
        key: TenantAPIKey = api_key_get(tenant=access.tenant, prefix=prefix)
        access.require_role(Membership.Role.ADMIN)
        return Response(ApiKeyOutput(api_key_revoke(key=key)).data)
