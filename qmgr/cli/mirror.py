"""``qmgr mirror serve DIR``: serve a folder of GGUF repositories to other machines."""

from __future__ import annotations

from pathlib import Path

import click

from qmgr.cli import cli


@cli.group(name="mirror")
def mirror() -> None:
    """A read-only mirror speaking the Hugging Face endpoints qmgr uses."""


@mirror.command(name="serve")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (loopback unless you say otherwise).")
@click.option("--port", default=8787, show_default=True, type=int, help="Port (0: any free).")
def serve(directory: Path, host: str, port: int) -> None:
    """Serve DIRECTORY/OWNER/REPO/*.gguf as hf.co/OWNER/REPO.

    Clients pull with QMGR_HF_ENDPOINT=http://HOST:PORT qmgr pull hf.co/OWNER/REPO:QUANT.
    """
    import logging

    from qmgr import mirror as mirror_mod

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = mirror_mod.serve(directory, host, port)
    click.echo(f"serving {directory.resolve()} at {server.url}  "
               f"(QMGR_HF_ENDPOINT={server.url})", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
