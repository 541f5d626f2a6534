"""The runs list: every finished training run (adapter, base model, corpus, plan, final metrics) in one JSON file
of the data folder, so that a restarted app can offer the adapters trained before.

Reading never fails: an unreadable file or entry is skipped with a note that says what and why (the file itself is
kept aside as `runs.json.unreadable` before a new list replaces it), and a run whose adapter folder is gone is left
out with a note.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from engine.model.references import data_dir

FILE = "runs.json"
VERSION = 1
KEEP = 200           # the newest runs kept: the list is read at every start


@dataclass(frozen=True)
class RunRecord:
    adapter_dir: str          # where the adapter was saved (adapter_config.json + adapter_model.safetensors)
    model: str                # the base model as the user chose it (folder, .gguf, hub id)
    model_dir: str            # the resolved base model folder: what the adapter fits
    corpus: tuple[str, ...]   # the training files
    plan: dict                # engine.train.config.TrainConfig.to_dict() of the run
    metrics: dict             # steps, total_steps, first_loss, final_loss, eval_perplexity, stopped, backend, ...
    finished_at: str          # UTC, ISO 8601

    @property
    def name(self) -> str:
        return Path(self.adapter_dir).name

    def to_json(self) -> dict:
        return {"adapter_dir": self.adapter_dir, "model": self.model, "model_dir": self.model_dir,
                "corpus": list(self.corpus), "plan": self.plan, "metrics": self.metrics,
                "finished_at": self.finished_at}

    @classmethod
    def from_json(cls, data) -> RunRecord:
        """A record from its JSON object; TypeError names the first field that is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        strings = ("adapter_dir", "model", "model_dir", "finished_at")
        for key in strings:
            if not isinstance(data.get(key), str) or not data[key]:
                raise TypeError(f"{key} must be a non-empty string, got {data.get(key)!r}")
        if not isinstance(data.get("corpus"), list) or not all(isinstance(f, str) for f in data["corpus"]):
            raise TypeError(f"corpus must be a list of file names, got {data.get('corpus')!r}")
        for key in ("plan", "metrics"):
            if not isinstance(data.get(key), dict):
                raise TypeError(f"{key} must be a JSON object, got {data.get(key)!r}")
        return cls(*(data[k] for k in strings[:3]), tuple(data["corpus"]), data["plan"], data["metrics"],
                   data["finished_at"])


def runs_file() -> Path:
    return data_dir() / FILE


def summary_metrics(summary) -> dict:
    """The final figures of an engine.train.trainer.TrainSummary that the runs list keeps."""
    return {"steps": summary.steps, "total_steps": summary.total_steps, "first_loss": summary.first_loss,
            "final_loss": summary.final_loss, "eval_perplexity": summary.eval_perplexity, "tokens": summary.tokens,
            "elapsed_s": round(summary.elapsed_s, 1), "stopped": summary.stopped, "backend": summary.backend}


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read(path: Path) -> tuple[list[RunRecord], list[str], bool]:
    """(records, notes, whether the file as a whole was unreadable)."""
    if not path.is_file():
        return [], [], False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        data, problem = None, str(exc)
    else:
        problem = None if isinstance(data, dict) and isinstance(data.get("runs"), list) else \
            "expected an object with a 'runs' list"
    if problem is not None:
        return [], [f"the runs list {path} could not be read ({problem}); the runs in it are not shown"], True
    records, notes = [], []
    for i, entry in enumerate(data["runs"]):
        try:
            records.append(RunRecord.from_json(entry))
        except TypeError as exc:
            notes.append(f"run {i + 1} of the runs list {path} was skipped: {exc}")
    return records, notes, False


def read_runs(path: Path | None = None) -> tuple[list[RunRecord], list[str]]:
    """The runs whose adapter folder still exists, oldest first, and a note for each one skipped."""
    records, notes, _ = _read(path or runs_file())
    present = []
    for record in records:
        if (Path(record.adapter_dir) / "adapter_config.json").is_file():
            present.append(record)
        else:
            notes.append(f"run {record.name} ({record.finished_at}) is not shown: its adapter folder "
                         f"{record.adapter_dir} is gone or holds no adapter_config.json")
    return present, notes


def record_run(record: RunRecord, path: Path | None = None) -> list[str]:
    """Add `record` (replacing an earlier run saved into the same folder); returns notes on what was unreadable."""
    path = path or runs_file()
    records, notes, unreadable = _read(path)
    if unreadable:
        # Keep what could not be read for the user to look at, rather than overwrite it.
        aside = path.with_name(path.name + ".unreadable")
        os.replace(path, aside)
        notes.append(f"the unreadable runs list was kept as {aside}")
    records = [r for r in records if r.adapter_dir != record.adapter_dir] + [record]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": VERSION, "runs": [r.to_json() for r in records[-KEEP:]]}, indent=1),
                   encoding="utf-8")
    os.replace(tmp, path)      # a crash mid-write never leaves half a list
    return notes
