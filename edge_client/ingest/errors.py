"""Why a file was quarantined: short stable codes that reports count and people can grep."""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """Stable quarantine codes; the value is what reports and reason files carry."""

    NO_META = "no_meta"  # no 128-byte preamble, "DICM" and file meta: not a DICOM Part 10 file
    BAD_HEADER = "bad_header"  # the header does not parse, or holds values that make no sense
    TRUNCATED = "truncated"  # the file ends before its header or pixel data does
    INVALID_UID = "invalid_uid"  # SOPInstanceUID missing or not a DICOM UID: cannot dedupe or label it
    WRONG_MODALITY = "wrong_modality"  # a modality the task does not take
    NO_PIXELS = "no_pixels"  # no image in it (SR, SEG, KO, PR, ...)
    UNSUPPORTED_SYNTAX = "unsupported_syntax"  # no installed plugin decodes this transfer syntax
    UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric"  # e.g. PALETTE COLOR
    UNDECODABLE_PIXELS = "undecodable_pixels"  # a plugin exists but the pixel data does not decode
    TOO_LARGE = "too_large"  # file size or image dimensions over a cap (reader.Limits): refused before reading or decoding


class QuarantineError(Exception):
    """Raised by the reader for one bad input; the pipeline quarantines the file and carries on."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = " ".join(detail.split())  # one line, always
