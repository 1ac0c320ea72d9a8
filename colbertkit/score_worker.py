"""What each process runs under ``accelerate launch`` for a scoring launch:
``python -m colbertkit.score_worker score_job.json`` (see :mod:`colbertkit.distributed_scoring`).

A known failure prints one line on stderr (ranks other than 0 say which rank they are) and exits
with the error's code, which ``accelerate launch`` and then ``colbertkit score`` pass on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            "usage: score_worker.py score_job.json (written by colbertkit score)", file=sys.stderr
        )
        return 2
    from colbertkit.errors import ColbertkitError, debug_enabled
    from colbertkit.processes import die_with_parent

    die_with_parent()  # accelerate's launcher is gone: so is this worker

    try:
        from colbertkit.distributed_scoring import ScoreJob, run_score_worker

        run_score_worker(ScoreJob.model_validate_json(Path(args[0]).read_text()))
    except ColbertkitError as error:
        if debug_enabled():
            raise
        rank = os.environ.get("RANK", "0")
        prefix = "" if rank == "0" else f"[rank {rank}] "
        print(f"Error: {prefix}{error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
