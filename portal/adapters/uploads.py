"""Uploads: streamed to temporary files under a size cap, then described as an AdapterUpload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import QueryDict
from django.utils.datastructures import MultiValueDict

from engine_daemon.peft_format import CONFIG_FILE, WEIGHTS_FILE
from portal.adapters.errors import AdapterRejected
from portal.common.errors import INVALID, TOO_LARGE

# Room for the multipart envelope and the small form fields around the files.
MULTIPART_SLACK_BYTES = 1 << 20
TOO_LARGE_FLAG = "lorafleet_upload_too_large"


def upload_too_large_error() -> AdapterRejected:
    limit = settings.LORAFLEET_MAX_UPLOAD_BYTES
    return AdapterRejected(
        f"the upload is larger than the limit of {limit} bytes (LORAFLEET_MAX_UPLOAD_BYTES); an adapter holds only "
        f"{CONFIG_FILE} and {WEIGHTS_FILE}: check that the base model's weights are not in it",
        code=TOO_LARGE,
    )


class CappedUploadHandler(FileUploadHandler):
    """Stops reading a request body past LORAFLEET_MAX_UPLOAD_BYTES, before it is all on disk.

    It marks the request instead of raising: Django's CSRF check reads the body outside any view,
    where an exception would be a 500. ``adapter_upload_from_request`` turns the mark into a 413.
    """

    def handle_raw_input(
        self, input_data: Any, META: Any, content_length: int, boundary: Any, encoding: str | None = None
    ) -> tuple[QueryDict, MultiValueDict] | None:
        self.limit = settings.LORAFLEET_MAX_UPLOAD_BYTES
        self.received = 0
        if content_length > self.limit + MULTIPART_SLACK_BYTES:
            setattr(self.request, TOO_LARGE_FLAG, True)
            return QueryDict(), MultiValueDict()  # refuse without reading a byte of it
        return None

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.received += len(raw_data)
        if self.received > self.limit:
            setattr(self.request, TOO_LARGE_FLAG, True)
            raise StopUpload(connection_reset=True)
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None


@dataclass(frozen=True)
class AdapterUpload:
    """One archive (.zip / .tar.gz of the PEFT folder), or the two PEFT files as separate parts."""

    archive: UploadedFile | None = None
    adapter_config: UploadedFile | None = None
    adapter_model: UploadedFile | None = None

    def __post_init__(self) -> None:
        parts = self.adapter_config is not None or self.adapter_model is not None
        if self.archive is not None and parts:
            raise AdapterRejected(
                "send either an archive, or adapter_config and adapter_model, not both", code=INVALID
            )
        if self.archive is None and not (self.adapter_config is not None and self.adapter_model is not None):
            raise AdapterRejected(
                f"send the adapter: 'archive' (a .zip or .tar.gz of the PEFT folder), or both 'adapter_config' "
                f"({CONFIG_FILE}) and 'adapter_model' ({WEIGHTS_FILE})",
                code=INVALID,
            )

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in (self.archive, self.adapter_config, self.adapter_model) if f is not None)


def adapter_upload_from_request(request: Any) -> AdapterUpload:
    """The upload in a Django or DRF request; a 413 when the cap cut it off."""
    files = request.FILES  # parses the body, if nothing did yet
    if getattr(request, TOO_LARGE_FLAG, False):
        raise upload_too_large_error()
    return AdapterUpload(
        archive=files.get("archive"), adapter_config=files.get("adapter_config"), adapter_model=files.get("adapter_model")
    )
