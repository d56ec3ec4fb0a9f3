"""``retnet-teacher`` / ``python -m teacher_server``: run the teacher service with uvicorn.

Command-line flags override ``TEACHER_*`` environment variables. SIGTERM and SIGINT drain
in-flight requests and stop cleanly (exit 0); a model that cannot be loaded exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import uvicorn
from pydantic import ValidationError

from teacher_server.app import create_app
from teacher_server.settings import TeacherSettings, unknown_environment


def parse_args(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(
        prog="retnet-teacher",
        description="Serve top-k teacher log-probabilities (POST /v1/topk). Unset flags come from TEACHER_* variables.",
    )
    parser.add_argument("--model", help="HF hub id, local directory, .gguf file, or smollm2-135m-instruct")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="bind port (default 8000)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--max-k", type=int, dest="max_k", help="largest k a request may ask for")
    parser.add_argument("--log-level", dest="log_level", help="debug, info, warning or error")
    args = parser.parse_args(argv)
    return {key: value for key, value in vars(args).items() if value is not None}


def _exit_with_parent(server: uvicorn.Server, parent_pid: int, poll_s: float = 0.5) -> None:
    """Drain and stop once the parent process is gone (its children are re-parented, so our parent
    pid changes). Polling works whichever thread of the parent started us, unlike PR_SET_PDEATHSIG,
    which fires when that thread ends."""
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    logging.getLogger(__name__).warning("parent process %d is gone: draining and stopping", parent_pid)
    server.should_exit = True


def main(argv: list[str] | None = None) -> int:
    overrides = parse_args(argv)
    unknown = unknown_environment()
    if unknown:
        print("retnet-teacher: unknown settings in the environment:\n  " + "\n  ".join(unknown), file=sys.stderr)
        return 2
    try:
        settings = TeacherSettings(**overrides)
    except ValidationError as exc:
        print(f"retnet-teacher: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exit_code = 0

    def on_load_failure() -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.timeout_keep_alive_s,
    )
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM, then re-raises it under the handler it found at start; with this
    # no-op handler a clean drain ends with exit code 0, as process managers and compose expect.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    if settings.parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(server, settings.parent_pid), daemon=True).start()
    server.run()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
