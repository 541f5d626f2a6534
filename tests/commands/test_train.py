"""`lora-lab train/eval/chat` end to end on the tiny models with the real CPU backend (onnxruntime)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from engine.cli import main
from tests.perplexity_reference import hf_guide_perplexity

ROOT = Path(__file__).resolve().parents[2]
TEXT = ("The quick brown fox jumps over the lazy dog. What is the capital of France? The capital of France is "
        "Paris.\nLoRA adapters add a low rank update to the frozen weights of a language model.\n")


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT * 12, encoding="utf-8")
    return path


def run_json(capsys, argv):
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


TRAIN = ["--rank", "4", "--alpha", "8", "--seq-len", "32", "--batch-size", "4", "--lr", "5e-3",
         "--backend", "cpu", "--json"]


def test_train_then_eval_beats_base_and_matches_peft(tiny_llama_dir, corpus_file, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    lines = run_json(capsys, ["train", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(out),
                              "--steps", "16", "--val-split", "0.2", "--eval-every", "8", *TRAIN])
    steps = [x for x in lines if x["event"] == "step"]
    evals = [x for x in lines if x["event"] == "eval"]
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["steps"] == 16 and summary["backend"].startswith("cpu")
    assert [s["step"] for s in steps] == list(range(1, 17)) and [e["step"] for e in evals] == [8, 16]
    assert np.mean([s["loss"] for s in steps[-4:]]) < steps[0]["loss"] - 0.3      # the loss falls
    assert evals[-1]["loss"] < evals[0]["loss"] + 1e-9
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_llama_dir).resolve()) and config["r"] == 4
    assert all(np.isfinite(v).all() for v in load_file(out / "adapter_model.safetensors").values())

    evaluate = ["eval", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--seq-len", "32",
                "--backend", "cpu", "--json"]
    (base,) = run_json(capsys, evaluate)
    (tuned,) = run_json(capsys, evaluate + ["--adapter", str(out)])
    assert set(tuned) == {"loss", "perplexity", "tokens"} and tuned["tokens"] == base["tokens"]
    assert tuned["perplexity"] < base["perplexity"]

    from engine.train.runs import eval_stream
    ids, labels = eval_stream([corpus_file], Path(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="eager")
    peft_ppl, tokens = hf_guide_perplexity(PeftModel.from_pretrained(model, out).eval(), ids, labels, 32, 16)
    assert tokens == tuned["tokens"]
    assert tuned["perplexity"] == pytest.approx(peft_ppl, rel=1e-4)


def test_cli_resume_continues_to_the_same_adapter(tiny_llama_dir, corpus_file, tmp_path, capsys):
    args = ["--model", str(tiny_llama_dir), "--data", str(corpus_file), "--steps", "6", "--save-every", "3",
            "--keep-checkpoints", "3", *TRAIN]
    run_json(capsys, ["train", "--out", str(tmp_path / "a"), *args])
    straight = load_file(tmp_path / "a" / "adapter_model.safetensors")
    # Continue from step 3 with the files and settings the checkpoint names (no --data).
    lines = run_json(capsys, ["train", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "a"), "--json",
                              "--backend", "cpu", "--resume", str(tmp_path / "a" / "checkpoints" / "checkpoint-00000003")])
    assert [x["step"] for x in lines if x["event"] == "step"] == [4, 5, 6]
    assert main(["train", "--out", str(tmp_path / "a"), *args]) == 2     # a fresh run never mixes into an old one
    assert "already holds checkpoints" in capsys.readouterr().err
    resumed = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for key, value in straight.items():
        np.testing.assert_allclose(resumed[key], value, atol=1e-6, rtol=0)


def test_phi3_trains_its_fused_projections_resumes_and_exports(tiny_phi3_dir, corpus_file, tmp_path, capsys):
    """The default targets on Phi-3 are its qkv_proj, o_proj, gate_up_proj and down_proj: the adapter (PEFT
    names, one A per fused module), a resumed run ending on the same adapter, evaluation with it, the GGUF LoRA
    (attn_qkv, ffn_up) and the merged folder (fused weights updated) all follow."""
    import gguf

    args = ["--model", str(tiny_phi3_dir), "--data", str(corpus_file), "--steps", "4", "--save-every", "2",
            "--keep-checkpoints", "2", *TRAIN]
    run_json(capsys, ["train", "--out", str(tmp_path / "a"), *args])
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    straight = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert straight["base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"].shape == (120, 4)
    run_json(capsys, ["train", "--model", str(tiny_phi3_dir), "--out", str(tmp_path / "a"), "--json",
                      "--backend", "cpu", "--resume", str(tmp_path / "a" / "checkpoints" / "checkpoint-00000002")])
    for key, value in load_file(tmp_path / "a" / "adapter_model.safetensors").items():
        np.testing.assert_allclose(value, straight[key], atol=1e-6, rtol=0)
    (tuned,) = run_json(capsys, ["eval", "--model", str(tiny_phi3_dir), "--data", str(corpus_file), "--seq-len",
                                 "32", "--backend", "cpu", "--json", "--adapter", str(tmp_path / "a")])
    assert np.isfinite(tuned["perplexity"])
    base = ["export", "--model", str(tiny_phi3_dir), "--adapter", str(tmp_path / "a")]
    assert main([*base, "--to", "gguf", "--out", str(tmp_path / "gguf")]) == 0
    names = {t.name for t in gguf.GGUFReader(next((tmp_path / "gguf").glob("*.gguf"))).tensors}
    assert {"blk.0.attn_qkv.weight.lora_a", "blk.1.ffn_up.weight.lora_b"} <= names
    assert main([*base, "--to", "merged", "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("extra, message", [
    (["--targets", "q_proj,lm_head"], "unknown LoRA targets"),
    (["--lr", "-1"], "learning rate must be a positive"),
    (["--rank", "0"], "rank must be an integer"),
    (["--seq-len", "100000"], "exceeds the model's"),
    (["--backend", "tpu"], "backend 'tpu' is unknown"),
    (["--val-split", "0.5", "--val-data", "x.txt"], "not both"),
])
def test_bad_arguments_end_with_one_line(tiny_llama_dir, corpus_file, tmp_path, capsys, extra, message):
    backend = [] if "--backend" in extra else ["--backend", "cpu"]
    code = main(["train", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(tmp_path / "o"),
                 *backend, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("lora-lab train: error:")


def test_bad_inputs_in_a_real_process_give_no_traceback(tiny_llama_dir, tmp_path, capsys):
    bad_adapter = tmp_path / "dora"
    bad_adapter.mkdir()
    (bad_adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True, "r": 4,
                                                                 "lora_alpha": 8, "target_modules": ["q_proj"]}))
    in_process = [
        ["train", "--model", str(tiny_llama_dir), "--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o"),
         "--backend", "cpu"],
        ["chat", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path), "--prompt", "hi", "--device", "cpu"],
    ]
    for argv in in_process:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()     # (transformers may draw its loading bar first)
        assert [line for line in err if "error" in line] == err[-1:], err
        assert err[-1].startswith(f"lora-lab {argv[0]}: error:"), err
    in_a_process = [
        ["train", "--model", str(tmp_path / "missing"), "--data", "x.txt", "--out", str(tmp_path / "o")],
        ["eval", "--model", str(tiny_llama_dir), "--adapter", str(bad_adapter), "--data", "x.txt"],
    ]
    for argv in in_a_process:
        proc = subprocess.run([sys.executable, "-m", "engine", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        lines = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert proc.returncode == 2, proc.stderr[-1500:]
        assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-1500:]


def test_chat_replies_with_an_adapter(tiny_llama_dir, corpus_file, tmp_path, capsys):
    from engine.chat.generation import GenerationSettings
    from engine.chat.inference import ChatEngine

    run_json(capsys, ["train", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--out",
                      str(tmp_path / "a"), "--steps", "2", *TRAIN])
    prompt = "What is the capital of France?"
    assert main(["chat", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "a"), "--prompt", prompt,
                 "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"]) == 0
    chat = ChatEngine(device="cpu")
    chat.load(tiny_llama_dir)
    chat.set_active_adapter(chat.load_adapter(tmp_path / "a"))
    expected = "".join(chat.stream_chat([{"role": "user", "content": prompt}],
                                        GenerationSettings(max_new_tokens=6, temperature=0)))
    chat.unload()
    assert capsys.readouterr().out == expected + "\n"


def test_init_adapter_continues_training(tiny_llama_dir, corpus_file, tmp_path, capsys):
    first = run_json(capsys, ["train", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--out",
                              str(tmp_path / "a"), "--steps", "8", *TRAIN])
    args = ["train", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(tmp_path / "b"),
            "--init-adapter", str(tmp_path / "a"), "--steps", "1", "--seq-len", "32", "--batch-size", "4",
            "--backend", "cpu", "--json"]
    second = run_json(capsys, args)
    # Same data order (seed 0), so step 1 of the continued run sees step 1's batch with the trained adapter.
    assert second[0]["loss"] < first[0]["loss"] - 0.3
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == 4
    assert main(args[:-1] + ["--rank", "8"]) == 2
    assert "brings its own rank" in capsys.readouterr().err


def test_non_finite_run_stops_with_one_line_and_keeps_last_good(tiny_model_dirs, tmp_path, capsys):
    import shutil

    from safetensors.numpy import save_file
    model = tmp_path / "poisoned"
    shutil.copytree(tiny_model_dirs["qwen2"], model)          # untied: only inputs holding the token are hit
    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"][:] = np.inf            # every sequence: a NaN loss
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    data = tmp_path / "d.txt"
    data.write_text(TEXT * 4, encoding="utf-8")
    code = main(["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "6",
                 *TRAIN])
    captured = capsys.readouterr()
    steps = [json.loads(line) for line in captured.out.splitlines()]
    err = captured.err.strip().splitlines()
    # Results are read one step late, yet the run stops at exactly three in a row (issue 22).
    assert code == 2 and len(err) == 1 and "NaN/inf at steps 1, 2, 3 in a row" in err[0]
    assert [s["skipped"] for s in steps] == [True] * 3 and steps[0]["loss"] is None
    assert "no step was applied, so no adapter was written" in err[0]
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_a_huge_learning_rate_stops_and_keeps_an_adapter_whose_forward_is_finite(tiny_llama_dir, corpus_file,
                                                                                tmp_path, capsys):
    # Issues 5 and 22. At lr 1e4 steps 1 and 2 apply, and step 2's weights overflow: steps 3-5 are NaN. The adapter
    # after step 2 is the one whose forward gave that NaN (eval: loss NaN); the one after step 1 is kept.
    out = tmp_path / "o"
    code = main(["train", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(out),
                 "--steps", "8", "--save-every", "1", "--keep-checkpoints", "10", *TRAIN, "--lr", "1e4",
                 "--schedule", "constant"])
    captured = capsys.readouterr()
    steps = [x for x in map(json.loads, captured.out.splitlines()) if x["event"] == "step"]
    err = captured.err.strip().splitlines()
    assert [s["step"] for s in steps if not s["skipped"]] == [1, 2]
    assert [s["step"] for s in steps if s["skipped"]] == [3, 4, 5]         # exactly three in a row
    assert code == 2 and len(err) == 1
    assert "NaN/inf at steps 3, 4, 5 in a row (learning rate 1e+04)" in err[0]
    assert "(after step 1; step 2's update is dropped" in err[0] and str(out) in err[0]
    kept = load_file(out / "adapter_model.safetensors")
    after_one = load_file(out / "checkpoints" / "checkpoint-00000001" / "adapter_model.safetensors")
    assert kept.keys() == after_one.keys() and all(np.array_equal(v, after_one[k]) for k, v in kept.items())
    assert any(v.any() for k, v in kept.items() if "lora_B" in k)          # step 1 is in it
    evals = run_json(capsys, ["eval", "--model", str(tiny_llama_dir), "--adapter", str(out), "--data",
                              str(corpus_file), "--seq-len", "32", "--backend", "cpu", "--json"])
    assert np.isfinite(evals[0]["loss"])


def test_progress_bar_and_json_lines_render_steps():
    import io

    from engine.commands.train import JsonLines, ProgressBar
    from engine.train.trainer import EvalEvent, StepEvent

    event = StepEvent(step=3, total=3, epoch=0, loss=float("nan"), lr=1e-4, grad_norm=float("inf"), tokens=10,
                      tokens_per_s=1234.0, elapsed_s=61.0, eta_s=0.0, memory_bytes=3 * 2**20, skipped=True)
    bar = io.StringIO()
    ProgressBar(bar, width=10).on_step(event)
    assert bar.getvalue() == ("\r[##########] 3/3 skipped (non-finite) lr 1.00e-04 1,234 tok/s 1:01 ETA 0:00 "
                              "mem 3 MiB ")
    lines = io.StringIO()
    JsonLines(lines).on_step(event)
    JsonLines(lines).on_eval(EvalEvent(step=3, loss=2.0, perplexity=float(np.exp(2.0)), tokens=5, elapsed_s=1.0))
    step, evaluation = map(json.loads, lines.getvalue().splitlines())      # strict JSON: no NaN
    assert step["loss"] is None and step["grad_norm"] is None and step["skipped"] is True
    assert evaluation == {"event": "eval", "step": 3, "loss": 2.0, "perplexity": pytest.approx(np.exp(2.0)),
                          "tokens": 5}


def test_plain_output_without_a_terminal(tiny_llama_dir, corpus_file, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(tmp_path / "a"),
                 "--steps", "2", *TRAIN[:-1]]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "training " in captured.err and "done: 2/2 steps, loss " in captured.err


def test_recompute_on_the_wgsl_backend_trains_the_same_adapter_in_less_memory(tiny_llama_dir, corpus_file,
                                                                               tmp_path, capsys, gpu_device):
    """`--recompute` reaches the WGSL backend: the same losses and adapter bits, fewer bytes, and the setting is
    kept in the checkpoint's config."""
    args = ["--model", str(tiny_llama_dir), "--data", str(corpus_file), "--steps", "3", "--rank", "4", "--alpha",
            "8", "--seq-len", "32", "--batch-size", "2", "--grad-accum", "2", "--dropout", "0.1", "--lr", "5e-3",
            "--backend", f"wgpu:{gpu_device.label}", "--json"]
    runs = {}
    for name, extra in (("kept", ["--recompute", "off"]), ("recomputed", ["--recompute", "on"])):
        lines = run_json(capsys, ["train", "--out", str(tmp_path / name), *args, *extra])
        steps = [x for x in lines if x["event"] == "step"]
        runs[name] = ([(s["loss"], s["grad_norm"]) for s in steps], steps[0]["memory_bytes"],
                      load_file(tmp_path / name / "adapter_model.safetensors"))
    assert runs["recomputed"][0] == runs["kept"][0] and len(runs["kept"][0]) == 3
    assert runs["recomputed"][1] < runs["kept"][1]
    assert runs["recomputed"][2].keys() == runs["kept"][2].keys()
    for key, value in runs["kept"][2].items():
        assert np.array_equal(runs["recomputed"][2][key], value), key
    from engine.model.spec import load_model_spec
    from engine.train.checkpoint import load_checkpoint
    from engine.train.config import TrainConfig
    saved = load_checkpoint(tmp_path / "recomputed", load_model_spec(tiny_llama_dir)).trainer_state["config"]
    assert TrainConfig.from_dict(saved).recompute is True


