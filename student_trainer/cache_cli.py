"""``retnet-distill cache``: write a teacher cache in-process, or through a running server's route.

Both ways produce the same files: the route runs the same :func:`fill_cache` on the server.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shared.token_shards import read_manifest
from teacher_server.engines.cache_fill import CacheProgress, cache_spec, fill_cache


def _splits(args: argparse.Namespace, manifest: dict) -> list[str]:
    available = sorted(manifest["splits"])
    splits = args.splits or available
    unknown = set(splits) - set(available)
    if unknown:
        raise ValueError(f"{args.data} has no split(s) {sorted(unknown)}; it has {available}")
    return splits


def _code_args(args: argparse.Namespace) -> tuple[float | None, float | None, float | None]:
    """``(code_step, code_knee, mass_cutoff)`` for topk_coded; None (the codec's defaults) otherwise or unset."""
    if args.target_type != "topk_coded":
        return None, None, None
    return (getattr(args, "code_step", None), getattr(args, "code_knee", None), getattr(args, "mass_cutoff", None))


def run_in_process(args: argparse.Namespace) -> int:
    from teacher_server.engines.hf import HFEngine

    splits = _splits(args, read_manifest(args.data))
    engine = HFEngine(args.teacher, device=args.device, dtype=args.dtype, cache_dir=args.model_cache_dir)
    for split in splits:
        spec = cache_spec(engine, args.data, split, args.k, args.temperature, args.shard_size, args.target_type,
                          args.q8_step, *_code_args(args))
        with Progress(TextColumn(f"[bold]cache {split}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[rate]}")) as bar:
            task = bar.add_task(split, total=spec.num_shards, rate="")

            def show(p: CacheProgress) -> None:
                bar.update(task, completed=p.shards_done, rate=f"{p.tokens_per_second:,.0f} tokens/s")

            done = fill_cache(lambda request: engine.topk([request])[0], spec, args.data, Path(args.output) / split,
                              progress=show)
        print(f"{split}: {spec.num_sequences} sequences in {spec.num_shards} shards -> {Path(args.output) / split} "
              f"({done.tokens_done} tokens scored this run, {done.seconds:.1f}s)")
    return 0


def run_via_route(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("TEACHER_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=args.teacher_url, headers=headers, timeout=30) as client:
        for split in args.splits or ["train", "val"]:
            body = {"dataset": args.data, "output": f"{args.output}/{split}", "split": split, "k": args.k,
                    "temperature": args.temperature, "shard_size": args.shard_size, "target_type": args.target_type,
                    "q8_step": args.q8_step}
            body.update(zip(("code_step", "code_knee", "mass_cutoff"), _code_args(args)))
            reply = client.post("/v1/cache/jobs", json=body)
            if reply.status_code == 422 and args.splits is None and "no split" in reply.text and split == "val":
                continue  # the data set has no validation split
            if reply.status_code >= 400:
                print(f"retnet-distill cache: the server refused the job ({reply.status_code}): {reply.text}", file=sys.stderr)
                return 1
            job = poll_job(client, reply.json(), split)
            if job["state"] != "done":
                print(f"retnet-distill cache: job {job['id']} ended {job['state']}: {job.get('error')}; "
                      f"POST {args.teacher_url}/v1/cache/jobs/{job['id']}/resume continues it at the first "
                      "missing shard", file=sys.stderr)
                return 1
    return 0


def poll_job(client: httpx.Client, job: dict, split: str, interval_s: float = 0.5) -> dict:
    """Poll a cache job until it leaves ``queued``/``running``; returns its last state.

    The server ends every job ``done``, ``failed`` (with ``error``), ``cancelled`` or, after a
    restart, ``interrupted``, so this loop ends. A poll that gets no job back (the server lost it,
    or answers an error) raises ``ValueError`` with the server's reply instead of looping on.
    """
    while job["state"] in ("queued", "running"):
        time.sleep(interval_s)
        reply = client.get(f"/v1/cache/jobs/{job['id']}")
        if reply.status_code != 200:
            print()  # end the progress line
            raise ValueError(f"polling job {job['id']} got {reply.status_code} from the server: {reply.text[:300]}")
        job = reply.json()
        print(f"\r{split}: {job['state']} {job['shards_done']}/{job['shards_total']} shards", end="", flush=True)
    print()
    return job


def run_cache(args: argparse.Namespace) -> int:
    try:
        return run_via_route(args) if args.teacher_url else run_in_process(args)
    except (ValueError, FileNotFoundError, httpx.HTTPError) as exc:
        print(f"retnet-distill cache: {exc}", file=sys.stderr)
        return 1
