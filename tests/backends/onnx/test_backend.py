"""The CPU (onnxruntime) backend against PyTorch autograd + PEFT on the tiny Llama, Qwen2 and Qwen3 models."""
import numpy as np
import pytest

from engine.backends.base import OptimizerConfig
from engine.lora.config import LoraConfig, peft_key
from engine.model.hf_names import module_path
from engine.model.spec import load_model_spec
from engine.backends.onnx import OnnxBackend
from tests.oracle import adamw_trajectory, loss_and_grads, peft_model, random_batch, random_lora_state

LORA = LoraConfig(rank=4, alpha=8)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def make_backend(model_dir, lora=LORA, batch=2, seq=9, state=None, seed=0, **optim):
    return OnnxBackend(model_dir, lora, OptimizerConfig(**optim), batch, seq, seed=seed, init_state=state,
                       threads=1)


@pytest.mark.parametrize("lora", [LORA, LoraConfig(rank=3, alpha=5, use_rslora=True,
                                                   targets=("q_proj", "v_proj", "up_proj", "down_proj")),
                                  # no LoRA reads a normalised input (the folded norm weights go unused)
                                  LoraConfig(rank=2, alpha=4, targets=("o_proj", "down_proj"))],
                         ids=["all-targets", "rslora-subset", "o-down-only"])
def test_loss_and_every_grad_match_peft(tiny_model_dir, lora):
    spec = load_model_spec(tiny_model_dir)
    state = random_lora_state(spec, lora, seed=1)
    ids, labels = random_batch(spec.vocab_size, 2, 9, seed=2)
    want = loss_and_grads(peft_model(tiny_model_dir, lora, state), ids, labels)
    with make_backend(tiny_model_dir, lora, state=state) as backend:
        loss, tokens, grads = backend.gradients([(ids, labels)])
    assert tokens == int((labels[:, 1:] != -100).sum())
    assert abs(loss - want.loss) <= 1e-3 * abs(want.loss)
    assert grads.keys() == want.grads.keys()
    assert len(grads) == 2 * spec.layers * len(lora.targets)
    for key in want.grads:
        assert rel_err(grads[key], want.grads[key]) < 1e-3, key


def test_smaller_batch_is_padded_without_changing_numbers(tiny_llama_dir):
    """A [1, 6] batch in a backend built for [2, 9]: padding must not leak into loss or gradients."""
    spec = load_model_spec(tiny_llama_dir)
    state = random_lora_state(spec, LORA, seed=4)
    ids, labels = random_batch(spec.vocab_size, 1, 6, seed=5)
    want = loss_and_grads(peft_model(tiny_llama_dir, LORA, state), ids, labels)
    with make_backend(tiny_llama_dir, state=state) as backend:
        loss, _, grads = backend.gradients([(ids, labels)])
        logits = backend.logits(ids)
        loss_sum, tokens = backend.eval_loss(ids, labels)
    assert abs(loss - want.loss) <= 1e-3 * want.loss
    assert max(rel_err(grads[k], want.grads[k]) for k in want.grads) < 1e-3
    assert logits.shape == want.logits.shape
    np.testing.assert_allclose(logits, want.logits, rtol=1e-4, atol=1e-4)
    assert tokens == int((labels[:, 1:] != -100).sum())
    assert abs(loss_sum / tokens - want.loss) <= 1e-4 * want.loss


