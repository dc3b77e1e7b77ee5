"""The ``fastrec`` command."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    from .info import main as info_main

    return info_main(["--json"] if args.json else [])


def _cmd_example(args) -> int:
    from .examples import embedding_bag_example

    embedding_bag_example()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastrec", description="fastrec: fast inference for recommendation models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, CPU ISA chosen, threads, backends")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(fn=_cmd_info)
    p = sub.add_parser("example", help="run a short embedding-bag example and time it against numpy")
    p.set_defaults(fn=_cmd_example)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
