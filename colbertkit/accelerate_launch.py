"""``accelerate launch`` with a quiet failure: ``python -m colbertkit.accelerate_launch ARGS``.

The arguments are accelerate's own. The only difference: when a worker fails, accelerate's
launcher ends in a Python traceback of its own (CalledProcessError, ChildFailedError) under the
worker's one-line error. Here it exits with the worker's exit code instead.
"""

from __future__ import annotations

import subprocess
import sys


def main() -> int:
    from colbertkit.processes import die_with_parent

    die_with_parent()  # the command that started the launch was killed: so is the launch
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args()
    try:
        launch_command(args)
    except subprocess.CalledProcessError as error:  # one process: accelerate's simple launcher
        return error.returncode or 1
    except ChildFailedError as error:  # several processes: torchrun
        codes = [failure.exitcode for failure in error.failures.values()]
        return next((code for code in codes if code > 0), 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
