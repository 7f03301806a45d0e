"""``python -m landscape COMMAND [options]``: the toolkit's command-line entry points.

    python -m landscape lapq --model resnet8 --data digits --w-bits 3 --a-bits 3

A command is a module with a ``main(argv)``; add one to ``COMMANDS``. (``python -m
landscape.lapq`` also works, but ``import landscape`` has already imported that module, so
Python's runpy warns before running it a second time as ``__main__``; this dispatcher does not.)
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

COMMANDS = {
    "lapq": ("landscape.lapq", "the method table: layer-wise rules, Lp(p*), CD, LAPQ, batched"),
}


def program() -> str:
    """How the user called us: ``landscape`` (the console script) or ``python -m landscape``."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "landscape" if invoked == "landscape" else "python -m landscape"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {program()} COMMAND [options]   (COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{usage()}\n\nerror: unknown command {name!r}; choose from {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    module.main(rest, prog=f"{program()} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
