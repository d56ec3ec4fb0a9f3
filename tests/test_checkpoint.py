"""Checkpoints: durable (fsynced), never resumed from when incomplete, loaded without pickle."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from student_trainer.training.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, restore_rng_state, rng_state
from student_trainer.teachers import DirectTeacher
from student_trainer.training.recipe import train
from tests.test_train import step_losses, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tiny_shards, tiny_engine, tmp_path_factory) -> Path:
    """A 6-step run with checkpoints at steps 3 and 6."""
    output = tmp_path_factory.mktemp("run")
    train(tiny_config(output, tiny_shards, max_steps=6, eval_every=6, save_every=3),
          teacher=DirectTeacher(tiny_engine, 16, 1.0))
    return output


def copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_every_file_loads_without_pickle(run) -> None:
    folder = list_checkpoints(run)[-1]
    for name in ("optimizer.pt", "rng.pt"):
        torch.load(folder / name, weights_only=True)  # raises on anything but tensors and plain containers
    state = json.loads((folder / "trainer_state.json").read_text())
    assert set(state["files"]) == {"model/config.json", "model/model.safetensors", "optimizer.pt", "rng.pt"}


def test_rng_state_round_trips() -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_checkpoint_from_before_the_tensor_rng_form_resumes_exactly(run, tmp_path, tiny_shards, tiny_engine) -> None:
    """Older checkpoints pickled numpy's state tuple: it loads (numpy's two types allowed, nothing else)."""
    copied = copy_run(run, tmp_path)
    for folder in list_checkpoints(copied)[1:]:
        import shutil

        shutil.rmtree(folder)
    folder = list_checkpoints(copied)[-1]
    assert folder.name == "step-00000003"
    new = torch.load(folder / "rng.pt", weights_only=True)
    version, mt_state, gauss = new["python"]
    saved = new["numpy"]
    legacy = {"python": (version, tuple(mt_state), gauss), "torch": new["torch"],
              "numpy": (saved["name"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                        saved["cached_gaussian"])}
    torch.save(legacy, folder / "rng.pt")
    state = json.loads((folder / "trainer_state.json").read_text())
    del state["files"]  # and the older trainer_state without the file list
    (folder / "trainer_state.json").write_text(json.dumps(state))
    train(tiny_config(copied, tiny_shards, max_steps=6, eval_every=6, save_every=3),
          teacher=DirectTeacher(tiny_engine, 16, 1.0))
    before, after = step_losses(run), step_losses(copied)
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(before[step], rel=1e-6), step


class Payload:
    """A pickle that runs code when loaded: what an attacker plants in a shared checkpoint folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_not_executed(run, tmp_path) -> None:
    run = copy_run(run, tmp_path)
    folder = list_checkpoints(run)[-1]
    marker = tmp_path / "pwned"
    torch.save({"optimizers": [Payload(marker)]}, folder / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(folder, [])
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "delete", "state"])
def test_resume_auto_never_picks_an_incomplete_checkpoint(run, tmp_path, damage, caplog) -> None:
    run = copy_run(run, tmp_path)
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step-00000006"
    if damage == "truncate":  # e.g. a copy that stopped half-way, or a disk that lost the tail
        with open(newest / "optimizer.pt", "r+b") as fh:
            fh.truncate(100)
    elif damage == "delete":
        (newest / "model" / "model.safetensors").unlink()
    else:
        (newest / "trainer_state.json").write_text('{"step": 6, "files": ')
    assert resolve_resume("auto", run).name == "step-00000003"
    assert "skipping incomplete checkpoint" in caplog.text
    if damage != "state":
        with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
            resolve_resume(str(newest), run)


def test_a_resume_after_a_damaged_newest_checkpoint_continues_from_the_previous(run, tmp_path, tiny_shards,
                                                                                tiny_engine) -> None:
    copied = copy_run(run, tmp_path)
    with open(list_checkpoints(copied)[-1] / "optimizer.pt", "r+b") as fh:
        fh.truncate(10)
    before = step_losses(run)
    train(tiny_config(copied, tiny_shards, max_steps=6, eval_every=6, save_every=3),
          teacher=DirectTeacher(tiny_engine, 16, 1.0))
    after = step_losses(copied)
    assert after[6] == pytest.approx(before[6], rel=1e-6)  # steps 4-6 again, the same numbers


def test_files_and_folders_are_fsynced_before_the_rename(tiny_shards, tiny_engine, tmp_path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)  # the OS boundary: which paths reach the disk
    train(tiny_config(tmp_path, tiny_shards, max_steps=2, warmup_steps=1, eval_every=2, save_every=2),
          teacher=DirectTeacher(tiny_engine, 16, 1.0))
    staged = [Path(p) for p in synced if ".step-00000002.tmp-" in p]
    assert {p.name for p in staged} >= {"optimizer.pt", "rng.pt", "trainer_state.json", "model.safetensors",
                                        "config.json", "model"}
    assert str(tmp_path / "checkpoints") in synced  # the rename itself
