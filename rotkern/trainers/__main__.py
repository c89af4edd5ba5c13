"""python -m rotkern.trainers <command> [--key=value ...] (also the rotkern console script).

Commands: quadratic (Figure 4 in miniature), train (one run), compare (Figure 1 in miniature: one model under
several rotation scopes), validate (eager against fused RotatedAdamW on identical batches), analyze (the paper's
metrics on checkpoints: update orthogonality, gradient bound, second moments, Hessian rows).
"""

from __future__ import annotations

import argparse
import sys

from .common import TrainerError, add_config_args, config_from_args


def _add_config_args(parser: argparse.ArgumentParser, cfg_cls) -> None:  # kept for callers of the old name
    add_config_args(parser, cfg_cls)


def main(argv: list[str] | None = None) -> int:
    from . import analyze as analyze_mod
    from .analyze import AnalyzeConfig
    from .compare import CompareConfig
    from .quadratic import QuadraticConfig
    from .train import PRESETS, TrainConfig
    from .validate import ValidateConfig

    parser = argparse.ArgumentParser(prog="rotkern", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    text = "Figure 4 in miniature: Adam, rotated Adam and SGD-M on an ill-conditioned quadratic, aligned and rotated"
    q = sub.add_parser("quadratic", help=text, description=text)
    add_config_args(q, QuadraticConfig)
    commands = {
        "train": (TrainConfig, "one training run (GPT / SimpleViT / ResNet); --preset=" + "|".join(PRESETS)),
        "compare": (CompareConfig, "Figure 1 in miniature: the same run under several rotation scopes"),
        "validate": (ValidateConfig, "eager vs fused RotatedAdamW on identical batches from an identical init"),
    }
    for name, (cls, text) in commands.items():
        add_config_args(sub.add_parser(name, help=text, description=text), cls, suppress=True)
    text = "the paper's metrics (CV, gradient bound, v spread, Hessian rows) on checkpoints, side by side"
    raw = argparse.RawTextHelpFormatter
    a = sub.add_parser("analyze", help=text, description=text, epilog=analyze_mod.__doc__, formatter_class=raw)
    a.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_CKPT", help="ckpt.pt files, run folders, compare out_dirs")
    add_config_args(a, AnalyzeConfig, suppress=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "quadratic":
            from .quadratic import main as quadratic_main

            quadratic_main(config_from_args(QuadraticConfig, args))
            return 0
        if args.command == "analyze":
            from .analyze import analyze

            analyze(args.paths, config_from_args(AnalyzeConfig, args))
            return 0
        cls = commands[args.command][0]
        cfg = config_from_args(cls, args, PRESETS)
        if args.command == "train":
            from .train import train

            train(cfg)
            return 0
        if args.command == "compare":
            from .compare import compare

            compare(cfg)
            return 0
        from .validate import validate

        return 0 if validate(cfg)["passed"] else 1
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
