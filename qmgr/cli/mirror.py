"""``qmgr mirror serve DIR``: serve a folder of GGUF files to qmgr on other machines."""

from __future__ import annotations

from pathlib import Path

import click

from qmgr.cli import cli

MAX_REFERENCES_SHOWN = 20


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
    import logging
    import signal
    import socket
    import sys

    from qmgr import mirror as mirror_mod

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    if quiet:
        mirror_mod.access_log.setLevel(logging.WARNING)
    state = state or mirror_mod.default_state_path(directory)
    try:
        server = mirror_mod.serve(directory, host, port, state=state)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}"
                                   ) from None
    try:
        try:
            layout = server.scan()
        except OSError as e:
            raise click.ClickException(f"cannot read {server.root}: {e.strerror or e}"
                                       ) from None
        if not layout.repositories:
            raise click.ClickException(mirror_mod.no_models_message(server.root, layout))
        refs = [r for repo in layout.repositories for r in mirror_mod.references(server, repo)]
        click.echo(f"serving {server.root} at {server.url}: {len(refs)} variant"
                   f"{'' if len(refs) == 1 else 's'} in {len(layout.repositories)} "
                   f"repositor{'y' if len(layout.repositories) == 1 else 'ies'}", err=True)
        for ref in refs[:MAX_REFERENCES_SHOWN]:
            click.echo(f"  {ref}", err=True)
        if len(refs) > MAX_REFERENCES_SHOWN:
            click.echo(f"  ... and {len(refs) - MAX_REFERENCES_SHOWN} more", err=True)
        for path, why in layout.ignored:
            click.echo(f"not served: {path.relative_to(server.root)}: {why}", err=True)
        bound = str(server.server_address[0])
        reachable = server.url
        if bound in ("0.0.0.0", "::"):  # a wildcard address: tell clients a name to use
            reachable = server.url.replace(f"[{bound}]" if ":" in bound else bound,
                                           socket.gethostname(), 1)
        example = refs[0] if refs else "hf.co/OWNER/REPO:QUANT"
        click.echo(f"pull elsewhere with: QMGR_HF_ENDPOINT={reachable} qmgr pull {example}",
                   err=True)
        # systemd stops a service with SIGTERM: close down as on Ctrl-C.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        files, size = server.start_hashing()
        if files:
            click.echo(f"hashing {files} file{'' if files == 1 else 's'}, "
                       f"{mirror_mod.size_text(size)}, in the background; listings answer 503 "
                       f"until done (digests kept in {server.digests.kept_in})", err=True)
        else:
            click.echo(f"every digest is known already (kept in {server.digests.kept_in}); "
                       "nothing to hash", err=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
