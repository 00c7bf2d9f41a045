"""``python main.py ...``: the command line, run from the repository root.

The commands live in ``runners/cli.py`` (installed as the ``ccmh`` command); this file
stays out of the installed package so that ``import main`` elsewhere never finds it.
"""
import sys

from runners.cli import main

if __name__ == "__main__":
    sys.exit(main())
