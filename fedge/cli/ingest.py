"""`fedge ingest`: DICOM from a folder, a watched inbox or a C-STORE receiver into the local dataset store.

Exit codes: 0 done (quarantined files are counted in the summary, not errors); 2 a usage error
(bad option, a store made for another image size); 8 an I/O error on the store (disk full, rights).
"""

from __future__ import annotations

import signal
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from fedge.cli.options import fail
from fedge.errors import StorageError

if TYPE_CHECKING:
    from rich.console import Console

    from edge_client.ingest.pipeline import Ingestor, IngestSummary


def ingest(
    folder: Optional[Path] = typer.Argument(None, help="Folder of DICOM files (read, never modified), or the inbox with --watch."),
    store: Path = typer.Option(..., "--store", help="Dataset store folder; made on first use."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV: label plus SOPInstanceUID or StudyInstanceUID."),
    class_folders: bool = typer.Option(False, "--class-folders", help="FOLDER/<k>[_name]/... holds class k."),
    size: Optional[int] = typer.Option(None, "--size", help="Task input size (new store: 28)."),
    channels: Optional[int] = typer.Option(None, "--channels", help="1 grayscale or 3 RGB (new store: 1)."),
    modality: list[str] = typer.Option([], "--modality", help="Accept only these modalities (repeat); others are quarantined."),
    window: str = typer.Option("auto", "--window", help="auto (tags, else CT soft tissue), or force a CT window: soft_tissue, lung, brain, bone."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the summary JSON here."),
    watch: bool = typer.Option(False, "--watch", help="Keep watching FOLDER; bad files are moved to quarantine."),
    poll: float = typer.Option(1.0, "--poll", help="Seconds between inbox polls with --watch."),
    scp: bool = typer.Option(False, "--scp", help="Run a DICOM C-STORE receiver instead of reading a folder."),
    ae_title: str = typer.Option("FEDGE", "--ae-title", help="The receiver's AE title."),
    port: int = typer.Option(11112, "--port", help="The receiver's TCP port."),
    allow_ae: list[str] = typer.Option([], "--allow-ae", help="Calling AE titles allowed to send (repeat)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the receiver binds."),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", help="DICOM TLS for --scp: the federation CA; senders must show a certificate it signed."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="DICOM TLS for --scp: this receiver's certificate (PEM)."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="DICOM TLS for --scp: this receiver's private key (PEM)."),
    quarantine_mb: int = typer.Option(1024, "--quarantine-mb", help="Quarantine quota in MiB; bad inputs past it are refused, counted and logged, not kept."),
    max_file_mb: int = typer.Option(1024, "--max-file-mb", help="Refuse files (or received datasets) larger than this many MiB before reading them."),
) -> None:
    """Decode DICOM into the de-identified local store the agent trains from; PHI stays on this device."""
    from rich.console import Console

    from edge_client.ingest.labels import Labels
    from edge_client.ingest.limits import Limits, MiB
    from edge_client.ingest.pipeline import Ingestor, discover
    from edge_client.ingest.reader import IMAGE_MODALITIES, ReadConfig
    from edge_client.ingest.store import DatasetStore

    if scp == (folder is not None):
        raise typer.BadParameter("give a FOLDER to read, or --scp to receive over the network (not both)")
    if (watch or class_folders) and folder is None:
        raise typer.BadParameter("--watch and --class-folders need a FOLDER")
    if (tls_ca or tls_cert or tls_key) and not scp:
        raise typer.BadParameter("--tls-ca/--tls-cert/--tls-key secure the --scp receiver: add --scp")
    if quarantine_mb < 0 or max_file_mb < 1:
        raise typer.BadParameter("--quarantine-mb takes 0 (keep nothing) or more, --max-file-mb 1 or more")
    warnings.filterwarnings("ignore", module="pydicom")  # non-conformant tags are common; bad files get a reason instead
    console = Console(stderr=True)
    try:
        dataset_store = DatasetStore.open_or_create(store, size, channels)
        config = ReadConfig(
            image_size=dataset_store.image_size,
            channels=dataset_store.channels,  # type: ignore[arg-type]
            modalities=frozenset(m.upper() for m in modality) or IMAGE_MODALITIES,
            window=window,  # type: ignore[arg-type]
            limits=Limits(max_file_bytes=max_file_mb * MiB),
        )
        label_map = Labels.from_csv(labels) if labels else Labels()
        if class_folders and folder is not None:
            label_map = label_map.merged(Labels.from_folders(folder))
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    ingestor = Ingestor(dataset_store, config, label_map, quarantine_bytes=quarantine_mb * MiB)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a service manager stops us: still write the report
    try:
        if scp:
            _serve(ingestor, ae_title, port, tuple(allow_ae), host, (tls_ca, tls_cert, tls_key), stop, console)
        elif watch and folder is not None:
            from edge_client.ingest.watch import watch as watch_inbox

            console.print(f"watching {folder} (Ctrl-C to stop)")
            watch_inbox(ingestor, folder, stop, poll_s=poll)
        elif folder is not None:
            ingestor.ingest_paths(discover(folder, exclude=dataset_store.root), progress=console.is_terminal)
    except KeyboardInterrupt:
        pass
    except NotADirectoryError as exc:
        raise typer.BadParameter(str(exc)) from exc
    except OSError as exc:
        raise fail(f"store I/O error: {exc}; free disk space or fix permissions on {store}, then re-run (done files are kept)", StorageError.exit_code) from exc
    summary = ingestor.summary()
    if report:
        from fedge.files import atomic_write_bytes

        atomic_write_bytes(report, summary.to_json().encode())  # never a half-written report after a crash
    _print_summary(console, summary, len(dataset_store))


def _serve(
    ingestor: Ingestor,
    ae_title: str,
    port: int,
    allow_ae: tuple[str, ...],
    host: str,
    tls_files: tuple[Optional[Path], Optional[Path], Optional[Path]],
    stop: threading.Event,
    console: Console,
) -> None:
    from edge_client.ingest.scp import ScpConfig, ScpTls, StorageSCP

    try:
        tls = ScpTls(*tls_files) if any(tls_files) else None  # type: ignore[arg-type]
        config = ScpConfig(ae_title=ae_title, port=port, allow_ae=allow_ae, host=host, tls=tls)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    server = StorageSCP(ingestor, config)
    try:
        server.start()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a key that does not match, a PEM that is not one
        raise typer.BadParameter(f"the receiver cannot start: {exc}") from exc
    secure = "DICOM TLS, " if tls else ""
    console.print(f"receiving as {ae_title} on {host}:{server.port} ({secure}from {', '.join(allow_ae)}) (Ctrl-C to stop)")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()


def _print_summary(console: Console, s: IngestSummary, stored: int) -> None:
    from rich.table import Table

    table = Table(title="fedge ingest")
    table.add_column("ingested", justify="right")
    table.add_column("duplicates", justify="right")
    table.add_column("quarantined", justify="right")
    table.add_column("not kept (quota)", justify="right")
    table.add_column("reasons")
    table.add_column("images in store", justify="right")
    table.add_column("seconds", justify="right")
    reasons = ", ".join(f"{k}={v}" for k, v in s.reasons.items()) or "-"
    table.add_row(str(s.ingested), str(s.duplicates), str(s.quarantined), str(s.quarantine_full), reasons, str(stored), f"{s.seconds:.2f}")
    console.print(table)
