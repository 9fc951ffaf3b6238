"""What an agent keeps across restarts: its error-feedback residual, its last sent update, the
server run it takes part in, its privacy ledger (every DP-SGD release it made), the layers that
never leave it (FedBN) and its SCAFFOLD control variate."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save
from torch import nn

from compression import ErrorFeedback
from fedge.errors import check_schema_version
from fedge.files import atomic_write_bytes
from fedge.tasks.dp import PrivacyLedger

log = logging.getLogger(__name__)

# Of agent.json. An older or damaged file is a cache miss (the round is retrained, never sent); a
# newer one stops the agent at start: its residual and cache belong to a newer fedge.
SCHEMA_VERSION = 1


class AgentState:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._refuse_newer()
        self.residual = ErrorFeedback()
        if self._residual_file.exists():
            self.residual.load_bytes(self._residual_file.read_bytes(), str(self._residual_file))
        # Never reset: a site's epsilon covers all its rounds, across restarts (a damaged file stops the agent).
        self.privacy = PrivacyLedger.from_json(self._privacy_file.read_text()) if self._privacy_file.exists() else PrivacyLedger()

    def _refuse_newer(self) -> None:
        try:
            found = json.loads(self._meta_file.read_text()).get("schema_version")
        except (OSError, ValueError, AttributeError):
            return
        if isinstance(found, int) and found > SCHEMA_VERSION:
            check_schema_version(found, SCHEMA_VERSION, f"agent state {self._meta_file}")

    @property
    def _residual_file(self) -> Path:
        return self.folder / "residual.safetensors"

    @property
    def _meta_file(self) -> Path:
        return self.folder / "agent.json"

    @property
    def _run_file(self) -> Path:
        return self.folder / "run.json"

    @property
    def _privacy_file(self) -> Path:
        return self.folder / "privacy.json"

    def save_privacy(self) -> None:
        atomic_write_bytes(self._privacy_file, self.privacy.to_json().encode())

    def remember_run(self, federation: str, run: str, issued_at: float) -> None:
        """The run this agent follows, so that after a restart an older run's replayed records
        (a retained `finished`, say) are still recognised as older."""
        record = {"schema_version": SCHEMA_VERSION, "federation": federation, "run": run, "issued_at": issued_at}
        atomic_write_bytes(self._run_file, json.dumps(record).encode())

    def known_run(self, federation: str) -> tuple[str, float] | None:
        try:
            record = json.loads(self._run_file.read_text())
            if record.get("schema_version") == SCHEMA_VERSION and record.get("federation") == federation:
                return str(record["run"]), float(record["issued_at"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # none or unreadable: the next signed announcement tells
        return None

    @property
    def _local_file(self) -> Path:
        return self.folder / "local_layers.safetensors"

    def save_local(self, model: nn.Module, names: Collection[str]) -> None:
        """The tensors that never leave the site (FedBN's normalisation layers), kept across restarts."""
        state = model.state_dict()
        atomic_write_bytes(self._local_file, save({k: state[k].detach().cpu().numpy() for k in sorted(names)}))

    def restore_local(self, model: nn.Module, names: Collection[str]) -> None:
        """Load the saved local tensors into `model` where name and shape match (none saved: the model's own init)."""
        if not self._local_file.exists():
            return
        saved = load_file(str(self._local_file))
        state = model.state_dict()
        with torch.no_grad():
            for k in names:
                if k in saved and tuple(saved[k].shape) == tuple(state[k].shape):
                    state[k].copy_(torch.from_numpy(saved[k]))

    @property
    def _variates_file(self) -> Path:
        return self.folder / "control_variates.safetensors"

    def save_variates(self, variates: dict[str, np.ndarray]) -> None:
        """This site's SCAFFOLD variate c_i (fedge.controlvariates), kept across rounds and restarts."""
        atomic_write_bytes(self._variates_file, save(variates))

    def load_variates(self) -> dict[str, np.ndarray]:
        """The saved c_i; none (round 1) or unreadable: empty, i.e. zero (logged: the next round's correction is then c alone)."""
        if not self._variates_file.exists():
            return {}
        try:
            return load_file(str(self._variates_file))
        except Exception as exc:  # a damaged file costs one round of correction, never the agent
            log.warning("%s is unreadable (%s); this round trains with c_i = 0", self._variates_file, exc)
            return {}

    def save_residual(self) -> None:
        atomic_write_bytes(self._residual_file, self.residual.to_bytes())

    def remember_update(self, federation: str, run: str, rnd: int, model_sha256: str, envelope: bytes) -> None:
        """Keep the last update so a restarted server that re-announces the round gets it again
        instead of the agent training twice (which would also double-count its residual).
        The envelope's digest in agent.json (written last) is the commit."""
        atomic_write_bytes(self.folder / "last_update.bin", envelope)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "federation": federation,
            "run": run,
            "round": rnd,
            "model_sha256": model_sha256,
            "update_sha256": hashlib.sha256(envelope).hexdigest(),
        }
        atomic_write_bytes(self._meta_file, json.dumps(meta).encode())

    def last_update(self, federation: str, run: str, rnd: int, model_sha256: str) -> bytes | None:
        if not self._meta_file.exists():
            return None
        try:
            meta = json.loads(self._meta_file.read_text())
            data = (self.folder / "last_update.bin").read_bytes()
        except (OSError, ValueError):
            return None  # an unreadable cache is retrained, never sent
        if meta.get("schema_version") != SCHEMA_VERSION or hashlib.sha256(data).hexdigest() != meta.get("update_sha256"):
            return None
        if (meta.get("federation"), meta.get("run"), meta.get("round"), meta.get("model_sha256")) != (federation, run, rnd, model_sha256):
            return None
        return data