def test_micro_batches_accumulate_like_one_batch(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    state = random_lora_state(spec, LORA, seed=6)
    ids, labels = random_batch(spec.vocab_size, 2, 9, seed=7)
    labels[0, 1:6] = -100   # unequal token counts per row, so a mean of means would differ
    with make_backend(tiny_llama_dir, state=state) as backend:
        whole = backend.gradients([(ids, labels)])
        split = backend.gradients([(ids[:1], labels[:1]), (ids[1:], labels[1:])])
    assert whole[1] == split[1]
    assert abs(whole[0] - split[0]) < 1e-5
    assert max(rel_err(split[2][k], whole[2][k]) for k in whole[2]) < 1e-4


def test_training_trajectory_matches_torch_adamw(tiny_model_dir):
    spec = load_model_spec(tiny_model_dir)
    state = random_lora_state(spec, LORA, seed=8)
    batches = [random_batch(spec.vocab_size, 2, 9, seed=s) for s in (10, 11)]
    want = adamw_trajectory(peft_model(tiny_model_dir, LORA, state), batches, lr=3e-3, steps=6,
                            weight_decay=0.01, max_grad_norm=0.5)
    with make_backend(tiny_model_dir, state=state, weight_decay=0.01) as backend:
        got = [backend.train_step([batches[i % 2]], lr=3e-3, max_grad_norm=0.5).result() for i in range(6)]
    assert [r.step for r in got] == list(range(1, 7))
    assert not any(r.skipped for r in got)
    assert got[0].grad_norm > 0.5, "the clipping path must be exercised"
    np.testing.assert_allclose([r.loss for r in got], want, rtol=1e-3)
    assert got[-1].loss < got[0].loss


def test_non_finite_step_is_skipped_and_changes_nothing(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    batch = random_batch(spec.vocab_size, 2, 9, seed=12)
    with make_backend(tiny_llama_dir, state=random_lora_state(spec, LORA, seed=9)) as backend:
        assert not backend.train_step([batch], lr=1e-3, max_grad_norm=1.0).result().skipped
        state = backend.lora_state()
        state[peft_key(1, "up_proj", "B")][0, 0] = np.inf
        backend.load_lora_state(state)
        before, moments = backend.lora_state(), backend.optimizer_state()
        result = backend.train_step([batch], lr=1e-3, max_grad_norm=1.0).result()
        assert result.skipped and result.step == 1 and not np.isfinite(result.loss)
        after = backend.lora_state()
        assert all(np.array_equal(before[k], after[k]) for k in before)
        assert all(np.array_equal(moments[k], v) for k, v in backend.optimizer_state().items())


def test_rmsnorm_row_that_overflows_is_nan_not_zero():
    """x² of 1e20 overflows float32; 1/sqrt(inf) = 0 would silently zero the row, so that row must be NaN."""
    from engine.backends.onnx import forward as fw
    from engine.backends.onnx.graph import Graph
    from engine.backends.onnx.session import GraphSession, available_providers, ort_values
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 130)).astype(np.float32)
    x[1, 7], x[2, 100] = 1e20, np.nan
    x[3] *= 5e17                       # mean square ~3e35: finite, normalised as usual
    w = rng.standard_normal(130).astype(np.float32)
    g = Graph("rmsnorm")
    y, (_, rstd) = fw.rmsnorm_forward(g, g.input("x", np.float32, [4, 130]), g.weight("w", w), 1e-6)
    g.output(y, "y")
    g.output(rstd, "rstd")
    got = GraphSession(g, ort_values(g.weights), 1, available_providers()).run({"x": x})
    assert np.isnan(got["y"][1:3]).all() and np.isnan(got["rstd"][1:3]).all()
    ok = x[[0, 3]].astype(np.float64)
    want_rstd = 1.0 / np.sqrt((ok ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got["rstd"][[0, 3]], want_rstd, rtol=1e-5)
    np.testing.assert_allclose(got["y"][[0, 3]], w * ok * want_rstd, rtol=1e-5, atol=1e-6)


def test_overflowed_hidden_state_makes_the_loss_nan_and_skips_the_step(tiny_llama_dir):
    """A huge (finite) LoRA B overflows the residual stream's mean square in the next norm: the loss must be
    NaN (not the ln(vocab) of an all-zero hidden state) and the step skipped, leaving everything untouched."""
    spec = load_model_spec(tiny_llama_dir)
    ids, labels = random_batch(spec.vocab_size, 2, 9, seed=12)
    state = random_lora_state(spec, LORA, seed=9)
    state[peft_key(0, "down_proj", "B")] *= np.float32(1e25)
    assert all(np.isfinite(v).all() for v in state.values())
    with make_backend(tiny_llama_dir, state=state) as backend:
        loss_sum, tokens = backend.eval_loss(ids, labels)
        assert tokens > 0 and np.isnan(loss_sum)
        before, moments = backend.lora_state(), backend.optimizer_state()
        result = backend.train_step([(ids, labels)], lr=1e-3, max_grad_norm=1.0).result()
        assert result.skipped and result.step == 0 and np.isnan(result.loss)
        assert all(np.array_equal(before[k], v) for k, v in backend.lora_state().items())
        assert all(np.array_equal(moments[k], v) for k, v in backend.optimizer_state().items())


def test_step_without_counted_tokens_is_skipped(tiny_llama_dir):
    """All labels masked: the mean loss is 0/0, so the step is non-finite and must not move anything."""
    spec = load_model_spec(tiny_llama_dir)
    ids, labels = random_batch(spec.vocab_size, 2, 9, seed=13)
    labels[:] = -100
    with make_backend(tiny_llama_dir, state=random_lora_state(spec, LORA, seed=9)) as backend:
        before = backend.lora_state()
        result = backend.train_step([(ids, labels)], lr=1e-3, max_grad_norm=1.0).result()
        assert result.skipped and result.tokens == 0 and result.step == 0
        assert all(np.array_equal(before[k], v) for k, v in backend.lora_state().items())


@pytest.mark.parametrize("blocks", [2, 3])
def test_causal_query_blocks_match_peft(tiny_model_dir, blocks):
    """Attention cut into causal query blocks (each against the keys up to its last position; the automatic
    choice uses them from 256 positions on) gives PEFT's loss, logits and every gradient."""
    spec = load_model_spec(tiny_model_dir)
    state = random_lora_state(spec, LORA, seed=1)
    ids, labels = random_batch(spec.vocab_size, 2, 12, seed=2)
    want = loss_and_grads(peft_model(tiny_model_dir, LORA, state), ids, labels)
    with OnnxBackend(tiny_model_dir, LORA, OptimizerConfig(), 2, 12, init_state=state, threads=1,
                     attention_blocks=blocks) as backend:
        assert backend._graphs.att.query_blocks == blocks
        loss, _, grads = backend.gradients([(ids, labels)])
        logits = backend.logits(ids)
    assert abs(loss - want.loss) <= 1e-5 * want.loss
    np.testing.assert_allclose(logits, want.logits, rtol=1e-4, atol=1e-4)
    assert max(rel_err(grads[k], want.grads[k]) for k in want.grads) < 1e-3


def test_frozen_products_take_no_c_input_after_onnxruntime_optimises(tiny_llama_dir, tmp_path):
    """No Gemm of the optimised training graph accumulates into a C input (the model has no biases): onnxruntime
    copies C into the output on one thread first (~20% of a [256, 1536] projection), so the graph adds LoRA and
    sums gradients with Add/Sum, and sums of two with Add, which its optimiser does not fold back into a Gemm."""
    import onnx
    import onnxruntime as ort

    from engine.model.weights import open_weights
    from engine.backends.onnx.model_graph import DecoderGraph, GraphShape, prepare_weights
    from engine.backends.onnx.session import ort_values

    spec = load_model_spec(tiny_llama_dir)
    graph = DecoderGraph(spec, prepare_weights(spec, open_weights(tiny_llama_dir)), LORA, GraphShape(2, 12)).build("train")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    values = ort_values(graph.weights)
    options.add_external_initializers(list(values), list(values.values()))
    ort.InferenceSession(graph.model().SerializeToString(), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(str(tmp_path / "optimised.onnx"), load_external_data=False).graph.node
    gemms = [n for n in nodes if n.op_type == "Gemm"]
    assert len(gemms) > spec.layers * 7
    assert [n.name for n in gemms if len(n.input) > 2] == []


def test_micro_batch_without_labels_adds_nothing(tiny_llama_dir):
    """The LM head runs on labelled positions only; a micro-batch with none (its placeholder row has weight
    0) leaves the loss, the token count and every gradient as the labelled micro-batch alone gives them."""
    spec = load_model_spec(tiny_llama_dir)
    ids, labels = random_batch(spec.vocab_size, 2, 9, seed=14, masked_fraction=0.8)
    empty = labels[:1].copy()
    empty[:] = -100
    with make_backend(tiny_llama_dir, state=random_lora_state(spec, LORA, seed=9)) as backend:
        alone = backend.gradients([(ids[1:], labels[1:])])
        with_empty = backend.gradients([(ids[:1], empty), (ids[1:], labels[1:])])
    assert alone[1] == with_empty[1] > 0 and alone[0] == with_empty[0]
    assert all(np.array_equal(alone[2][k], with_empty[2][k]) for k in alone[2])


def test_lora_and_optimizer_state_round_trip(tiny_model_dirs):
    model_dir = tiny_model_dirs["qwen2"]
    spec = load_model_spec(model_dir)
    batches = [random_batch(spec.vocab_size, 2, 9, seed=s) for s in (20, 21, 22)]
    with make_backend(model_dir, seed=3, name="adamw8bit") as first:
        for b in batches[:2]:
            first.train_step([b], lr=1e-2, max_grad_norm=1.0)
        lora_state, optim_state = first.lora_state(), first.optimizer_state()
        expected = first.train_step([batches[2]], lr=1e-2, max_grad_norm=1.0).result()
        expected_state = first.lora_state()
    with make_backend(model_dir, seed=99, name="adamw8bit") as second:
        second.load_lora_state(lora_state)
        second.load_optimizer_state(optim_state)
        assert int(second.optimizer_state()["step"]) == 2
        got = second.train_step([batches[2]], lr=1e-2, max_grad_norm=1.0).result()
        assert got == expected
        assert all(np.array_equal(expected_state[k], v) for k, v in second.lora_state().items())


def test_initial_adapter_is_peft_init_and_leaves_the_base_model(tiny_llama_dir):
    from engine.lora.config import init_lora_state
    spec = load_model_spec(tiny_llama_dir)
    with make_backend(tiny_llama_dir, seed=5) as backend:
        state = backend.lora_state()
        ids = random_batch(spec.vocab_size, 1, 9, seed=1)[0]
        logits = backend.logits(ids)
    expected = init_lora_state(spec, LORA, 5)
    assert all(np.array_equal(state[k], expected[k]) for k in expected)
    want = peft_model(tiny_llama_dir, LORA, expected)
    import torch
    with torch.no_grad():
        ref = want(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_bad_input_is_refused_clearly(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    with make_backend(tiny_llama_dir) as backend:
        with pytest.raises(ValueError, match="exceeds"):
            backend.gradients([random_batch(spec.vocab_size, 3, 9)])
        with pytest.raises(ValueError, match="shape"):
            state = backend.lora_state()
            state[peft_key(0, "q_proj", "A")] = np.zeros((5, 5), np.float32)
            backend.load_lora_state(state)
        with pytest.raises(ValueError, match="missing"):
            backend.load_lora_state({})


def test_flush_to_zero_stays_inside_onnxruntime(tiny_llama_dir):
    """The sessions flush denormals for speed; the caller's thread must keep IEEE arithmetic."""
    tiny = np.array([1e-39], np.float32)
    with make_backend(tiny_llama_dir) as backend:
        backend.logits(np.zeros((1, 4), np.int32))
        assert (tiny * np.float32(2.0))[0] == np.float32(2e-39)


DROPOUT = LoraConfig(rank=4, alpha=8, dropout=0.25)


def dropout_against_peft(model_dir, lora: LoraConfig):
    """Run the train graph with its dropout masks as outputs, then PEFT with those masks in place of its
    nn.Dropout modules. Returns (graph outputs, PEFT's loss and gradients, the masks in layer × target order,
    counted tokens)."""
    import torch

    from engine.backends.onnx.model_graph import DecoderGraph, GraphShape, dropout_mask_name, prepare_weights
    from engine.backends.onnx.session import GraphSession, ort_values
    from engine.model.weights import open_weights

    spec = load_model_spec(model_dir)
    state = random_lora_state(spec, lora, seed=3)
    ids, labels = random_batch(spec.vocab_size, 2, 9, seed=4)
    weights = prepare_weights(spec, open_weights(model_dir))
    graph = DecoderGraph(spec, weights, lora, GraphShape(2, 9), seed=7, expose_dropout_masks=True)
    with make_backend(model_dir, lora=lora, state=state) as backend:
        backend._fill(ids, labels)
        feeds = {k: v.copy() for k, v in backend._feeds(labelled=True).items()}
    out = GraphSession(graph.build("train"), ort_values(weights), 1, ["CPUExecutionProvider"]).run(feeds)

    class FixedMask(torch.nn.Module):
        def __init__(self, keep):
            super().__init__()
            self.keep = torch.from_numpy(keep.reshape(2, 9, -1))

        def forward(self, x):
            return x * self.keep

    model = peft_model(model_dir, lora, state)
    masks = []
    for layer in range(spec.layers):
        for target in lora.targets:
            keep = out[dropout_mask_name(layer, target)]
            masks.append(keep)
            module = model.get_submodule(f"base_model.model.{module_path(layer, target)}")
            module.lora_dropout["default"] = FixedMask(keep)
    return out, loss_and_grads(model, ids, labels), masks, int((labels[:, 1:] != -100).sum())


def test_lora_dropout_gradients_match_peft_with_the_same_masks(tiny_model_dir):
    from engine.backends.onnx.model_graph import grad_name

    out, want, masks, tokens = dropout_against_peft(tiny_model_dir, DROPOUT)
    kept = np.mean([(m > 0).mean() for m in masks])
    assert 0.65 < kept < 0.85, f"about 75% of inputs should be kept, got {kept:.2f}"
    assert len({m.tobytes() for m in masks}) == len(masks), "every module must draw its own mask"
    assert abs(float(out["loss_sum"]) / tokens - want.loss) <= 1e-3 * want.loss
    for key, grad in want.grads.items():
        assert rel_err(out[grad_name(key)] / tokens, grad) < 1e-3, key


def test_lora_dropout_draws_new_masks_each_step_and_repeats_for_a_seed(tiny_llama_dir):
    spec = load_model_spec(tiny_llama_dir)
    state = random_lora_state(spec, DROPOUT, seed=3)
    batch = random_batch(spec.vocab_size, 2, 9, seed=5)
    runs = []
    for _ in range(2):
        with make_backend(tiny_llama_dir, lora=DROPOUT, state=state, seed=11) as backend:
            runs.append([backend.gradients([batch]) for _ in range(2)])
            ids = batch[0]
            np.testing.assert_array_equal(backend.logits(ids), backend.logits(ids))   # no dropout at eval
            eval_sum, tokens = backend.eval_loss(*batch)
    first, second = runs
    key = peft_key(0, "q_proj", "A")
    assert not np.array_equal(first[0][2][key], first[1][2][key]), "masks must change between steps"
    assert first[0][0] == second[0][0] and np.array_equal(first[1][2][key], second[1][2][key])
    with make_backend(tiny_llama_dir, lora=LoraConfig(rank=4, alpha=8), state=state) as plain:
        assert plain.eval_loss(*batch) == (eval_sum, tokens)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}], ids=["llama3", "linear"])
def test_scaled_rope_matches_peft(tmp_path, rope):
    from bench.tiny_models import make_model

    make_model("llama", tmp_path, rope_parameters=rope)
    spec = load_model_spec(tmp_path)
    assert spec.rope.scaling_type == rope["rope_type"]
    state = random_lora_state(spec, LORA, seed=1)
    ids, labels = random_batch(spec.vocab_size, 1, 40, seed=2)
    want = loss_and_grads(peft_model(tmp_path, LORA, state), ids, labels)
    with make_backend(tmp_path, batch=1, seq=40, state=state) as backend:
        loss, _, grads = backend.gradients([(ids, labels)])
    assert abs(loss - want.loss) <= 1e-3 * want.loss
    assert max(rel_err(grads[k], want.grads[k]) for k in want.grads) < 1e-3
