from drf_spectacular.extensions import OpenApiAuthenticationExtension


class BearerApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "portal.api_keys.authentication.BearerApiKeyAuthentication"
    name = "tenantApiKey"

    def get_security_definition(self, auto_schema):  # noqa: ANN001, ANN201 (drf-spectacular's signature)
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "lf_XXXXXXXX.<secret>",
            "description": "A tenant API key; /api/v1 needs the 'manage' scope.",
        }
