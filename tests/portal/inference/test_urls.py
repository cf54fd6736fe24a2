"""Every URL under /v1/ answers in OpenAI's shape, an unknown one too."""

from urllib.parse import unquote

import pytest


@pytest.mark.parametrize(("method", "path"), [("get", "/v1/embeddings"), ("post", "/v1/chat/completions/"),
                                              ("get", "/v1/models/"), ("delete", "/v1/"),
                                              ("get", "/v1/models/%0A")])
def test_an_unknown_v1_url_is_an_openai_shaped_404(client, method, path):
    response = getattr(client, method)(path)
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert (error["code"], error["type"], error["param"]) == ("not_found", "invalid_request_error", None)
    assert f"{method.upper()} {unquote(path)} is not an endpoint" in error["message"]
    assert "/v1/chat/completions" in error["message"]
