"""Issue 22: one training run per output folder. A second run is refused at start, naming the folder and the
first run's process; a killed run's lock never blocks the next one."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.cli import main
from engine.train.lock import LOCK_FILE, RunFolderBusy, RunLock
from engine.train.trainer import Trainer
from tests.train_helpers import pattern_source

ROOT = Path(__file__).resolve().parents[2]


def _holder(out: Path) -> subprocess.Popen:
    """Another process holding `out`'s run lock, as a live `lora-lab train` does, until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from engine.train.lock import RunLock
        lock = RunLock({str(out)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_into_a_live_runs_folder_is_refused_with_its_pid(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-checkpoint-00000090-15237").mkdir(parents=True)   # the live run's, mid-save
    (out / "checkpoints" / ".tmp-checkpoint-00000090-15237" / "adapter_model.safetensors").write_bytes(b"x")
    data = tmp_path / "train.txt"
    data.write_text("Hello world. " * 40)
    child = _holder(out)
    try:
        before = _files(out)
        code = main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out), "--steps", "1",
                     "--seq-len", "16", "--batch-size", "1", "--backend", "cpu"])
        lines = capsys.readouterr().err.strip().splitlines()
        # Before it: at most the plan the options left to the data (engine.train.recommend), one line.
        assert code == 2 and len(lines) <= 2 and all(line.startswith("plan from the data") for line in lines[:-1])
        assert lines[-1].startswith(f"lora-lab train: error: {out} is in use by another training run "
                                    f"(process {child.pid})"), lines
        assert _files(out) == before              # nothing of the live run's was touched
    finally:
        child.kill()
        child.wait()


def test_a_killed_runs_lock_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "run"
    child = _holder(out)
    with pytest.raises(RunFolderBusy, match=f"process {child.pid}"):
        RunLock(out).acquire()
    os.kill(child.pid, signal.SIGKILL)      # no chance to clean up: the OS drops the lock
    child.wait()
    with RunLock(out) as lock:
        assert lock.held and (out / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_the_trainer_holds_the_lock_until_its_run_ends(tiny_llama_dir, tmp_path):
    from engine.lora.config import LoraConfig
    from engine.train.config import TrainConfig
    from tests.torch_backend import torch_backend_factory

    out = tmp_path / "run"
    cfg = TrainConfig(lora=LoraConfig(rank=2, alpha=4), batch_size=2, seq_len=12, max_steps=1)
    trainer = Trainer(cfg, torch_backend_factory(tiny_llama_dir), pattern_source(384), out, base_model="m")
    with pytest.raises(RunFolderBusy, match=str(out)):
        Trainer(cfg, torch_backend_factory(tiny_llama_dir), pattern_source(384), out, base_model="m")
    trainer.run()
    RunLock(out).acquire().release()        # free again once the run ended


def test_a_refused_start_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "new"
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path / "x.txt"),
                 "--out", str(out), "--steps", "1", "--backend", "cpu"])
    assert code == 2 and not out.exists()
