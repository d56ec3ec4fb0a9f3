"""Teacher finetuning: labels and loss (no double shift), saved teachers that the real server serves,
LoRA merged without changing outputs, an unchanged vocabulary, and (slow) a real improvement."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors import safe_open

from shared.fingerprint import tokenizer_sha256
from shared.wire import decode_topk_response, encode_topk_request
from student_trainer.training.config import ConfigError
from student_trainer.data.shards import PretokenizedShardDataset
from student_trainer.training.finetune_teacher import (
    IGNORE_INDEX,
    INFO_FILE,
    Batch,
    TeacherFinetuneConfig,
    build_labels,
    finetune,
    load_base,
    load_finetune_config,
    masked_lm_loss,
    save_teacher,
    wrap_lora,
)
from tests.conftest import TINY_HEAD_ROWS, TINY_VOCAB, start_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MSGPACK = {"Content-Type": "application/msgpack"}


def tiny_config(model_dir: Path, data_dir: Path, output_dir: Path, **overrides) -> TeacherFinetuneConfig:
    """A finetuning run of the tiny Llama on the python-docs shards of its own tokenizer (32-token rows)."""
    values = dict(base_model=str(model_dir), train_data=str(data_dir), max_seq_length=32, batch_size=4,
                  max_steps=4, warmup_steps=1, lr=3e-3, eval_batches=2, lora_r=4, output_dir=str(output_dir),
                  wandb_mode="disabled", progress=False, device="cpu")
    values.update(overrides)
    config = TeacherFinetuneConfig(**values)
    config.check()
    return config


def reference_loss(logits: torch.Tensor, input_ids: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """The definition, position by position: token t (a target, t >= 1) is predicted by row t - 1."""
    terms = [-torch.log_softmax(logits[b, t - 1].float(), -1)[input_ids[b, t]]
             for b, t in is_target.nonzero().tolist() if t >= 1]
    return torch.stack(terms).mean()


def served_topk(url: str, sequences: list[list[int]], k: int):
    response = httpx.post(url + "/v1/topk", content=encode_topk_request(sequences, k=k), headers=MSGPACK, timeout=60)
    assert response.status_code == 200, response.text
    return decode_topk_response(response.content, "msgpack")


def assert_serves(folder: Path, tmp_path: Path, sequences: list[list[int]], logits: torch.Tensor) -> None:
    """``retnet-teacher --model folder`` answers /v1/topk with the log-probs of ``logits [B, L, V_head]``."""
    server = start_server(str(folder), tmp_path / "server", env={"TEACHER_DEVICE": "cpu", "TEACHER_DTYPE": "float32"})
    try:
        answer = served_topk(server.url, sequences, k=8)
    finally:
        assert server.stop() == 0, server.log()
    assert answer.model == folder.name and answer.vocab_size == TINY_VOCAB
    expected = torch.log_softmax(logits[..., :TINY_VOCAB].double(), -1)  # the engine never serves padded head rows
    rows = torch.cat([expected[b, : len(seq)] for b, seq in enumerate(sequences)])  # [sum(L), V]
    indices = torch.from_numpy(answer.indices.astype(np.int64))
    got = torch.from_numpy(answer.logprobs.astype(np.float64))
    torch.testing.assert_close(got, rows.gather(1, indices), rtol=2e-3, atol=2e-2)  # fp16 on the wire
    assert torch.equal(indices[:, 0], rows.argmax(-1))


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        return {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}


# ------------------------------------------------------------------------------- labels and loss


def test_labels_are_the_input_ids_with_non_targets_set_to_ignore() -> None:
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0], [10, 11, 12, 13, 14, 15, 16]])
    # Row 0 is 5 tokens long: its mask bit at position 5 lies in the padding and must not count.
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [1, 0, 1, 1, 0, 0, 1]], dtype=torch.uint8)
    lengths = torch.tensor([5, 7])
    labels = build_labels(input_ids, loss_mask, lengths)
    expected = torch.tensor([[-100, -100, 7, 8, 9, -100, -100], [10, -100, 12, 13, -100, -100, 16]])
    assert torch.equal(labels, expected)  # a pre-shifted label row (the t+2 bug) fails here


def test_batches_from_shards_keep_every_target_token_in_place(roots) -> None:
    data = PretokenizedShardDataset(roots[0] / "docs", "train")
    rows = [data[i] for i in range(16)]
    batch = Batch.from_rows(rows)
    for row, labels in zip(rows, batch.labels):
        ids, mask, length = row["input_ids"], row["loss_mask"], row["length"]
        targets = labels != IGNORE_INDEX
        assert torch.equal(labels[targets], ids[: len(labels)][targets]), "a label is not the token at its own position"
        assert torch.equal(targets[:length], mask[:length]) and not targets[length:].any()
    assert batch.targets == int((batch.labels[:, 1:] != IGNORE_INDEX).sum()) > 0


def test_our_masked_loss_equals_the_models_own_loss_and_the_definition(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, TINY_VOCAB, (3, 12), generator=generator)
    lengths = torch.tensor([12, 9, 5])
    input_ids[1, 9:], input_ids[2, 5:] = 0, 0  # right padding
    loss_mask = (torch.rand(3, 12, generator=generator) > 0.3).to(torch.uint8)
    labels = build_labels(input_ids, loss_mask, lengths)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        hf_loss = model(input_ids=input_ids, labels=labels).loss
        double_shifted = torch.full_like(labels, IGNORE_INDEX)
        double_shifted[:, :-1] = labels[:, 1:]  # what the original project did before HF shifted again
        wrong_loss = model(input_ids=input_ids, labels=double_shifted).loss
    loss_sum, count = masked_lm_loss(logits, labels)
    is_target = labels != IGNORE_INDEX
    expected = reference_loss(logits, input_ids, is_target)
    assert count == int(is_target[:, 1:].sum())
    torch.testing.assert_close(loss_sum / count, hf_loss)
    torch.testing.assert_close(loss_sum / count, expected)
    assert abs(float(wrong_loss) - float(expected)) > 0.5, "the check cannot tell a double shift from the right labels"


# ---------------------------------------------------------------------------------- config and CLI


def test_config_rejects_unknown_keys_and_values_that_do_not_go_together(tmp_path) -> None:
    config = load_finetune_config(None, ["method=full", "lr=2e-5", "lora_target_modules=[q_proj,v_proj]"])
    assert (config.method, config.lr, config.lora_target_modules) == ("full", 2e-5, ["q_proj", "v_proj"])
    assert config.resolved_save_dir == Path("runs/teacher_ft/smollm2-135m-instruct-full-ft")
    with pytest.raises(ConfigError, match="did you mean 'lora_r'"):
        load_finetune_config(None, ["lora_rank=4"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_finetune_config(None, ["max_steps=5", "warmup_steps=5"])
    with pytest.raises(ConfigError, match="method must be one of"):
        load_finetune_config(None, ["method=qlora"])
    shipped = load_finetune_config(Path(__file__).resolve().parents[1] / "configs" / "teacher_ft.yaml")
    assert shipped.method == "lora" and shipped.base_model == "smollm2-135m-instruct"


def test_cli_reports_bad_keys_and_an_existing_output_without_training(tmp_path, capsys) -> None:
    from student_trainer.finetune_cli import add_parser, main

    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["finetune-teacher", "max_steps=3"]).overrides == ["max_steps=3"]
    assert main(["lr=fast"]) == 2 and "lr must be a number" in capsys.readouterr().err
    existing = tmp_path / "teacher"
    existing.mkdir()
    assert main([f"save_dir={existing}", "base_model=/nonexistent/model"]) == 1
    assert "already exists; set overwrite=true" in capsys.readouterr().err


# ---------------------------------------------------------------------------- save, load, serve


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetuned_teacher_is_saved_whole_with_its_vocab_and_served(method, tiny_model_dir, roots, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tiny_config(tiny_model_dir, roots[0] / "docs", tmp_path / "run", method=method)
    info = finetune(config)
    folder = Path(info["save_dir"])
    assert folder == tmp_path / "run" / f"{tiny_model_dir.name}-{method}-ft"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "a temp folder was left behind"
    assert all(p.stat().st_mode & 0o004 for p in [folder, *folder.iterdir()]), "a teacher container's user must read it"

    saved = json.loads((folder / INFO_FILE).read_text())
    assert saved["method"] == method and saved["steps"] == 4 and saved["base_model"] == str(tiny_model_dir)
    assert saved["held_out_loss"]["after"] < saved["held_out_loss"]["before"]
    assert (saved["lora"] is not None) == (method == "lora")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([line for line in lines if "train/loss" in line]) == 4
    assert [line["eval/loss"] for line in lines if "eval/loss" in line] == list(saved["held_out_loss"].values())

    # The vocabulary is the base model's: same tokenizer bytes and fingerprint, same embedding and head rows.
    assert (folder / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == TINY_VOCAB
    assert tokenizer_sha256(tokenizer) == tokenizer_sha256(AutoTokenizer.from_pretrained(tiny_model_dir))
    shapes = tensor_shapes(folder)
    assert shapes == tensor_shapes(tiny_model_dir), "a merged LoRA model has exactly the base model's tensors"
    assert shapes["lm_head.weight"][0] == shapes["model.embed_tokens.weight"][0] == TINY_HEAD_ROWS
    assert not (folder / "adapter_config.json").exists()

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    changed = {name for name, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[name])}
    if method == "full":
        assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    else:  # only the adapted linear layers move; the embedding and head are not LoRA targets
        assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" not in changed

    sequences = [list(range(3, 23)), list(range(40, 52))]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequences[0], sequences[1] + [0] * 8])).logits
    assert_serves(folder, tmp_path, sequences, logits)


def test_lora_merge_keeps_the_adapter_models_outputs(tiny_model_dir, tmp_path) -> None:
    config = tiny_config(tiny_model_dir, tmp_path, tmp_path, method="lora")
    base, tokenizer, source = load_base(config, torch.device("cpu"))
    model = wrap_lora(base, config).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking adapters: peft starts them at B = 0, which a no-op merge would pass
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    sequences = [list(range(3, 27)), list(range(100, 110))]
    input_ids = torch.tensor([sequences[0], sequences[1] + [0] * 14])
    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
        with model.disable_adapter():
            plain = model(input_ids=input_ids).logits
    assert (adapted - plain).abs().max() > 1.0, "the adapters must change the outputs for this test to mean anything"

    folder = tmp_path / "merged"
    info = save_teacher(model, tokenizer, source, folder, {"method": "lora"}, input_ids)
    assert info["merge_max_abs_logit_diff"] < 1e-3 * float(adapted.abs().max())
    assert json.loads((folder / INFO_FILE).read_text())["vocab_rows"] == [TINY_HEAD_ROWS, TINY_HEAD_ROWS]
    assert tensor_shapes(folder) == tensor_shapes(tiny_model_dir)
    assert_serves(folder, tmp_path, sequences, adapted)  # what the peft model computed, served by the merged one
    with pytest.raises(FileExistsError, match="overwrite=true"):
        save_teacher(model, tokenizer, source, folder, {}, input_ids)


# ------------------------------------------------------------------------------- the real teacher


@pytest.mark.slow
def test_a_few_lora_steps_lower_the_embedded_teachers_held_out_loss(tmp_path) -> None:
    """5 LoRA steps of 4 x 128 tokens on python-docs (~115 s of CPU time; measured 3.439 -> 3.187)."""
    from teacher_server.engines.hf import HFEngine

    config = TeacherFinetuneConfig(
        data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "run"), max_seq_length=128, batch_size=4,
        max_steps=5, warmup_steps=1, lr=2e-3, eval_batches=2, device="cpu", cpu_threads=2, wandb_mode="disabled",
        progress=False,
    )
    info = finetune(config)
    before, after = info["held_out_loss"]["before"], info["held_out_loss"]["after"]
    assert info["held_out"]["split"] == "val" and info["held_out"]["targets"] > 300
    assert after < before - 0.1, f"held-out loss {before:.4f} -> {after:.4f}"
    engine = HFEngine(info["save_dir"], device="cpu", dtype="float32")
    assert engine.vocab_size == 49152 and engine.tokenizer_sha256 == info["tokenizer_sha256"]
