"""Preprocessing raw files into shards: every file type and format, bad input, determinism, packing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from student_trainer.cli import main as cli_main
from student_trainer.data.preprocess import PreprocessConfig, preprocess
from student_trainer.data.readers import InputError
from student_trainer.data.shards import PretokenizedShardDataset
from tests.conftest import DOLLY, needs_dolly
from tests.test_data_formats import RECORDS


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def mixed_inputs(tmp_path: Path) -> Path:
    """A folder with every file type and every record format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "raw"
    write_jsonl(root / "a" / "chat.jsonl", [RECORDS["messages"], RECORDS["sharegpt"]] * 3)
    (root / "b").mkdir(parents=True)
    (root / "b" / "alpaca.json").write_text(json.dumps([RECORDS["alpaca"], RECORDS["dolly"]] * 2))
    pq.write_table(pa.Table.from_pylist([RECORDS["prompt_completion"]] * 4), root / "b" / "pc.parquet")
    (root / "notes.txt").write_text("A plain text file is one document.\nIt has two lines.")
    return root


def config(inputs, output, tiny_model_dir, **overrides) -> PreprocessConfig:
    base = dict(inputs=[str(i) for i in inputs], output=str(output), tokenizer=str(tiny_model_dir), max_seq_length=32,
                rows_per_shard=4, progress=False)
    return PreprocessConfig(**{**base, **overrides})


