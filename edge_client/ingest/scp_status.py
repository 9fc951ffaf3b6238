"""C-STORE response statuses (PS3.4 Annex B.2.3) for what the receiver did with a dataset.

A failure status leaves the dataset in the sender's hands: a modality or PACS shows it in its
queue and keeps its copy. Success is answered only for what is in the store. Which failure tells
the sender whether a retry can help:

- 0xA700 Refused: Out of Resources: the quarantine is full (or the store cannot write): retry later.
- 0xA710 (A7xx, out of resources): over a size cap (file length, dimensions, padding); a site can
  raise the cap.
- 0xA9xx Error: Data Set does not match SOP Class: valid DICOM this receiver does not take (no
  image, another modality, no valid SOP Instance UID).
- 0xCxxx Error: Cannot understand: not readable (no file meta, a broken header, truncated, a pixel
  encoding that does not decode or that nothing installed decodes).

The sub-code names the reason; the Error Comment (0000,0902) carries our reason code as text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_client.ingest.errors import Reason

if TYPE_CHECKING:
    from edge_client.ingest.pipeline import Result

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
TOO_LARGE = 0xA710

_BY_REASON: dict[Reason, int] = {
    Reason.TOO_LARGE: TOO_LARGE,
    Reason.INVALID_UID: 0xA901,
    Reason.NO_PIXELS: 0xA902,
    Reason.WRONG_MODALITY: 0xA903,
    Reason.NO_META: 0xC001,
    Reason.BAD_HEADER: 0xC002,
    Reason.TRUNCATED: 0xC003,
    Reason.UNDECODABLE_PIXELS: 0xC004,
    Reason.UNSUPPORTED_SYNTAX: 0xC005,
    Reason.UNSUPPORTED_PHOTOMETRIC: 0xC006,
}
assert set(_BY_REASON) == set(Reason), "every quarantine reason needs a C-STORE status"


def status_for(result: "Result") -> int:
    """The failure status for a quarantined input: out of resources when it could not be kept."""
    if result.error is None:
        return SUCCESS
    if not result.kept:
        return OUT_OF_RESOURCES  # nothing on this side: the sender must hold on to it and may retry
    return _BY_REASON[result.error.reason]
