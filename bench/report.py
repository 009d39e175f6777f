"""What every benchmark script shares: how many runs, who goes first, and its table in
docs/benchmarks.md.

Each script measures pych and its peer (QEMU) in turn, rotating who goes first from one run
to the next, takes ``--runs`` runs (default ``$BENCH_RUNS`` or 3), and writes its own section
of docs/benchmarks.md between the markers ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``:
the date, the commit, the run count, the host's load average before and after, then its
tables (median with min–max, and the ratio to the peer). Nothing in those sections is
edited by hand; the text around them explains each table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
MIN_RUNS = 3            # what a recorded figure needs; fewer runs are marked as a smoke run

T = TypeVar("T")


def add_runs_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", MIN_RUNS)),
                    help=f"runs per VMM (default $BENCH_RUNS or {MIN_RUNS}; fewer than "
                         f"{MIN_RUNS} is recorded as a smoke run)")
    ap.add_argument("--no-write", action="store_true",
                    help="print the tables only; leave docs/benchmarks.md alone")


def rotated(contenders: Sequence[T], run: int) -> list[T]:
    """The order of run ``run`` (0-based): each run starts with the next contender, so with
    two each goes first every other run."""
    k = run % len(contenders)
    return list(contenders[k:]) + list(contenders[:k])


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "pych"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out or "unknown") + (" + uncommitted changes to pych/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stat(xs: Sequence[float], fmt: str = ".1f") -> str:
    """``median (min–max)``; a single value alone."""
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}–{format(max(xs), fmt)})"


def ratio(pych: Sequence[float], peer: Sequence[float], fmt: str = ".2f") -> str:
    """pych / peer of the medians, and run by run (the pairs ran back to back)."""
    if not pych or not peer:
        return "—"
    med = statistics.median(pych) / statistics.median(peer)
    pairs = [a / b for a, b in zip(pych, peer) if b]
    text = f"**{format(med, fmt)}×**"
    if len(pairs) > 1:
        text += f" (runs {min(pairs):{fmt}}–{max(pairs):{fmt}}×)"
    return text


def host_note() -> str:
    """What else the host was doing, as whoever ran the benchmark says in ``BENCH_HOST_NOTE``
    (the load average shows how busy it was, not with what)."""
    note = os.environ.get("BENCH_HOST_NOTE", "").strip()
    return f" Also running on the host: {note}." if note else ""


class Run:
    """One script's measurement session: records the load and date when it starts."""

    def __init__(self, name: str, command: str, runs: int):
        if runs < 1:
            raise SystemExit("--runs must be at least 1")
        self.name, self.command, self.runs = name, command, runs
        self.load_before = loadavg()
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.commit = commit()                  # the code measured: as it was at the start

    def runs_range(self) -> Iterator[int]:
        return iter(range(self.runs))

    def header(self) -> str:
        load_after = loadavg()
        smoke = (f" — **a smoke run: fewer than the {MIN_RUNS} runs a recorded figure needs**"
                 if self.runs < MIN_RUNS else "")
        return (f"`{self.command}` — {self.started:%Y-%m-%d %H:%M} UTC, commit {self.commit}, "
                f"{self.runs} run(s) per VMM, who goes first rotating{smoke}. "
                f"Host load average (1/5/15 min) before {self.load_before}, after {load_after} "
                f"on {os.cpu_count()} CPUs.{host_note()}")

    def write(self, body: str, *, no_write: bool = False) -> str:
        """Print the section and put it between its markers in docs/benchmarks.md."""
        section = f"{self.header()}\n\n{body.strip()}\n"
        print(section, flush=True)
        if not no_write:
            write_section(self.name, section)
            print(f"written to {DOC.relative_to(REPO)} (bench:{self.name})")
        return section


def write_section(name: str, section: str, doc: Path = DOC) -> None:
    """Replace what lies between ``<!-- bench:name -->`` and ``<!-- /bench:name -->``; a
    section without markers yet is appended at the end."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{begin}\n{section.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    doc.write_text(text)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
