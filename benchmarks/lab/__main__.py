"""`python -m benchmarks.lab build|table|probe|data|seeds|weights [--quick]`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("build", "table", "probe", "data", "seeds", "weights")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m benchmarks.lab {{{','.join(commands)}}} [--quick] [options]  (--help after a command for its options)")
        return 2
    command, rest = argv[0], argv[1:]
    if command == "build":
        from .build import main as run
    elif command == "table":
        from .table import main as run
    elif command == "probe":
        from .probe import main as run
    elif command == "seeds":
        from .seeds import main as run
    elif command == "weights":
        from .weights import main as run
    else:
        from .build_data import main as run
    return run(rest)


if __name__ == "__main__":
    raise SystemExit(main())