def test_math_f16_on_the_wgsl_backend_trains_close_to_f32(tiny_llama_dir, corpus_file, tmp_path, capsys, gpu_device):
    """`--math f16 --weights bf16` reaches the WGSL backend: losses within 1e-3 relative of math f32's on the same
    bf16 weights (kernels.linear_f16; measured 2.5e-5 and 3.8e-5 relative on lavapipe), and the setting is kept
    in the checkpoint's config."""
    if not gpu_device.has_f16:
        pytest.skip(f"{gpu_device.label} has no shader-f16")
    args = ["--model", str(tiny_llama_dir), "--data", str(corpus_file), "--steps", "2", "--rank", "4", "--alpha",
            "8", "--seq-len", "32", "--batch-size", "2", "--lr", "5e-3", "--weights", "bf16", "--recompute", "off",
            "--backend", f"wgpu:{gpu_device.label}", "--json"]
    losses = {}
    for math in ("f32", "f16"):
        lines = run_json(capsys, ["train", "--out", str(tmp_path / math), *args, "--math", math])
        losses[math] = [x["loss"] for x in lines if x["event"] == "step"]
    assert len(losses["f16"]) == 2 and losses["f16"] != losses["f32"]
    np.testing.assert_allclose(losses["f16"], losses["f32"], rtol=1e-3)
    from engine.model.spec import load_model_spec
    from engine.train.checkpoint import load_checkpoint
    from engine.train.config import TrainConfig
    saved = load_checkpoint(tmp_path / "f16", load_model_spec(tiny_llama_dir)).trainer_state["config"]
    assert TrainConfig.from_dict(saved).math == "f16"


def test_a_cli_run_joins_the_runs_list_the_window_reopens(tiny_llama_dir, corpus_file, tmp_path, capsys):
    from engine.train.history import read_runs

    out = tmp_path / "listed"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(out),
                 "--steps", "2", *TRAIN[:-1]]) == 0
    runs, notes = read_runs()
    assert notes == [] and len(runs) == 1
    run = runs[0]
    assert Path(run.adapter_dir) == out.resolve() and Path(run.model_dir) == Path(tiny_llama_dir).resolve()
    assert run.corpus == (str(Path(corpus_file).resolve()),) and run.plan["lora"]["rank"] > 0
    assert run.metrics["steps"] == 2
