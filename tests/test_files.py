"""fedge.files: writes that survive a power cut (data synced, renamed, folder synced) and leave no debris.

Durability cannot be shown by pulling the plug in a test, so the tests watch the system calls: a
recorder wrapped around os.fsync notes which file or folder each call synced (it observes, the real
fsync still runs), and strace, where installed, shows the same from outside the process.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.files import atomic_copy_file, atomic_write_bytes, durable_move, fsync_dir

linux_only = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fd paths from /proc/self/fd")


class FsyncLog:
    """Wraps os.fsync, os.replace and os.link; `events` lists ('fsync', path) and ('place', target)
    (a file renamed or linked into place) in the order they happened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str]] = []
        real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def placer(real):  # type: ignore[no-untyped-def]
            def place(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kw: object) -> None:
                real(src, dst, **kw)
                self.events.append(("place", os.path.realpath(dst)))

            return place

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", placer(real_replace))
        monkeypatch.setattr(os, "link", placer(real_link))

    def synced(self, path: Path) -> bool:
        return ("fsync", os.path.realpath(path)) in self.events

    def synced_after_replace(self, folder: Path, target: Path) -> bool:
        """True when `folder` was fsynced after `target` was renamed (or linked) into place."""
        placed = self.events.index(("place", os.path.realpath(target)))
        return ("fsync", os.path.realpath(folder)) in self.events[placed + 1 :]


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert _debris(target.parent) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # salts and keys go through here


def test_failed_atomic_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and _debris(tmp_path) == []


@linux_only
def test_atomic_write_syncs_data_then_renames_then_syncs_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = FsyncLog(monkeypatch)
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b"x")
    kinds = [kind for kind, _ in log.events]
    assert kinds == ["fsync", "place", "fsync"], log.events
    assert log.events[0][1].startswith(str(tmp_path / ".state.json."))  # the temp file's data
    assert log.synced_after_replace(tmp_path, target)


@linux_only
def test_copy_and_move_sync_their_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox, quarantine = tmp_path / "inbox", tmp_path / "quarantine"
    inbox.mkdir()
    (inbox / "a.dcm").write_bytes(b"a" * 3000)
    log = FsyncLog(monkeypatch)
    atomic_copy_file(inbox / "a.dcm", quarantine / "copy.dcm")
    assert log.synced_after_replace(quarantine, quarantine / "copy.dcm")
    durable_move(inbox / "a.dcm", quarantine / "moved.dcm")
    assert log.synced_after_replace(quarantine, quarantine / "moved.dcm")
    assert log.synced(inbox)  # the source's entry is gone for good too
    assert (quarantine / "copy.dcm").read_bytes() == (quarantine / "moved.dcm").read_bytes() == b"a" * 3000
    assert not (inbox / "a.dcm").exists() and _debris(quarantine) == []


def test_fsync_dir_on_a_missing_folder_is_silent(tmp_path: Path) -> None:
    fsync_dir(tmp_path / "gone")  # nothing to sync, nothing raised


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install -y strace)")
def test_strace_sees_the_folder_fsync_after_the_rename(tmp_path: Path) -> None:
    """The same check from outside: the kernel is asked to sync the folder after the rename."""
    target = tmp_path / "out.bin"
    code = f"from fedge.files import atomic_write_bytes; atomic_write_bytes({str(target)!r}, b'x')"
    trace = tmp_path / "trace.txt"
    run = subprocess.run(
        ["strace", "-f", "-y", "-o", str(trace), "-e", "trace=fsync,fdatasync,rename,renameat,renameat2", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if run.returncode != 0 and "ptrace" in run.stderr:
        pytest.skip(f"strace cannot trace here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    lines = [line for line in trace.read_text().splitlines() if str(tmp_path) in line]
    renamed = next(i for i, line in enumerate(lines) if "rename" in line and str(target) in line)
    assert any("fsync(" in line and f"<{tmp_path}>" in line for line in lines[renamed + 1 :]), lines


def test_exclusive_write_refuses_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "salt"
    atomic_write_bytes(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_bytes(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first" and _debris(tmp_path) == []
