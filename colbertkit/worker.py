"""What each process runs under ``accelerate launch``: ``python worker.py CONFIG.json``.

The launcher (``colbertkit train``) writes CONFIG.json from the profile. A known failure prints
one line on stderr (ranks other than 0 say which rank they are) and exits with the error's
code, which ``accelerate launch`` and then ``colbertkit train`` pass on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: worker.py CONFIG.json (written by colbertkit train)", file=sys.stderr)
        return 2
    from colbertkit.errors import ColbertkitError, debug_enabled
    from colbertkit.processes import die_with_parent

    die_with_parent()  # accelerate's launcher is gone: no orphan keeps writing checkpoints

    try:
        from colbertkit.training import train

        settings = json.loads(Path(args[0]).read_text())
        train(settings)
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
