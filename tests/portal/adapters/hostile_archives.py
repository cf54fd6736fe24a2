"""Hostile uploads aimed at the archives readers: each must be refused fast, in bounded memory, with its own words."""

from __future__ import annotations

from tests.portal.adapters.bad_uploads import BadUpload

CASES: list[BadUpload] = []
