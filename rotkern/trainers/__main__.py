"""``python -m rotkern.trainers <command> [--key=value ...]`` (also the ``rotkern`` console script)."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _add_config_args(parser: argparse.ArgumentParser, cfg_cls) -> None:
    for f in dataclasses.fields(cfg_cls):
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default)


def main(argv: list[str] | None = None) -> int:
    from .quadratic import QuadraticConfig
    from .quadratic import main as quadratic_main

    parser = argparse.ArgumentParser(prog="rotkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quadratic", help="Figure 4 in miniature: Adam vs rotated Adam vs SGD-M on a quadratic")
    _add_config_args(q, QuadraticConfig)
    args = parser.parse_args(argv)
    if args.command == "quadratic":
        cfg = QuadraticConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(QuadraticConfig)})
        quadratic_main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
