"""``retnet-distill``: the trainer's command line. Each subcommand is one job."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Before torch starts OpenMP: on a shared machine, spinning OpenMP threads slowed one forward from
# 0.27 s to 7 s (DESIGN.md section 14). A value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _main_job(args: argparse.Namespace) -> int:
    import signal

    from student_trainer.main_job import run_main_job

    # SIGTERM (docker stop, kill) unwinds like Ctrl-C: the teacher service is stopped, telemetry closed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    result = run_main_job(model=args.model, workdir=Path(args.workdir), teacher_url=args.teacher_url,
                          max_steps=args.max_steps, data_dir=args.data_dir, model_cache_dir=args.model_cache_dir,
                          eval_batches=args.eval_batches, device=args.device, student=args.student)
    return 0 if result["teacher_exit_code"] in (0, None) else 1


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from student_trainer.evaluation.evaluate import EvalSettings, EvaluationError, evaluate
    from student_trainer.hf_export.export import ExportError
    from student_trainer.evaluation.lm_eval_tasks import LmEvalError
    from student_trainer.main_job import print_report
    from student_trainer.training.checkpoint import CheckpointNotFound

    settings = EvalSettings(checkpoint=args.checkpoint, data=args.data, teacher=args.teacher, split=args.split,
                            batches=args.batches, batch_size=args.batch_size, device=args.device,
                            prompts=args.prompt or EvalSettings.__dataclass_fields__["prompts"].default_factory(),
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, output_dir=args.output_dir, model_cache_dir=args.model_cache_dir,
                            context=args.context, buckets=args.buckets, context_rows=args.context_rows,
                            lm_eval_tasks=args.lm_eval, lm_eval_limit=args.lm_eval_limit)
    console = Console(stderr=True)
    try:
        with console.status("evaluating") as status:
            report = evaluate(settings, progress=status.update)
    except (EvaluationError, CheckpointNotFound, FileNotFoundError, LmEvalError, ExportError) as exc:
        print(f"retnet-distill evaluate: {exc}", file=sys.stderr)
        return 1
    print_report(console, report)
    generation = report.get("generation", {})
    for who in ("student", "teacher"):  # each model's own answers to the prompts, scored by the teacher
        if who in generation:
            g = generation[who]
            shown = ", ".join(f"{key} {'-' if g[key] is None else f'{g[key]:.3f}'}"
                              for key in ("teacher_nll", "reverse_kl", "writer_entropy", "teacher_entropy",
                                          "distinct_2", "distinct_3", "repetition_4") if key in g)
            console.print(f"{who}'s own answers ({int(g['tokens'])} tokens): {shown}")
    for task, metrics in report.get("lm_eval", {}).get("tasks", {}).items():
        for metric, row in metrics.items():
            percent = "-" if row["percent_of_teacher"] is None else f"{row['percent_of_teacher']:.0f}% of teacher"
            student = "-" if row["student"] is None else f"{row['student']:.3f}"
            console.print(f"lm-eval {task} {metric}: student {student}, teacher {row['teacher']:.3f} ({percent})")
    if "long_context" in report:
        from student_trainer.evaluation.long_context import print_long_context

        print_long_context(console, report["long_context"])
    print(json.dumps({"report": report["report_json"], "curves": report.get("curves_png"), **report["metrics"]}))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from student_trainer.evaluation.generate import Sampling, interactive, load_chat

    sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.prompt_file is not None:
        if args.prompt is not None:
            print("retnet-distill generate: give --prompt or --prompt-file, not both", file=sys.stderr)
            return 2
        try:
            args.prompt = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            print(f"retnet-distill generate: cannot read --prompt-file {args.prompt_file}: {exc}", file=sys.stderr)
            return 1
    try:
        session = load_chat(args.checkpoint, args.tokenizer, sampling, device=args.device,
                            model_cache_dir=args.model_cache_dir)
    except (ValueError, FileNotFoundError) as exc:
        print(f"retnet-distill generate: {exc}", file=sys.stderr)
        return 1
    if args.prompt is None:
        return interactive(session)
    session.reply(args.prompt, lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    sys.stdout.write("\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from student_trainer.serving.settings import ServeSettings, unknown_environment

    problems = unknown_environment()
    if problems:
        print("retnet-distill serve: " + "; ".join(problems), file=sys.stderr)
        return 2
    overrides = {key: value for key, value in (("checkpoint", args.checkpoint), ("host", args.host), ("port", args.port),
                                               ("tokenizer", args.tokenizer), ("model_id", args.model_id),
                                               ("device", args.device)) if value is not None}
    try:
        settings = ServeSettings(**overrides)
    except ValidationError as exc:
        print(f"retnet-distill serve: bad settings: {exc}", file=sys.stderr)
        return 2
    from student_trainer.serving.app import run

    run(settings)
    return 0


def _export(args: argparse.Namespace) -> int:
    from student_trainer.hf_export.export import ExportError, export

    try:
        out = export(args.checkpoint, args.out_dir, tokenizer_name=args.tokenizer, force=args.force,
                     model_cache_dir=args.model_cache_dir)
    except (ExportError, FileNotFoundError) as exc:
        print(f"retnet-distill export: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def _download(args: argparse.Namespace) -> int:
    from rich.console import Console

    from student_trainer.data.download import REGISTRY, DatasetSpec, DownloadError, download

    console = Console()
    if args.list:  # plain lines: ids must stay whole and greppable, in a terminal or a pipe
        print(f"{'category':17} {'data set':38} {'config':12} {'license':20} what")
        for category, specs in REGISTRY.items():
            for spec in specs:
                print(f"{category:17} {spec.path:38} {spec.config or '-':12} {spec.license:20} {spec.description}")
        return 0
    jobs: list[tuple[str, DatasetSpec]] = []
    for category in args.category or []:
        if category not in REGISTRY:
            console.print(f"[red]unknown category {category!r}; expected one of {', '.join(REGISTRY)}")
            return 2
        jobs.extend((category, spec) for spec in REGISTRY[category])
    for path in args.dataset or []:
        jobs.append(("custom", DatasetSpec(path, args.license, config=args.config, split=args.split)))
    if not jobs:
        console.print("[red]nothing to download: pass --category NAME or --dataset ID_OR_PATH (see --list)")
        return 2
    try:
        for category, spec in jobs:
            with console.status(f"{spec.path} ({spec.license})") as status:
                path = download(spec, args.out, category, args.max_examples, lambda n: status.update(f"{spec.path}: {n} examples"))
            console.print(f"{spec.path} -> {path}")
    except DownloadError as exc:
        console.print(f"[red]download failed:[/red] {exc}")
        return 1
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from student_trainer.data.preprocess import PreprocessConfig, preprocess
    from student_trainer.data.readers import InputError

    config = PreprocessConfig(
        inputs=args.input, output=args.output, tokenizer=args.tokenizer, max_seq_length=args.max_seq_length,
        format=args.format, pack=not args.no_pack, val_fraction=args.val_fraction, skip_invalid=args.skip_invalid,
        rows_per_shard=args.rows_per_shard, overwrite=args.overwrite, model_cache_dir=args.model_cache_dir,
    )
    try:
        manifest = preprocess(config)
    except (InputError, ValueError, FileExistsError) as exc:
        print(f"retnet-distill preprocess: {exc}", file=sys.stderr)
        return 1
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['documents']} documents -> {split['rows']} rows x {manifest['max_seq_length']} "
              f"({split['tokens']} tokens, {split['target_tokens']} targets) in {len(split['shards'])} shards")
    if manifest["counts"]["skipped_invalid"]:
        print(f"skipped {manifest['counts']['skipped_invalid']} invalid records: {manifest['counts']['skipped_by_reason']}")
    print(f"wrote {Path(args.output) / 'manifest.json'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import json
    import logging

    from student_trainer.training.config import ConfigError, load_config
    from student_trainer.training.health import TrainingDiverged
    from student_trainer.teachers.network import TeacherError
    from student_trainer.training.recipe import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"teacher_url={args.teacher_url}"] if args.teacher_url else [])
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"retnet-distill train: {exc}", file=sys.stderr)
        return 2
    from shared.cache_format import CacheError

    try:
        summary = train(config)
    except (TrainingDiverged, CacheError, FileNotFoundError, TeacherError) as exc:
        print(f"retnet-distill train: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # under torchrun: one summary, from rank 0
        print(json.dumps({k: summary[k] for k in ("checkpoint", "steps", "skipped_steps")}))
        print(json.dumps({k: round(v, 4) for k, v in summary["metrics"].items() if k.startswith("eval/")}))
    return 0


def _cache(args: argparse.Namespace) -> int:
    from student_trainer.cache_cli import run_cache

    return run_cache(args)


def build_parser() -> argparse.ArgumentParser:
    from student_trainer.main_job import DEFAULT_CACHE_DIR
    from teacher_server.engines.model_source import EMBEDDED_ALIAS

    parser = argparse.ArgumentParser(prog="retnet-distill", description="Distil a Transformer teacher into a RetNet student.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    main = commands.add_parser("main", help="the whole pipeline on embedded defaults (what `make run` runs)")
    main.add_argument("--model", default=EMBEDDED_ALIAS, help="teacher model (default: the embedded SmolLM2)")
    main.add_argument("--teacher-url", default=None, help="use this running teacher service instead of starting one")
    main.add_argument("--student", choices=["retrofit", "tiny"], default="retrofit",
                      help="retrofit: a RetNet with the teacher's weights (attention transfer, then KD; the default); "
                           "tiny: the 3.3M-parameter random-init student, for comparison")
    main.add_argument("--max-steps", type=int, default=None,
                      help="training steps (default: 100 for retrofit, of which 90 attention transfer; 300 for tiny)")
    main.add_argument("--workdir", default="runs/main", help="where the run, its checkpoints, logs and report go")
    main.add_argument("--data-dir", default="data", help="where the python-docs shards are built once")
    main.add_argument("--eval-batches", type=int, default=8, help="held-out batches of 4 rows for the report")
    main.add_argument("--device", default="auto", help="student device: auto (CUDA if available), cpu, cuda, cuda:N")
    main.add_argument("--model-cache-dir", default=DEFAULT_CACHE_DIR, help="where GGUF teachers are converted once")
    main.set_defaults(handler=_main_job)

    ev = commands.add_parser("evaluate", help="held-out metrics, samples, report.json and curves.png of a checkpoint")
    ev.add_argument("--checkpoint", required=True, help="a run folder (latest checkpoint), a checkpoint or a model folder")
    ev.add_argument("--data", default=None, help="shard folder (default: the run's own training data)")
    ev.add_argument("--teacher", default=None, help="teacher model (default: the run's teacher_model)")
    ev.add_argument("--split", default="val", help="split of the shard folder (train when it has no such split)")
    ev.add_argument("--batches", type=int, default=8, help="held-out batches")
    ev.add_argument("--batch-size", type=int, default=4, help="rows per batch")
    ev.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ev.add_argument("--prompt", action="append", help="a prompt for the samples (repeatable)")
    ev.add_argument("--max-new-tokens", type=int, default=48, help="tokens per sample")
    ev.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    ev.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed")
    ev.add_argument("--output-dir", default=None, help="where report.json and curves.png go (default: RUN/eval)")
    ev.add_argument("--model-cache-dir", default=DEFAULT_CACHE_DIR, help="where GGUF teachers are converted once")
    ev.add_argument("--context", type=int, default=None,
                    help="also score rows of N tokens (the split's rows concatenated; may exceed the training context) "
                         "and report loss by position bucket")
    ev.add_argument("--buckets", type=int, nargs="+", default=None,
                    help="position edges of the --context table (default: 512 2048 8192 32768 ...)")
    ev.add_argument("--context-rows", type=int, default=1, help="long rows of --context tokens to score")
    ev.add_argument("--lm-eval", nargs="*", default=None, metavar="TASK",
                    help="also run lm-evaluation-harness on the teacher and the exported student (no TASK: the local "
                         "retnet_dolly_mc task; standard tasks need hub access); needs the eval extra")
    ev.add_argument("--lm-eval-limit", type=int, default=None, help="at most N items per lm-eval task")
    ev.set_defaults(handler=_evaluate)

    gen = commands.add_parser("generate", help="chat with a student (streams tokens from the recurrent state)")
    gen.add_argument("--checkpoint", required=True, help="a run folder, a checkpoint or a model folder")
    gen.add_argument("--prompt", default=None, help="one prompt; without it (and --prompt-file), an interactive chat")
    gen.add_argument("--prompt-file", default=None,
                     help="read the one prompt from this file ('-': stdin), e.g. a long document and a question")
    gen.add_argument("--tokenizer", default=None, help="the teacher's tokenizer (default: the run's teacher_model)")
    gen.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    gen.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    gen.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="most tokens per answer")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    gen.add_argument("--model-cache-dir", default=DEFAULT_CACHE_DIR, help="where GGUF tokenizers are converted once")
    gen.set_defaults(handler=_generate)

    exp = commands.add_parser("export", help="write a Hugging Face model folder (trust_remote_code) of a student")
    exp.add_argument("checkpoint", help="a run folder (latest checkpoint), a checkpoint or a model folder")
    exp.add_argument("out_dir", help="the folder to write (must not exist or be empty, unless --force)")
    exp.add_argument("--tokenizer", default=None, help="the teacher's tokenizer (default: the run's teacher_model)")
    exp.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    exp.add_argument("--model-cache-dir", default=DEFAULT_CACHE_DIR, help="where GGUF tokenizers are converted once")
    exp.set_defaults(handler=_export)

    srv = commands.add_parser("serve", help="serve a student over an OpenAI-compatible HTTP API (continuous batching)")
    srv.add_argument("checkpoint", help="a run folder, a checkpoint, a model folder or a Hugging Face export folder")
    srv.add_argument("--host", default=None, help="bind address (default 127.0.0.1; STUDENT_SERVE_HOST)")
    srv.add_argument("--port", type=int, default=None, help="bind port (default 8001; STUDENT_SERVE_PORT)")
    srv.add_argument("--tokenizer", default=None, help="the teacher's tokenizer (default: the run's teacher_model)")
    srv.add_argument("--model-id", default=None, help="the model name clients send (default: the folder's name)")
    srv.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cpu)")
    srv.set_defaults(handler=_serve)

    from student_trainer.data.formats import FORMATS

    down = commands.add_parser("download", help="stream Hugging Face data sets into jsonl (resumable)")
    down.add_argument("--category", action="append", help="a registry category (repeatable): instruction_chat, general_text, code, math")
    down.add_argument("--dataset", action="append", help="a hub id, local dataset folder or data file (repeatable)")
    down.add_argument("--config", default=None, help="dataset config for --dataset")
    down.add_argument("--split", default="train", help="split for --dataset")
    down.add_argument("--license", default="unknown", help="license to record for --dataset")
    down.add_argument("--out", default="data/raw", help="output folder (one subfolder per category)")
    down.add_argument("--max-examples", type=int, default=None, help="stop each data set after this many records")
    down.add_argument("--list", action="store_true", help="list the registry and exit")
    down.set_defaults(handler=_download)

    prep = commands.add_parser("preprocess", help="tokenize raw data into memory-mapped training shards")
    prep.add_argument("--input", nargs="+", required=True, help="files or folders (jsonl, json, parquet, txt), or python-docs")
    prep.add_argument("--output", required=True, help="output shard folder")
    prep.add_argument("--tokenizer", default=EMBEDDED_ALIAS, help="teacher tokenizer: hub id, local dir, .gguf or alias")
    prep.add_argument("--max-seq-length", type=int, default=1024, help="tokens per row")
    prep.add_argument("--format", choices=FORMATS, default=None, help="force a record format (default: detect per record)")
    prep.add_argument("--no-pack", action="store_true", help="one document per row (truncated, padded) instead of packing")
    prep.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents for the validation split")
    prep.add_argument("--skip-invalid", action="store_true", help="skip and count bad records instead of stopping")
    prep.add_argument("--rows-per-shard", type=int, default=8192, help="rows per shard file")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing shard set")
    prep.add_argument("--model-cache-dir", default=DEFAULT_CACHE_DIR, help="where GGUF tokenizers are converted once")
    prep.set_defaults(handler=_preprocess)

    cache = commands.add_parser("cache", help="write a teacher cache (top-k targets) for a shard set")
    cache.add_argument("--data", required=True, help="shard folder from `retnet-distill preprocess` (with --teacher-url: "
                       "a name inside the server's TEACHER_DATA_ROOT)")
    cache.add_argument("--output", required=True, help="cache folder; one sub-folder per split (with --teacher-url: a "
                       "name inside the server's TEACHER_CACHE_ROOT)")
    cache.add_argument("--teacher", default=EMBEDDED_ALIAS, help="teacher model for the in-process engine")
    cache.add_argument("--teacher-url", default=None, help="drive a running teacher service's cache-writer route instead")
    cache.add_argument("--api-key", default=None, help="API key for --teacher-url (default: $TEACHER_API_KEY)")
    cache.add_argument("--k", type=int, default=64, help="top entries per position")
    cache.add_argument("--temperature", type=float, default=1.0, help="teacher temperature (the student uses the same)")
    cache.add_argument("--splits", nargs="+", default=None, help="splits to cache (default: every split of the data)")
    cache.add_argument("--shard-size", type=int, default=256, help="sequences per cache shard")
    cache.add_argument("--target-type", choices=["topk_fp16", "topk_q8", "topk_coded", "sampled"], default="topk_fp16",
                       help="storage of the targets: fp16 or q8 top-k, coded top-k (compact, shared/target_codec.py), "
                            "or sampled ids (k = draws a position, <= 255; Anshumann et al. 2025)")
    cache.add_argument("--q8-step", type=float, default=1 / 16, help="topk_q8: log-prob grid step in nats")
    cache.add_argument("--code-step", type=float, default=None, help="topk_coded: log-prob grid step at the top in nats "
                                                                      "(default 1/64)")
    cache.add_argument("--code-knee", type=float, default=None, help="topk_coded: the grid coarsens past this many "
                                                                      "nats below 0 (default 0.5; 0 = uniform)")
    cache.add_argument("--mass-cutoff", type=float, default=None, help="topk_coded: drop a row's least likely ids while "
                                                                        "their mass stays <= this, into the tail (default 0)")
    cache.add_argument("--device", default="auto", help="teacher device (in-process)")
    cache.add_argument("--dtype", default="auto", help="teacher dtype (in-process)")
    cache.add_argument("--model-cache-dir", default=DEFAULT_CACHE_DIR, help="where GGUF teachers are converted once")
    cache.set_defaults(handler=_cache)

    trn = commands.add_parser("train", help="distil a RetNet student (config YAML + key=value overrides)")
    trn.add_argument("--config", help="a YAML file such as configs/train_cpu.yaml")
    trn.add_argument("--teacher-url", default=None, help="network mode: teacher service URL(s), comma-separated "
                     "(same as teacher_url=...)")
    trn.add_argument("overrides", nargs="*", help="key=value settings that override the YAML")
    trn.set_defaults(handler=_train)

    from student_trainer.finetune_cli import add_parser as add_finetune_parser

    add_finetune_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
