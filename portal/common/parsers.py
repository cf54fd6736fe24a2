"""The REST API's JSON parser: DRF's, except that a body nested too deeply to decode is a 400 like any bad JSON."""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:  # Python's decoder gives up about a thousand levels down; DRF catches only ValueError
            raise ParseError("JSON parse error - the body nests arrays or objects too deeply to read; flatten it") from None
