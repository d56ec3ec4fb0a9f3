"""``retnet-distill export``: a Hugging Face folder that loads without this project or TorchScale.

The loading checks run in a subprocess (``python -I``, cwd outside the repo, ``student_trainer`` and
``torchscale`` blocked on the meta path) against numbers RetNetStudent computed here.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from student_trainer.cli import main
from student_trainer.hf_export import export as export_module
from student_trainer.hf_export.export import CODE_FILES, ExportError, export
from student_trainer.model.student import RetNetStudent
from student_trainer.model.retrofit import retrofit
from tests.conftest import TINY_VOCAB, build_tiny_llama, tiny_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
PROMPT = "The list type is"
NEW_TOKENS = 12

LOADER = r'''
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("student_trainer", "torchscale"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
for name in ("student_trainer", "torchscale"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} imported")
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
out, expected = sys.argv[1], json.load(open(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
reference = load_file(sys.argv[3])
result = {"class": type(model).__name__, "chat_template": tokenizer.chat_template,
          "prompt_ids": tokenizer(expected["prompt"])["input_ids"], "diff": {}}
with torch.no_grad():
    for key, ids in reference.items():
        if key.startswith("ids"):
            ours = torch.log_softmax(model(ids).logits.float(), dim=-1)
            result["diff"][key] = float((ours - reference["logprobs" + key[3:]]).abs().max())
    lengths = []
    hook = model.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    prompt = torch.tensor([result["prompt_ids"]])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=expected["new_tokens"],
                               do_sample=False)
    hook.remove()
    result["greedy"] = generated[0, prompt.shape[1]:].tolist()
    result["input_lengths"] = lengths
    sizes = []
    for n in (3, 3 * model.config.chunk_size + 5):  # the state's size does not grow with the context
        cache = model(torch.ones(1, n, dtype=torch.long), use_cache=True).cache_params
        sizes.append([cache.position, sum(t.numel() for t in cache.kv + cache.scale)])
    result["state_sizes"] = sizes
generate = pipeline("text-generation", model=out, trust_remote_code=True)
result["pipeline"] = generate(expected["prompt"], max_new_tokens=expected["new_tokens"], do_sample=False)[0]["generated_text"]
print("RESULT " + json.dumps(result))
'''


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """The tiny random Llama's folder, its tokenizer given a chat template (which the export must carry)."""
    from transformers import AutoTokenizer

    folder = build_tiny_llama(tmp_path_factory.mktemp("teacher"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(folder)
    return folder


def make_checkpoint(root: Path, student: RetNetStudent, teacher: Path | None, step: int = 10) -> Path:
    """``root/checkpoints/step-N`` with ``model/`` and a ``trainer_state.json`` naming the teacher (what export
    reads), plus empty optimizer/RNG files so that the run folder lists it as complete."""
    folder = root / "checkpoints" / f"step-{step:08d}"
    student.save(folder / "model")
    for name in ("optimizer.pt", "rng.pt"):
        (folder / name).write_bytes(b"")
    config = {"teacher_model": str(teacher)} if teacher else {}
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "config": config}))
    return folder


def retrofitted_student() -> RetNetStudent:
    """A student retrofitted from a random 2-layer Qwen2 (q/k/v biases, its rotary table, group_norm_eps 1e-8),
    in blocks of 16 tokens so that the inputs below span several."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=TINY_VOCAB + 16, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    ids = torch.randint(3, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    student, _ = retrofit(teacher, ids, recurrent_chunk_size=16)
    assert student.config.qkv_bias and student.config.rotary_inv_freq and student.config.group_norm_eps == 1e-8
    return student.eval()


def check_in_clean_process(student: RetNetStudent, out: Path, teacher_dir: Path, tmp_path: Path) -> dict:
    """Reference numbers from ``student`` here, the export's in a clean subprocess; returns its results."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    generator = torch.Generator().manual_seed(3)
    rows = {"ids_short": torch.randint(3, TINY_VOCAB, (2, 9), generator=generator),
            "ids_long": torch.randint(3, TINY_VOCAB, (2, 40), generator=generator)}  # 40 > 16: several blocks
    tensors = {}
    with torch.no_grad():
        for key, ids in rows.items():
            tensors[key] = ids
            tensors["logprobs" + key[3:]] = torch.log_softmax(student(ids).float(), dim=-1)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "reference.safetensors"))
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    greedy = [int(t[0]) for t in student.generate(torch.tensor(prompt_ids), NEW_TOKENS, greedy=True,
                                                   eos_id=tokenizer.eos_token_id)]
    (tmp_path / "expected.json").write_text(json.dumps({"prompt": PROMPT, "new_tokens": NEW_TOKENS}))
    (tmp_path / "loader.py").write_text(LOADER)
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-I", str(tmp_path / "loader.py"), str(out), str(tmp_path / "expected.json"),
                           str(tmp_path / "reference.safetensors")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["prompt_ids"] == prompt_ids
    assert result["greedy"] == greedy, (result["greedy"], greedy)
    assert result["pipeline"] == PROMPT + tokenizer.decode(greedy, skip_special_tokens=True)
    # the prompt once, then one token per step; a state of one size after 3 tokens and after 53
    assert result["input_lengths"] == [len(prompt_ids)] + [1] * (len(greedy) - 1)
    (n_short, size_short), (n_long, size_long) = result["state_sizes"]
    assert (n_short, n_long) == (3, 3 * 16 + 5) and size_short == size_long
    assert result["chat_template"] == CHAT
    return result


