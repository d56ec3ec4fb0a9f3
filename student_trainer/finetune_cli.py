"""``retnet-distill finetune-teacher``: the command line of :mod:`student_trainer.training.finetune_teacher`.

``student_trainer.cli`` registers it with ``finetune_cli.add_parser(commands)``; the module also
runs on its own (``python -m student_trainer.finetune_cli --config configs/teacher_ft.yaml``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _finetune_teacher(args: argparse.Namespace) -> int:
    import logging

    from shared.token_shards import ShardError
    from student_trainer.training.config import ConfigError
    from student_trainer.training.finetune_teacher import FinetuneError, finetune, load_finetune_config
    from teacher_server.engines.model_source import ModelSourceError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_finetune_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"retnet-distill finetune-teacher: {exc}", file=sys.stderr)
        return 2
    try:
        info = finetune(config)
    except (FinetuneError, ShardError, ModelSourceError, FileExistsError, FileNotFoundError) as exc:
        print(f"retnet-distill finetune-teacher: {exc}", file=sys.stderr)
        return 1
    summary = {key: info[key] for key in ("save_dir", "method", "steps", "held_out_loss", "seconds")}
    print(json.dumps(summary))
    print(f"serve it with: retnet-teacher --model {info['save_dir']}")
    return 0


def add_parser(subcommands: Any) -> argparse.ArgumentParser:
    """Register ``finetune-teacher`` on ``subcommands`` (an ``add_subparsers()`` result), with its handler."""
    parser = subcommands.add_parser(
        "finetune-teacher",
        help="finetune the teacher (full or LoRA, merged) on the shards; saves a model retnet-teacher serves",
    )
    parser.add_argument("--config", help="a YAML file such as configs/teacher_ft.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value settings that override the YAML")
    parser.set_defaults(handler=_finetune_teacher)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retnet-distill")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["finetune-teacher", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
