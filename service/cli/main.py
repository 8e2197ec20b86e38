"""Entry point of the ``classmeans`` console script."""

from __future__ import annotations

import argparse
import sys

from service.cli import calibrate_cmd, cascade_cmd, ics_cmd, import_cmd, serve_cmd, timing_cmd, train_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="classmeans", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train_cmd, import_cmd, calibrate_cmd, cascade_cmd, serve_cmd, ics_cmd, timing_cmd):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from service.errors import ServiceError

    try:
        return int(args.func(args) or 0)
    except (ServiceError, ValueError) as exc:
        print(f"classmeans {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