def test_all_file_types_and_formats_become_shards(mixed_inputs, tmp_path, tiny_model_dir) -> None:
    manifest = preprocess(config([mixed_inputs], tmp_path / "out", tiny_model_dir))
    assert manifest["counts"]["records"] == 6 + 4 + 4 + 1
    assert manifest["counts"]["documents"] == {"chat": 14, "text": 1}
    assert [Path(i["path"]).name for i in manifest["inputs"]] == ["chat.jsonl", "alpaca.json", "pc.parquet", "notes.txt"]
    assert all(len(i["sha256"]) == 64 for i in manifest["inputs"])
    train = manifest["splits"]["train"]
    assert train["rows"] > 4 and len(train["shards"]) == -(-train["rows"] // 4)
    dataset = PretokenizedShardDataset(tmp_path / "out", verify=True)
    assert len(dataset) == train["rows"]
    total_targets = sum(int(dataset[i]["loss_mask"].sum()) for i in range(len(dataset)))
    assert total_targets == train["target_tokens"] > 0
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temp files left behind


def test_packing_puts_eos_between_documents_and_pads_only_the_last_row(tmp_path, tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [{"text": f"document number {i} says hello"} for i in range(10)]
    manifest = preprocess(config([write_jsonl(tmp_path / "t.jsonl", texts)], tmp_path / "out", tiny_model_dir))
    dataset = PretokenizedShardDataset(tmp_path / "out")
    lengths = [dataset[i]["length"] for i in range(len(dataset))]
    assert all(n == 32 for n in lengths[:-1]) and 0 < lengths[-1] <= 32
    stream = np.concatenate([dataset[i]["input_ids"][: lengths[i]].numpy() for i in range(len(dataset))])
    docs = [tokenizer(t["text"])["input_ids"] for t in texts]
    expected = np.concatenate([np.append(d, tokenizer.eos_token_id) for d in docs])
    np.testing.assert_array_equal(stream, expected)
    last = dataset[len(dataset) - 1]
    assert not last["loss_mask"][lengths[-1]:].any()  # padding is never a target
    assert (last["input_ids"][lengths[-1]:] == manifest["pad_id"]).all()


def test_padding_mode_truncates_and_counts(tmp_path, tiny_model_dir) -> None:
    records = [{"text": "short"}, {"text": "a much longer document " * 20}]
    manifest = preprocess(config([write_jsonl(tmp_path / "t.jsonl", records)], tmp_path / "out", tiny_model_dir, pack=False))
    train = manifest["splits"]["train"]
    assert train["rows"] == 2 and train["truncated_documents"] == 1
    dataset = PretokenizedShardDataset(tmp_path / "out")
    assert dataset[0]["length"] < 32 and dataset[1]["length"] == 32


def test_same_inputs_give_byte_identical_shards(mixed_inputs, tmp_path, tiny_model_dir) -> None:
    a = preprocess(config([mixed_inputs], tmp_path / "a", tiny_model_dir, val_fraction=0.3))
    b = preprocess(config([mixed_inputs], tmp_path / "b", tiny_model_dir, val_fraction=0.3))
    assert a["fingerprint"] == b["fingerprint"]
    files = sorted(p.name for p in (tmp_path / "a").glob("*.npy"))
    assert files and files == sorted(p.name for p in (tmp_path / "b").glob("*.npy"))
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_validation_split_is_disjoint_and_stable(tmp_path, tiny_model_dir) -> None:
    records = [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(200)]
    path = write_jsonl(tmp_path / "qa.jsonl", records)
    manifest = preprocess(config([path], tmp_path / "out", tiny_model_dir, val_fraction=0.2, pack=False))
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["documents"] + val["documents"] == 200 and 20 <= val["documents"] <= 60
    # the split is by content: shuffling the input file moves no record across splits
    write_jsonl(tmp_path / "qa.jsonl", records[::-1])
    again = preprocess(config([path], tmp_path / "out2", tiny_model_dir, val_fraction=0.2, pack=False))
    assert again["splits"]["val"]["documents"] == val["documents"]


BAD_INPUTS = [
    ("not json", 'not json at all\n', 1, "not valid JSON"),
    ("missing field", '{"instruction": "x"}\n', 1, "unknown format"),
    ("empty conversation", '{"text": "ok"}\n{"messages": []}\n', 2, "empty conversation"),
    ("unknown format", '{"text": "ok"}\n{"text": "ok"}\n{"foo": "bar"}\n', 3, "unknown format"),
]


@pytest.mark.parametrize("name, content, line, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_stops_naming_file_and_line(tmp_path, tiny_model_dir, name, content, line, message) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        preprocess(config([path], tmp_path / "out", tiny_model_dir))
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_skip_invalid_skips_and_counts(tmp_path, tiny_model_dir) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(content for _, content, _, _ in BAD_INPUTS) + json.dumps(RECORDS["dolly"]) + "\n")
    manifest = preprocess(config([path], tmp_path / "out", tiny_model_dir, skip_invalid=True))
    counts = manifest["counts"]
    assert counts["skipped_invalid"] == 4 and counts["documents"] == {"chat": 1, "text": 3}
    assert counts["skipped_by_reason"]["not valid JSON"] == 1
    assert any(example.startswith(f"{path}:1: ") for example in counts["skipped_examples"])


def test_empty_or_missing_inputs_are_errors(tmp_path, tiny_model_dir) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no input files found"):
        preprocess(config([tmp_path / "empty"], tmp_path / "out", tiny_model_dir))
    with pytest.raises(InputError, match="no such file"):
        preprocess(config([tmp_path / "nope.jsonl"], tmp_path / "out", tiny_model_dir))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="no valid documents"):
        preprocess(config([tmp_path / "blank.jsonl"], tmp_path / "out", tiny_model_dir))


def test_an_existing_shard_set_needs_overwrite(mixed_inputs, tmp_path, tiny_model_dir) -> None:
    preprocess(config([mixed_inputs], tmp_path / "out", tiny_model_dir))
    with pytest.raises(FileExistsError, match="--overwrite"):
        preprocess(config([mixed_inputs], tmp_path / "out", tiny_model_dir))
    preprocess(config([mixed_inputs], tmp_path / "out", tiny_model_dir, overwrite=True))


@needs_dolly
def test_cli_on_real_dolly_data_with_the_embedded_tokenizer(tmp_path, capsys) -> None:
    out = tmp_path / "dolly"
    code = cli_main(["preprocess", "--input", str(DOLLY), "--output", str(out), "--max-seq-length", "256", "--val-fraction", "0.05"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "train: " in printed and "val: " in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["documents"]["chat"] == 577
    assert manifest["tokenizer_sha256"] and manifest["vocab_size"] == 49152
    dataset = PretokenizedShardDataset(out, "val", verify=True)
    assert 0 < dataset[0]["loss_mask"].float().mean() < 1
    assert cli_main(["preprocess", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 1


def test_python_docs_corpus(tmp_path, tiny_model_dir) -> None:
    manifest = preprocess(config(["python-docs"], tmp_path / "out", tiny_model_dir, max_seq_length=256, corpus_dir=str(tmp_path / "corpora")))
    assert manifest["counts"]["documents"]["chat"] > 250
    assert Path(manifest["inputs"][0]["path"]).name.startswith("python-docs-py3.")
    dataset = PretokenizedShardDataset(tmp_path / "out")
    assert len(dataset) > 100
