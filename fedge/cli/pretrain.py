"""`fedge pretrain`: train a backbone centrally on one dataset, the foundation the federation adapts.

The checkpoint it writes is what `--init` takes; the federation re-initialises the head when its
dataset has another class count (fedge.checkpoint.init_from_checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedge.cli.options import AUGMENT_HELP, fail, fail_with, parse_key_values


def pretrain(
    dataset: str = typer.Option("pneumoniamnist", help="MedMNIST subset to pretrain on: <name>.npz in --data-dir, else downloaded"),
    data_dir: str = typer.Option(None, envvar="FEDGE_DATA_DIR", help="Folder holding <dataset>.npz (or medmnist/<dataset>.npz)"),
    arch: str = typer.Option("vit", help="Model architecture from the zoo (vit, resnet, cnn)"),
    preset: str = typer.Option("small", help="ViT size preset (tiny, small, base); ignored by other archs"),
    option: list[str] = typer.Option([], "--option", "-o", help="Architecture option KEY=VALUE (JSON value), repeatable"),
    epochs: int = typer.Option(3, min=1, help="Training epochs over the train split"),
    lr: float = typer.Option(3e-4, help="Learning rate (Adam)"),
    batch_size: int = typer.Option(64, min=2, help="Batch size"),
    seed: int = typer.Option(0, help="Seed for initialisation and batch order"),
    augment: bool = typer.Option(False, "--augment", help=AUGMENT_HELP),
    out: Path = typer.Option(..., help="Checkpoint to write (safetensors); pass it to the federation's --init"),
) -> None:
    """Pretrain a backbone on one dataset and write a checkpoint."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedge.checkpoint import save_checkpoint
    from fedge.data import load_medmnist
    from fedge.errors import FedgeError
    from fedge.models import MODELS, build_model
    from fedge.tasks import ClassificationTask

    console = Console()
    # Options first: a typo must not wait for the dataset (or its download).
    options = parse_key_values(option, "--option patch_size=8")
    if arch == "vit":
        options = {"preset": preset, **options}
    if lr <= 0:
        raise fail(f"--lr must be > 0, got {lr}")
    if out.is_dir():
        raise fail(f"--out {out} is a folder; name the checkpoint file, e.g. {out / 'backbone.safetensors'}")
    try:
        MODELS.get(arch)
        task = ClassificationTask(load_medmnist(dataset, data_dir))
        config = task.model_config(arch, **options)  # options that depend on the images (e.g. patch size) fail here
        torch.manual_seed(seed)
        model = build_model(config)
    except (FedgeError, ValueError, OSError) as exc:
        raise fail_with(exc) from None
    params = sum(p.numel() for p in model.parameters())
    console.print(f"pretraining {arch} ({params:,} parameters) on {dataset}: {len(task.splits.labels['train'])} images, {epochs} epochs")
    val_split = "val" if "val" in task.splits.images else "test"
    metrics: dict[str, float] = {}
    columns = (TextColumn("[bold]epochs"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("epochs", total=epochs)
        for epoch in range(epochs):
            result = task.train_local(model, epochs=1, lr=lr, batch_size=batch_size, seed=seed * 1000 + epoch, augment=augment)
            metrics = task.evaluate(model, val_split)
            progress.console.print(
                f"epoch {epoch + 1:>3}  loss {result.loss:.4f}  train acc {result.accuracy:.4f}  {val_split} AUC {metrics['auc']:.4f}  {result.seconds:.0f}s"
            )
            progress.advance(bar)
    test = task.evaluate(model, "test")
    save_checkpoint(
        out, model.state_dict(), config,
        dataset=dataset, epochs=epochs, lr=lr, seed=seed, augment=augment, val_auc=metrics["auc"], test_auc=test["auc"], params=params,
    )  # fmt: skip
    console.print(f"test AUC {test['auc']:.4f}, accuracy {test['accuracy']:.4f}; checkpoint: {out}")
