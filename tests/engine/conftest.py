from __future__ import annotations

import pytest

from tests.engine.builders import write_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")
