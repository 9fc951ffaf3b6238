"""Where labels come from: a CSV keyed by SOPInstanceUID or StudyInstanceUID, or one folder per class.

Images with no label are kept (label -1) for self-supervised tasks such as low-dose CT denoising.
Both sources are checked in full before ingest starts, so a typo fails fast instead of mid-run.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from edge_client.ingest.reader import Instance
from edge_client.ingest.store import UNLABELLED

_KEYS = ("SOPInstanceUID", "StudyInstanceUID")
_CLASS_FOLDER = re.compile(r"^(\d+)(?:[_-].*)?$")  # "1" or "1_pneumonia": the number is the label


@dataclass(frozen=True)
class Labels:
    """Label lookup: CSV by instance, then CSV by study, then class folder, else unlabelled (-1)."""

    by_sop: dict[str, int] = field(default_factory=dict)
    by_study: dict[str, int] = field(default_factory=dict)
    class_root: Path | None = None

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str]) -> "Labels":
        """Columns: `label` and SOPInstanceUID and/or StudyInstanceUID (one of them filled per row)."""
        maps: dict[str, dict[str, int]] = {k: {} for k in _KEYS}
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            if "label" not in header or not any(k in header for k in _KEYS):
                raise ValueError(f"{path}: header {header}; a labels CSV needs a 'label' column and a SOPInstanceUID or StudyInstanceUID column")
            for line, rec in enumerate(reader, start=2):
                key = next((k for k in _KEYS if (rec.get(k) or "").strip()), None)
                if key is None:
                    raise ValueError(f"{path}:{line}: neither SOPInstanceUID nor StudyInstanceUID is filled in")
                uid, text = rec[key].strip(), (rec.get("label") or "").strip()
                if not text.isdigit():
                    raise ValueError(f"{path}:{line}: label {text!r} is not a class index (0, 1, 2, ...)")
                if maps[key].setdefault(uid, int(text)) != int(text):
                    raise ValueError(f"{path}:{line}: {key} {uid} has two different labels")
        return cls(by_sop=maps["SOPInstanceUID"], by_study=maps["StudyInstanceUID"])

    @classmethod
    def from_folders(cls, root: str | os.PathLike[str]) -> "Labels":
        """`root/<k>[_name]/...`: files under a folder named with class index k get label k."""
        root = Path(root)
        bad = sorted(p.name for p in root.iterdir() if p.is_dir() and not _CLASS_FOLDER.match(p.name))
        if bad:
            raise ValueError(f"{root}: class folders {bad} do not start with a class index; name them like '0_normal', '1_pneumonia'")
        return cls(class_root=root)

    def merged(self, other: "Labels") -> "Labels":
        """CSV entries from both, and a class folder root from whichever has one."""
        return Labels({**self.by_sop, **other.by_sop}, {**self.by_study, **other.by_study}, self.class_root or other.class_root)

    def label_for(self, instance: Instance, source: Path | None = None) -> int:
        if instance.sop_instance_uid in self.by_sop:
            return self.by_sop[instance.sop_instance_uid]
        if instance.study_instance_uid in self.by_study:
            return self.by_study[instance.study_instance_uid]
        if self.class_root is not None and source is not None:
            try:
                # absolute, not resolved: a symlinked file belongs to the folder it is linked into
                parts = source.absolute().relative_to(self.class_root.absolute()).parts
            except ValueError:
                return UNLABELLED
            match = _CLASS_FOLDER.match(parts[0]) if len(parts) > 1 else None
            if match:
                return int(match.group(1))
        return UNLABELLED
