"""Checkpoints are atomic: complete with a verified manifest, or invisible — even when the writer is SIGKILLed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.train.checkpoint import (CheckpointError, checkpoint_root, latest_checkpoint, list_checkpoints,
                               load_checkpoint, save_checkpoint, verify_checkpoint)
from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from engine.train.config import TrainConfig
from engine.train.trainer import Trainer
from tests.oracle import random_lora_state
from tests.torch_backend import torch_backend_factory
from tests.train_helpers import pattern_source

LORA = LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj"))
ROOT = Path(__file__).resolve().parents[2]


def _save(root, spec, step, keep=2):
    state = {"config": TrainConfig(lora=LORA).to_dict(), "step": step}
    optimizer = {"step": np.array(step, np.int64), "m": np.full((3, 2), step, np.float32)}
    return save_checkpoint(root, step, LORA, random_lora_state(spec, LORA, seed=step), optimizer, state, "base", keep)


def test_save_keeps_newest_and_round_trips(tiny_llama_dir, tmp_path):
    spec = load_model_spec(tiny_llama_dir)
    for step in (1, 2, 3):
        _save(tmp_path, spec, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002", "checkpoint-00000003"]
    ckpt = load_checkpoint(tmp_path, spec)        # a folder of checkpoints: the newest
    assert ckpt.step == 3 and ckpt.optimizer_state["step"].shape == () and int(ckpt.optimizer_state["step"]) == 3
    expected = random_lora_state(spec, LORA, seed=3)
    assert all(np.array_equal(ckpt.lora_state[k], expected[k]) for k in expected)
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    """Issue 22: pruning deleted checkpoint-<step> in place, so a kill mid-way left one half there. It is renamed
    away first now; a kill inside the delete (simulated: rmtree deletes one file, then the process dies) leaves
    a temporary folder that the next save clears."""
    import shutil
    import types

    import engine.train.checkpoint as checkpoint

    spec = load_model_spec(tiny_llama_dir)
    _save(tmp_path, spec, 1)
    _save(tmp_path, spec, 2)

    class Killed(BaseException):
        pass

    def killed(path, *args, **kwargs):
        next(p for p in Path(path).iterdir() if p.is_file()).unlink()
        raise Killed

    monkeypatch.setattr(checkpoint, "shutil", types.SimpleNamespace(rmtree=killed))
    with pytest.raises(Killed):
        _save(tmp_path, spec, 3)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["checkpoint-00000002", "checkpoint-00000003"]
    for name in names:
        verify_checkpoint(tmp_path / name)          # both whole
    monkeypatch.setattr(checkpoint, "shutil", shutil)
    _save(tmp_path, spec, 4)
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_corrupt_or_incomplete_checkpoints_are_refused_and_skipped(tiny_llama_dir, tmp_path):
    spec = load_model_spec(tiny_llama_dir)
    _save(tmp_path, spec, 1)
    newest = _save(tmp_path, spec, 2)
    data = bytearray((newest / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors .*does not match"):
        verify_checkpoint(newest)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint nor"):
        load_checkpoint(tmp_path / "empty", spec)
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000001"
    (tmp_path / "checkpoint-00000009").mkdir()          # no manifest: never a checkpoint
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000001"
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_checkpoint(tmp_path / "checkpoint-00000009", spec)


KILL_SCRIPT = r"""
import os, sys, time
from pathlib import Path
import engine.train.checkpoint as checkpoint
from engine.lora.config import LoraConfig
from engine.train.config import TrainConfig
from engine.train.trainer import Trainer
from tests.torch_backend import torch_backend_factory
from tests.train_helpers import pattern_source

model_dir, out, marker = sys.argv[1:4]
real_write = checkpoint.write_bytes_synced

def write(path, data):
    if path.name == "optimizer.safetensors" and "checkpoint-00000004" in str(path):
        with open(path, "wb") as handle:            # half the file reaches the disk, then the process dies
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        Path(marker).write_text("writing")
        time.sleep(600)
    real_write(path, data)

checkpoint.write_bytes_synced = write
config = TrainConfig(lora=LoraConfig(rank=4, alpha=8), batch_size=2, seq_len=12, lr=1e-2, max_steps=6,
                     save_every=2)
Trainer(config, torch_backend_factory(model_dir), pattern_source(384), out, base_model="m").run()
"""


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_resumable(tiny_llama_dir, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tiny_llama_dir), str(out), str(marker)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the training subprocess never reached checkpoint 4"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    root = checkpoint_root(out)
    assert any(p.name.startswith(".tmp-checkpoint-00000004") for p in root.iterdir())   # died mid-write
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-00000002"]

    spec = load_model_spec(tiny_llama_dir)
    config = TrainConfig(lora=LoraConfig(rank=4, alpha=8), batch_size=2, seq_len=12, lr=1e-2, max_steps=6,
                         save_every=2)
    resumed = Trainer(config, torch_backend_factory(tiny_llama_dir), pattern_source(384), out, base_model="m",
                      resume=load_checkpoint(out, spec)).run()
    straight = Trainer(config, torch_backend_factory(tiny_llama_dir), pattern_source(384), tmp_path / "straight",
                       base_model="m").run()
    assert resumed.steps == 6 and not any(p.name.startswith(".tmp") for p in root.iterdir())
    for key, value in straight.lora_state.items():
        np.testing.assert_allclose(resumed.lora_state[key], value, atol=1e-6, rtol=0)
