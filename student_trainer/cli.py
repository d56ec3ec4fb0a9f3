"""``retnet-distill``: the trainer's command line. Each subcommand is one job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _main_job(args: argparse.Namespace) -> int:
    from student_trainer.main_job import run_main_job

    summary = run_main_job(
        model=args.model, prompt=args.prompt, k=args.k, workdir=Path(args.workdir), model_cache_dir=args.model_cache_dir
    )
    return 0 if summary["teacher_exit_code"] == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    from student_trainer.main_job import DEFAULT_CACHE_DIR
    from teacher_server.engines.model_source import EMBEDDED_ALIAS

    parser = argparse.ArgumentParser(prog="retnet-distill", description="Distil a Transformer teacher into a RetNet student.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    main = commands.add_parser("main", help="the main job on embedded defaults (what `make run` runs)")
    main.add_argument("--model", default=EMBEDDED_ALIAS, help="teacher model (default: the embedded SmolLM2)")
    main.add_argument("--prompt", default="The capital of France is", help="text whose next-token top-k is shown")
    main.add_argument("--k", type=int, default=5, help="how many top entries to show")
    main.add_argument("--workdir", default="runs/main", help="where logs go")
    main.add_argument("--model-cache-dir", default=DEFAULT_CACHE_DIR, help="where GGUF teachers are converted once")
    main.set_defaults(handler=_main_job)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
