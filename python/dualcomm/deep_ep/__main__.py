"""`python -m dualcomm.deep_ep script.py args...` (or `-m module args...`): runs an unmodified
program that imports `deep_ep`, with `deep_ep` resolving to dualcomm (see `install`)."""

from __future__ import annotations

import runpy
import sys

from dualcomm.deep_ep import install

USAGE = "usage: python -m dualcomm.deep_ep (script.py | -m module) [args...]"


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        sys.exit(0 if argv else 2)
    install()
    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            sys.exit(2)
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