def test_a_random_student_loads_without_the_project_and_matches_it(teacher_dir, tmp_path) -> None:
    student = tiny_student(vocab_size=TINY_VOCAB).eval()
    out = export(make_checkpoint(tmp_path / "run", student, teacher_dir), tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {"config.json", *CODE_FILES, "model.safetensors", "generation_config.json",
                                               "README.md", "tokenizer.json", "chat_template.jinja"}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "retnet_student" and set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    weights = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights  # tied: stored once
    assert sum(t.numel() for t in weights.values()) == student.num_parameters()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's owner-only mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~umask}
    result = check_in_clean_process(student, out, teacher_dir, tmp_path)
    assert result["class"] == "RetNetStudentForCausalLM"
    assert max(result["diff"].values()) <= 1e-5, result["diff"]


def test_a_retrofitted_student_matches_too(teacher_dir, tmp_path) -> None:
    student = retrofitted_student()
    out = export(make_checkpoint(tmp_path / "run", student, teacher_dir), tmp_path / "hf")
    assert "lm_head.weight" in load_file(str(out / "model.safetensors"))  # untied head
    result = check_in_clean_process(student, out, teacher_dir, tmp_path)
    assert max(result["diff"].values()) <= 1e-5, result["diff"]


def test_the_model_card_carries_the_runs_figures(teacher_dir, tmp_path) -> None:
    run = tmp_path / "run"
    checkpoint = make_checkpoint(run, tiny_student(vocab_size=TINY_VOCAB), teacher_dir)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "train/loss": 3.0}) + "\n"
                                       + json.dumps({"step": 10, "eval/kl": 0.4321, "eval/loss": 2.5}) + "\n")
    card = (export(checkpoint, tmp_path / "a") / "README.md").read_text()
    assert "metrics.jsonl" in card and "| eval/kl | 0.4321 |" in card and "No evaluate report" in card
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps({"step": 10, "data": "d", "split": "val",
                                                          "metrics": {"student_perplexity": 12.5}}))
    card = (export(checkpoint, tmp_path / "b") / "README.md").read_text()
    assert "retnet-distill evaluate" in card and "| student_perplexity | 12.5 |" in card and "not of the exported" not in card
    card = (export(checkpoint / "model", tmp_path / "c", tokenizer_name=str(teacher_dir)) / "README.md").read_text()
    assert "No figures" in card


def test_an_occupied_out_dir_is_refused_unless_forced(teacher_dir, tmp_path) -> None:
    checkpoint = make_checkpoint(tmp_path / "run", tiny_student(vocab_size=TINY_VOCAB), teacher_dir)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty.*--force"):
        export(checkpoint, out)
    assert (out / "keep.txt").read_text() == "mine"
    export(checkpoint, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temporary folders left


@pytest.mark.parametrize("kind", ["empty", "other format", "hf export", "no teacher"])
def test_inputs_that_are_not_student_checkpoints_are_named(kind, teacher_dir, tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    if kind == "other format":
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (folder / "model.safetensors").write_bytes(b"")
        message = "expected format 'retnet-student'"
    elif kind == "hf export":
        folder = export(make_checkpoint(tmp_path / "run", tiny_student(vocab_size=TINY_VOCAB), teacher_dir), folder, force=True)
        message = "already a Hugging Face export"
    elif kind == "no teacher":
        folder = make_checkpoint(tmp_path / "run", tiny_student(vocab_size=TINY_VOCAB), None)
        message = "records no teacher; pass --tokenizer"
    else:
        message = "is not a run folder.*expected a run folder"
    with pytest.raises(ExportError, match=message):
        export(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failure_midway_leaves_nothing_behind(teacher_dir, tmp_path, monkeypatch) -> None:
    checkpoint = make_checkpoint(tmp_path / "run", tiny_student(vocab_size=TINY_VOCAB), teacher_dir)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        export(checkpoint, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_export_missing_files_fails_to_load_by_name(teacher_dir, tmp_path) -> None:
    out = export(make_checkpoint(tmp_path / "run", tiny_student(vocab_size=TINY_VOCAB), teacher_dir), tmp_path / "hf")
    (out / "model.safetensors").unlink()
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)")
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-I", "-c", code, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "model.safetensors" in done.stderr and "retnet-distill export" in done.stderr


def test_the_cli_exports_and_reports_bad_input(teacher_dir, tmp_path, capsys) -> None:
    checkpoint = make_checkpoint(tmp_path / "run", tiny_student(vocab_size=TINY_VOCAB), teacher_dir)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0  # a run folder: its latest checkpoint
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert main(["export", str(checkpoint), str(tmp_path / "hf")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "hf2")]) == 1
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_a_student_of_the_embedded_teacher_exports_and_matches(tmp_path) -> None:
    from student_trainer.model.retrofit import load_teacher_lm

    teacher, tokenizer, _ = load_teacher_lm("smollm2-135m-instruct", "~/.cache/retnet-distill/models")
    ids = torch.tensor([tokenizer("Python's `pass` statement does nothing.")["input_ids"]])
    student, _ = retrofit(teacher, ids)
    checkpoint = make_checkpoint(tmp_path / "run", student.eval(), None)
    out = export(checkpoint, tmp_path / "hf", tokenizer_name="smollm2-135m-instruct")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 30
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    code = ("import sys, json, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
            "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
            "ids = torch.tensor([t.apply_chat_template([{'role': 'user', 'content': 'What does pass do?'}], "
            "add_generation_prompt=True, tokenize=True, return_dict=False)])\n"
            "g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)\n"
            "print('RESULT ' + json.dumps({'ids': ids[0].tolist(), 'greedy': g[0, ids.shape[1]:].tolist()}))")
    done = subprocess.run([sys.executable, "-I", "-c", code, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    expected = [int(t[0]) for t in student.generate(torch.tensor(result["ids"]), 8, greedy=True,
                                                    eos_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))]
    assert result["greedy"] == expected
