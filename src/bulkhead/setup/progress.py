"""Progress display for long set-up steps (rich), and running commands under it.

Every command set-up runs shows as one step with a spinner and the last line
of its output, and a command that fails prints the tail of its log and where
the whole log is, so the user knows what to do next.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

from rich.console import Console

console = Console(stderr=True, highlight=False)


class SetupError(Exception):
    """A set-up step failed; the message says what failed and what to do."""


@contextlib.contextmanager
def step(title: str) -> Iterator["Step"]:
    start = time.monotonic()
    s = Step(title)
    with console.status(f"[bold]{title}[/]") as status:
        s.status = status
        try:
            yield s
        except BaseException:
            console.print(f"[red]✗[/] {title} [dim]({time.monotonic() - start:.1f} s)[/]")
            raise
    took = time.monotonic() - start
    note = f" — {s.note}" if s.note else ""
    console.print(f"[green]✓[/] {title}{note} [dim]({took:.1f} s)[/]")


class Step:
    def __init__(self, title: str) -> None:
        self.title = title
        self.note = ""
        self.status = None
        self._last_line = time.monotonic()

    def update(self, text: str) -> None:
        if self.status is not None:
            self.status.update(f"[bold]{self.title}[/] [dim]{text[:100]}[/]")
        if not console.is_terminal:
            # No spinner in a log (CI): a line every half minute shows the step lives.
            now = time.monotonic()
            if now - self._last_line >= 30:
                self._last_line = now
                console.print(f"  … {self.title}: {text[:100]}", markup=False)

    def run(self, argv: Sequence[str], log: Path, cwd: Path | None = None,
            env: dict[str, str] | None = None, what: str | None = None) -> None:
        """Run ``argv`` (no shell), its output into ``log``, its last line shown as progress."""
        log.parent.mkdir(parents=True, exist_ok=True)
        tail: deque[str] = deque(maxlen=15)
        with open(log, "ab") as f:
            f.write(f"\n$ {' '.join(argv)}\n".encode())
            f.flush()
            proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            assert proc.stdout is not None
            for raw in proc.stdout:
                f.write(raw)
                line = raw.decode(errors="replace").rstrip()
                if line:
                    tail.append(line)
                    self.update(line)
            rc = proc.wait()
        if rc != 0:
            sys.stderr.write("\n".join(tail) + "\n")
            raise SetupError(f"{what or argv[0]} failed (exit code {rc}); the full log is {log}")


def is_root() -> bool:
    return os.geteuid() == 0
