"""What each process runs under ``accelerate launch`` for a scoring launch:
``python -m colbertkit.score_worker score_job.json`` (see :mod:`colbertkit.distributed_scoring`).

A known failure prints one line on stderr (ranks other than 0 say which rank they are) and exits
with the error's code, which ``accelerate launch`` and then ``colbertkit score`` pass on
(:func:`colbertkit.worker.run_as_worker`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from colbertkit.worker import run_as_worker


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            "usage: score_worker.py score_job.json (written by colbertkit score)", file=sys.stderr
        )
        return 2

    def work() -> None:
        from colbertkit.distributed_scoring import ScoreJob, run_score_worker

        run_score_worker(ScoreJob.model_validate_json(Path(args[0]).read_text()))

    return run_as_worker(work)


if __name__ == "__main__":
    sys.exit(main())
