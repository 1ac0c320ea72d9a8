"""What each process runs under ``accelerate launch``: ``python -m colbertkit.worker CONFIG.json``.

The launcher (``colbertkit train``) writes CONFIG.json from the profile. A known failure prints
one line on stderr (ranks other than 0 say which rank they are) and exits with the error's
code, which ``accelerate launch`` and then ``colbertkit train`` pass on. :func:`run_as_worker`
is that boundary, shared with the scoring worker (:mod:`colbertkit.score_worker`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path


def run_as_worker(work: Callable[[], None]) -> int:
    """Run ``work`` as a launched process: it dies with its launcher (no orphan keeps writing),
    and a known failure is one line on stderr and the error's exit code."""
    from colbertkit.errors import ColbertkitError, debug_enabled
    from colbertkit.processes import die_with_parent

    die_with_parent()
    try:
        work()
    except ColbertkitError as error:
        if debug_enabled():
            raise
        rank = os.environ.get("RANK", "0")
        prefix = "" if rank == "0" else f"[rank {rank}] "
        print(f"Error: {prefix}{error}", file=sys.stderr)
        return error.exit_code
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: worker.py CONFIG.json (written by colbertkit train)", file=sys.stderr)
        return 2

    def work() -> None:
        from colbertkit.training import train

        train(json.loads(Path(args[0]).read_text()))

    return run_as_worker(work)


if __name__ == "__main__":
    sys.exit(main())
