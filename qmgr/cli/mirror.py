"""``qmgr mirror serve DIR``: serve a folder of GGUF files to qmgr on other machines."""

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
              help="Address to bind: 0.0.0.0 (or ::) serves the local network.")
@click.option("--port", default=8787, show_default=True, type=int, help="Port (0: any free).")
@click.option("--state", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
              help="File that keeps the digests between runs "
                   "[default: $XDG_CACHE_HOME/qmgr/mirror/DIRNAME-HASH.sqlite].")
@click.option("-q", "--quiet", is_flag=True, help="No request log.")
def serve(directory: Path, host: str, port: int, state: Path | None, quiet: bool) -> None:
    """Serve the GGUF files in DIRECTORY as Hugging Face repositories.

    \b
    Two layouts, which may be mixed:
      DIRECTORY/NAME-QUANT.gguf             -> hf.co/local/NAME:QUANT
      DIRECTORY/OWNER/REPO/NAME-QUANT.gguf  -> hf.co/OWNER/REPO:QUANT
    For example ~/models/gemma-3-270m-it-Q4_K_M.gguf and ~/models/gemma-3-270m-it-Q8_0.gguf
    are hf.co/local/gemma-3-270m-it:Q4_K_M and :Q8_0; shards (NAME-QUANT-00001-of-00003.gguf)
    make one variant.

    \b
    Elsewhere: QMGR_HF_ENDPOINT=http://HOST:PORT qmgr pull hf.co/local/NAME:QUANT

    Digests (sha256) are computed once, in the background, and kept in a state file, so a
    restart hashes only new or changed files (a NAME.sha256 file beside NAME spares it too).
    Until a repository's files are hashed, its listing answers 503 with Retry-After; files
    download at once. One line per request goes to stderr.
    """
    import os
    import sys

    # The mirror runs as its own program (the client imports nothing of it): exec it here.
    argv = [sys.executable, "-m", "qmgr.mirror", str(directory), "--host", host,
            "--port", str(port)]
    if state is not None:
        argv += ["--state", str(state)]
    if quiet:
        argv.append("-q")
    os.execv(sys.executable, argv)
