"""The runs list (engine.train.history): records round-trip, a retrained folder replaces its run, and unreadable
or stale entries are skipped with a note that names them, never an exception."""
import json

from engine.train.history import RunRecord, read_runs, record_run


def _record(adapter_dir, **metrics) -> RunRecord:
    (adapter_dir / "adapter_config.json").parent.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "adapter_config.json").write_text("{}", encoding="utf-8")
    return RunRecord(str(adapter_dir), "demo", "/models/demo", ("a.jsonl",), {"lr": 5e-4, "lora": {"rank": 16}},
                     {"steps": 3, "final_loss": 1.5, **metrics}, "2026-12-03T12:00:00Z")


def test_runs_round_trip_and_a_retrained_folder_replaces_its_run(tmp_path):
    path = tmp_path / "runs.json"
    first, second = _record(tmp_path / "a"), _record(tmp_path / "b")
    assert record_run(first, path) == [] and record_run(second, path) == []
    again = _record(tmp_path / "a", final_loss=0.5)
    record_run(again, path)
    runs, notes = read_runs(path)
    assert runs == [second, again] and notes == []


def test_unreadable_lists_entries_and_gone_adapters_are_notes(tmp_path):
    path = tmp_path / "runs.json"
    assert read_runs(path) == ([], [])                 # a first start
    path.write_text("{not json", encoding="utf-8")
    runs, notes = read_runs(path)
    assert runs == [] and len(notes) == 1 and "could not be read" in notes[0] and str(path) in notes[0]
    good = _record(tmp_path / "a")
    notes = record_run(good, path)                     # the unreadable list is kept aside, not overwritten
    assert (tmp_path / "runs.json.unreadable").read_text(encoding="utf-8") == "{not json"
    assert any("kept as" in n for n in notes) and read_runs(path) == ([good], [])
    data = json.loads(path.read_text(encoding="utf-8"))
    data["runs"] += [{"adapter_dir": 3}, "a string", {**good.to_json(), "adapter_dir": str(tmp_path / "gone")}]
    path.write_text(json.dumps(data), encoding="utf-8")
    runs, notes = read_runs(path)
    assert runs == [good] and len(notes) == 3
    assert "run 2" in notes[0] and "adapter_dir must be a non-empty string" in notes[0]
    assert "run 3" in notes[1] and "expected a JSON object" in notes[1]
    assert "gone" in notes[2] and "is not shown" in notes[2]
