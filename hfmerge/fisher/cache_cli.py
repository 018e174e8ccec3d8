"""``hfmerge cache``: see and clean the Fisher cache.

    hfmerge cache list [--json]
    hfmerge cache clean [--all | --older-than DAYS | --max-size SIZE] [--dry-run]

``list`` prints one row per entry, least recently used first (size, last use, model, task, λ)
and the total. ``clean`` deletes entries: all of them, those not used for DAYS days, or the
least recently used until the cache fits SIZE; ``--dry-run`` only says what it would delete.
Damaged entries, and unfinished writes over an hour old, are always cleaned. Every new Fisher also keeps the
cache within ``HFMERGE_FISHER_CACHE_MAX`` (default 50GB) by least-recently-used eviction.
"""

from __future__ import annotations

import argparse
import json
import time

from ..errors import OptionError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``cache`` arguments to `parser` (not -v/-q)."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="{list,clean}")
    listing = actions.add_parser("list", help="list the Fisher cache's entries, least recently used first")
    listing.add_argument("--json", action="store_true", help="print the entries as JSON")
    clean = actions.add_parser("clean", help="delete Fisher cache entries")
    which = clean.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="delete every entry")
    which.add_argument("--older-than", metavar="DAYS", type=float, help="delete the entries not used for DAYS days")
    which.add_argument("--max-size", metavar="SIZE", help="delete the least recently used entries until the cache fits SIZE (e.g. 20GB)")
    clean.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    for sub in (listing, clean):
        sub.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
        sub.add_argument("-q", "--quiet", action="store_true", help="accepted for symmetry; the output is already short")
    return parser


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def run(args: argparse.Namespace) -> int:
    """Run ``hfmerge cache`` with parsed arguments."""
    from ..fileio import human_size, parse_size
    from .cache import RECENT_USE_SECONDS, UNFINISHED, cache_dir, delete_cache_entries, scan_cache

    entries = scan_cache()
    now = time.time()
    if args.action == "list":
        if args.json:
            print(json.dumps([{"path": str(e.path), "bytes": e.size, "last_used": e.last_used, "model": e.model, "task": e.task,
                               "lambda": e.scale or None, "kind": e.kind, "problem": e.problem} for e in entries], indent=2))
            return 0
        print(f"Fisher cache: {cache_dir()}")
        for e in entries:
            what = f"damaged: {e.problem}" if e.problem else f"{e.model} on {e.task}" + (f" at λ = {float(e.scale):.4g}" if e.scale else "")
            if not e.problem and e.kind == "gram":
                what += " (RegMean Gram matrices)"
            print(f"  {human_size(e.size):>9}  {_age(now - e.last_used):>12}  {e.path.name[:16]}  {what}")
        print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {human_size(sum(e.size for e in entries))}")
        return 0
    # Damaged entries always go; an unfinished write only once it is an hour old (another
    # process may be writing it now).
    doomed = [e for e in entries if e.problem and (e.problem != UNFINISHED or now - e.last_used > RECENT_USE_SECONDS)]
    sound = [e for e in entries if not e.problem]
    if args.all:
        doomed += sound
    elif args.older_than is not None:
        if args.older_than < 0:
            raise OptionError(f"--older-than: got {args.older_than}; expected a number of days >= 0")
        doomed += [e for e in sound if now - e.last_used > args.older_than * 86400]
    else:
        cap = parse_size(args.max_size, field="--max-size")
        total = sum(e.size for e in sound)
        for e in sound:  # least recently used first
            if total <= cap:
                break
            doomed.append(e)
            total -= e.size
    size = sum(e.size for e in doomed)
    if args.dry_run:
        for e in doomed:
            print(f"would delete {e.path} ({human_size(e.size)})")
        print(f"would free {human_size(size)} ({len(doomed)} entries)")
        return 0
    freed = delete_cache_entries(doomed)
    print(f"deleted {len(doomed)} entr{'y' if len(doomed) == 1 else 'ies'}, freed {human_size(freed)}; "
          f"{len(entries) - len(doomed)} left in {cache_dir()}")
    return 0
