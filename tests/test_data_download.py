"""Downloading through `datasets` streaming: local data through the same code path, resume, offline errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from student_trainer.cli import main as cli_main
from student_trainer.data.download import REGISTRY, DatasetSpec, DownloadError, download


@pytest.fixture
def local_dataset(tmp_path: Path) -> Path:
    """A local dataset folder, as `datasets.load_dataset(folder)` reads it (what a hub repo holds)."""
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(30)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_local_dataset_streams_into_jsonl_with_normalised_columns(local_dataset, tmp_path) -> None:
    path = download(DatasetSpec(str(local_dataset), "CC0"), tmp_path / "out", "math", max_examples=10)
    assert path == tmp_path / "out" / "math" / "my-dataset.jsonl"
    records = read_jsonl(path)
    assert len(records) == 10
    assert records[3] == {"prompt": "What is 3 + 3?", "completion": "6"}  # gsm8k-style columns -> prompt/completion
    source = json.loads((tmp_path / "out" / "math" / "my-dataset.jsonl.source").read_text())
    assert source["license"] == "CC0" and source["examples"] == 10


def test_a_killed_download_resumes_after_the_last_complete_line(local_dataset, tmp_path) -> None:
    spec = DatasetSpec(str(local_dataset), "CC0")
    folder = tmp_path / "out" / "custom"
    folder.mkdir(parents=True)
    complete = download(DatasetSpec(str(local_dataset), "CC0"), tmp_path / "reference", "custom")
    lines = complete.read_text().splitlines(keepends=True)
    (folder / "my-dataset.jsonl.partial").write_text("".join(lines[:7]) + lines[7][:15])  # killed mid-line
    resumed = download(spec, tmp_path / "out", "custom")
    assert resumed.read_text() == complete.read_text()
    assert len(read_jsonl(resumed)) == 30
    assert not (folder / "my-dataset.jsonl.partial").exists()


def test_unreachable_hub_fails_fast_with_a_clear_message(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: as offline as it gets
    with pytest.raises(DownloadError, match="cannot reach the Hugging Face hub.*retnet-distill preprocess --input"):
        download(REGISTRY["math"][0], tmp_path, "math", max_examples=5)
    assert cli_main(["download", "--category", "math", "--out", str(tmp_path), "--max-examples", "5"]) == 1


def test_registry_names_every_category_with_licenses(capsys) -> None:
    assert set(REGISTRY) == {"instruction_chat", "general_text", "code", "math"}
    for specs in REGISTRY.values():
        assert specs and all(spec.license and "/" in spec.path for spec in specs)
    assert cli_main(["download", "--list"]) == 0
    assert "databricks/databricks-dolly-15k" in capsys.readouterr().out
    assert cli_main(["download", "--category", "poetry"]) == 2


def test_cli_downloads_a_local_dataset_then_preprocess_reads_it(local_dataset, tmp_path, tiny_model_dir) -> None:
    out = tmp_path / "raw"
    assert cli_main(["download", "--dataset", str(local_dataset), "--out", str(out), "--max-examples", "12"]) == 0
    shards = tmp_path / "shards"
    args = ["preprocess", "--input", str(out), "--output", str(shards), "--tokenizer", str(tiny_model_dir), "--max-seq-length", "64"]
    assert cli_main(args) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["counts"]["documents"]["chat"] == 12
