"""The dashboard's JSON: what the page shows, built from `FederationView` and the checkpoint folder.

Only numbers, names and refusal reasons go out: no weights, no update payloads, and nothing of a
site's images (the server never holds any). Round records are cut to an allow-list of fields.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from server.metrics import DETAIL_CHARS, RECORD_NUMBERS, FederationView

if TYPE_CHECKING:
    from server.rounds import RoundServer

SCHEMA_VERSION = 1
RECENT_REFUSALS = 20


def _status(view: FederationView) -> str:
    if view.round >= view.rounds:
        return "finished"
    return "running" if view.running else "starting"


def _rounds(view: FederationView) -> list[dict[str, Any]]:
    rows, cumulative = [], 0
    for record in view.history:
        cumulative += int(record.get("uplink_bytes", 0))
        row: dict[str, Any] = {k: record[k] for k in RECORD_NUMBERS if isinstance(record.get(k), (int, float))}
        row["clients"] = [str(c) for c in record.get("clients", ())]
        row["cumulative_uplink_bytes"] = cumulative
        rows.append(row)
    return rows


def _checkpoints(server: RoundServer, view: FederationView) -> list[dict[str, Any]]:
    store = server.store
    found = []
    paths = [(r["round"], store.model_path(r["round"])) for r in view.history if "round" in r]
    paths.append((view.round, store.final_path))
    for rnd, path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue  # not written yet, or removed by the operator
        found.append({"round": int(rnd), "file": path.name, "bytes": stat.st_size, "written_at": stat.st_mtime})
    return found


def dashboard_state(server: RoundServer) -> dict[str, Any]:
    view = FederationView.of(server)
    sites = [
        {
            "site": s.site, "online": s.online, "last_round": s.last_round, "updates": s.updates,
            "upload_bytes": s.upload_bytes, "upload_seconds": round(s.upload_seconds, 4),
            "last_upload_seconds": None if s.last_upload_seconds is None else round(s.last_upload_seconds, 4),
        }
        for s in view.sites
    ]  # fmt: skip
    recent = [{"reason": kind, "detail": detail[:DETAIL_CHARS]} for kind, detail in view.recent_refusals[-RECENT_REFUSALS:]]
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": time.time(),
        "federation": view.federation,
        "run": view.run,
        "status": _status(view),
        "round": view.round,
        "rounds": view.rounds,
        "sites": sites,
        "history": _rounds(view),
        "totals": {
            "uplink_bytes": view.total("uplink_bytes"),
            "downlink_bytes": view.total("downlink_bytes"),
            "updates": view.updates_received,
        },
        "rejections": {"by_reason": dict(sorted(view.refusals.items())), "total": sum(view.refusals.values()), "recent": recent[::-1]},
        "checkpoints": _checkpoints(server, view),
    }
