"""`fedge keys`: Ed25519 key pairs for signing updates (sites) and the global model (server)."""

from __future__ import annotations

from pathlib import Path

import typer


def keys(
    name: str = typer.Argument(..., help="Key owner: a site name, or 'server'"),
    out: Path = typer.Option(Path("keys"), help="Folder for NAME.key (private, mode 0600) and NAME.pub"),
    force: bool = typer.Option(False, help="Overwrite an existing key"),
) -> None:
    """Create a signing key pair. Give NAME.pub to the other side: the server's --trusted-keys folder holds
    every site's .pub; each agent's --server-key is server.pub."""
    from fedge.protocol.signing import Signer
    from fedge.protocol.topics import check_name

    try:
        check_name("key name", name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    private, public = out / f"{name}.key", out / f"{name}.pub"
    if private.exists() and not force:
        raise typer.BadParameter(f"{private} exists; pass --force to replace it (peers holding {public.name} must then get the new one)")
    out.mkdir(parents=True, exist_ok=True)
    Signer.generate().save(private, public)
    typer.echo(f"wrote {private} (keep it on this device) and {public} (give it to the peer)")
