"""Following a job: a progress line that fits the terminal, or its events as JSON."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from qmgr.cli import client, human_size


def job_line(job: dict[str, Any], width: int = 28) -> str:
    p = job.get("progress") or {}
    phase = p.get("phase") or job["state"]
    done, total = p.get("done") or 0, p.get("total")
    if p.get("fraction") is not None and phase not in ("done", "downloading"):
        frac = min(1.0, float(p["fraction"]))
        filled = int(frac * width)
        return (f"{phase} {frac * 100:5.1f}% [{'#' * filled}{'.' * (width - filled)}] "
                f"{p.get('message', '')[:40]}")
    if phase != "downloading" or not total:
        return f"{phase}..."
    frac = min(1.0, done / total)
    filled = int(frac * width)
    speed = p.get("speed")
    eta = f"  ETA {max(0, (total - done) / speed):.0f} s" if speed else ""
    rate = f"  {human_size(int(speed))}/s" if speed else ""
    return (f"{frac * 100:5.1f}% [{'#' * filled}{'.' * (width - filled)}] "
            f"{human_size(done)} / {human_size(total)}{rate}{eta}")


def _columns() -> int:
    """The terminal's width now (it may be resized while a pull runs)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 80


def progress_line(label: str, job: dict[str, Any], columns: int) -> str:
    """One line of progress that fits ``columns``: a line that wraps leaves a stale copy
    behind at every redraw, as ``\r`` only goes back to the start of the last row. The bar
    narrows first, then the label loses its middle, then goes; then the end is cut."""
    room = max(columns - 1, 10)
    short = label if len(label) <= 24 else label[:10] + "..." + label[-11:]
    for text in (f"{label}  {job_line(job, 28)}", f"{label}  {job_line(job, 10)}",
                 f"{short}  {job_line(job, 10)}", job_line(job, 10)):
        if len(text) <= room:
            return text
    return job_line(job, 0)[:room]


def follow(ctx: click.Context, job: dict[str, Any], *, as_json: bool, quiet: bool,
           label: str) -> dict[str, Any]:
    """Show a job's events until it ends; returns its final state. Ctrl-C asks whether to
    cancel it or leave it running in the daemon."""
    c = client(ctx)
    tty = sys.stderr.isatty() and not quiet and not as_json
    last_phase = None
    last_draw = 0.0
    final = job
    # Without a bar or --json, only changes of state and phase are wanted.
    query = "" if tty or as_json else "?progress=0"
    try:
        for event in c.stream_lines(f"/v1/jobs/{job['id']}/events{query}"):
            final = event
            if as_json:
                sys.stdout.write(json.dumps(event) + "\n")
                sys.stdout.flush()
                continue
            phase = (event.get("progress") or {}).get("phase")
            if tty and (time.monotonic() - last_draw > 0.1 or event["state"] != "running"):
                click.echo("\r" + progress_line(label, event, _columns()) + "\x1b[K", nl=False,
                           err=True)
                last_draw = time.monotonic()
            elif not tty and not quiet and phase != last_phase and phase:
                click.echo(f"{label}: {phase}", err=True)
            last_phase = phase
    except KeyboardInterrupt:
        if tty:
            click.echo("", err=True)
        leave = sys.stdin.isatty() and not click.confirm(
            f"Cancel job {job['id']}? (no leaves it running in the daemon)", default=False,
            err=True)
        if leave:
            click.echo(f"job {job['id']} goes on: `qmgr jobs` shows it, "
                       f"`qmgr cancel {job['id']}` stops it", err=True)
            sys.exit(130)
        c.post(f"/v1/jobs/{job['id']}/cancel", {})
        click.echo(f"cancelled job {job['id']}", err=True)
        sys.exit(130)
    if tty:
        click.echo("", err=True)
    return final
