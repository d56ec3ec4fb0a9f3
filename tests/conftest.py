"""Shared fixtures: a tiny random Llama (with a padded LM head) saved locally, and a real server process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from student_trainer.teachers.process import LocalTeacher

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_dolly_sample() -> Path | None:
    """The real Dolly sample handed to this project (read in place, never copied into the repo):
    ``$RETNET_DOLLY_SAMPLE``, else ``shared/data/`` next to the checkout or next to /work/main."""
    import os

    candidates = [os.environ.get("RETNET_DOLLY_SAMPLE"), REPO_ROOT.parent / "shared" / "data" / "dolly-15k-sample.jsonl",
                  Path("/work/shared/data/dolly-15k-sample.jsonl")]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


DOLLY = find_dolly_sample()
needs_dolly = pytest.mark.skipif(DOLLY is None, reason="the Dolly sample (../shared/data) is not on this machine; "
                                 "set RETNET_DOLLY_SAMPLE to its path")
TINY_VOCAB = 320  # tokenizer length
TINY_HEAD_ROWS = TINY_VOCAB + 16  # LM-head rows beyond the tokenizer: padding that must never be returned


def build_tiny_llama(output_dir: Path) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer trained on the stdlib's pydoc topics.

    Its LM head has padded rows beyond the tokenizer, scaled up so that an engine that forgot to
    drop them would return them in the top k at most positions.
    """
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([topics[key] for key in sorted(topics)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert len(tokenizer) == TINY_VOCAB, len(tokenizer)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TINY_HEAD_ROWS,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
        model.lm_head.weight[TINY_VOCAB:] *= 40.0
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run far faster on one thread than fighting over two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_student(vocab_size: int = TINY_VOCAB, **overrides):
    """The ``tiny`` RetNet student preset with a fixed initialisation."""
    from student_trainer.model.student import RetNetStudent, StudentConfig

    torch.manual_seed(0)
    return RetNetStudent(StudentConfig.from_preset("tiny", vocab_size=vocab_size, **overrides))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_shards(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """python-docs tokenized by the tiny teacher's tokenizer, 32 tokens a row, 10% held out (read-only)."""
    from student_trainer.data.preprocess import PreprocessConfig, preprocess

    folder = tmp_path_factory.mktemp("shards") / "python-docs"
    preprocess(PreprocessConfig(inputs=["python-docs"], output=str(folder), tokenizer=str(tiny_model_dir), max_seq_length=32,
                                val_fraction=0.1, progress=False, corpus_dir=str(tmp_path_factory.mktemp("corpora"))))
    return folder


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):
    from teacher_server.engines.hf import HFEngine

    return HFEngine(str(tiny_model_dir), device="cpu", dtype="float32")


def start_server(model: str, log_dir: Path, env: dict[str, str] | None = None, port: int | None = None) -> LocalTeacher:
    """``python -m teacher_server`` in its own process on a loopback port (a free one by default), ready."""
    return LocalTeacher(model, log_dir / "teacher.log", env=env, ready_timeout=120, port=port).__enter__()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def roots(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A data root holding `docs` (python-docs with the tiny tokenizer, 32 tokens a row) and a cache root."""
    data_root, cache_root = tmp_path_factory.mktemp("data-root"), tmp_path_factory.mktemp("cache-root")
    from student_trainer.data.preprocess import PreprocessConfig, preprocess

    preprocess(PreprocessConfig(inputs=["python-docs"], output=str(data_root / "docs"), tokenizer=str(tiny_model_dir),
                                max_seq_length=32, val_fraction=0.05, rows_per_shard=512, progress=False,
                                corpus_dir=str(tmp_path_factory.mktemp("corpora"))))
    return data_root, cache_root
