"""Read and validate a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) without peft.

This module owns reading adapter folders for every consumer: the config (`load_adapter_config`), the tensors
(`read_adapter_tensors`, float32 whatever the stored dtype) and the refusals with their reasons (`refusals`).
The exports call `read_adapter`, which returns a validated `LoraAdapter`: one `LoraModule` per adapted Linear,
holding A [r, in] and B [out, r] and the scale PEFT applies (alpha/r, or alpha/sqrt(r) for rsLoRA, per-module
alpha and rank from `alpha_pattern` / `rank_pattern`). Projections left
without an adapter by `exclude_modules` (how a per-module-rank adapter says "rank 0": PEFT's LoRA refuses r = 0) are
simply absent. The trainer (`import_adapter`, at the end) calls the same pieces with `uniform=True`, since its
engines hold one rank and alpha for every layer; evaluation (`inference_state`) pads any readable adapter to one
rank instead, which is exact for a forward pass.
Refused for everyone: DoRA, LoRA biases, modules_to_save, trained tokens, layer replication, raw-parameter
targets, Conv1D fan_in_fan_out and PEFT's other LoRA variants.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.lora.config import LoraConfig, fit_targets, lora_shapes, peft_key
from engine.model.files import FLOAT_DTYPES, read_json_object, safetensors_header
from engine.model.hf_names import TARGET_ORDER, projection_module
from engine.model.spec import ModelSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"  # what PEFT wrote before safetensors became its default

# The Linear layers of a decoder block that an adapter may target (module path suffixes), Phi-3's fused
# qkv_proj and gate_up_proj included.
PROJECTIONS = tuple(projection_module(t) for t in TARGET_ORDER)

# base_model.model.model.layers.{i}.{projection}.lora_{A|B}.weight, as PEFT's save_pretrained writes them.
_KEY = re.compile(r"^base_model\.model\.(?P<module>model\.layers\.(?P<layer>\d+)\.(?P<proj>"
                  + "|".join(re.escape(p) for p in PROJECTIONS) + r"))\.lora_(?P<ab>[AB])\.weight$")


class AdapterError(ValueError):
    """An adapter folder that cannot be read or honoured; the message says why and what to do."""


@dataclass(frozen=True)
class LoraModule:
    name: str          # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    layer: int
    projection: str    # one of PROJECTIONS
    a: np.ndarray      # (r, in_features) float32
    b: np.ndarray      # (out_features, r) float32
    alpha: float       # this module's lora_alpha (after alpha_pattern)
    scale: float       # what PEFT multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> np.ndarray:
        """scale * B @ A: the (out, in) update PEFT adds to the base weight, in float32."""
        return (self.scale * (self.b @ self.a)).astype(np.float32)


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    config: Mapping            # adapter_config.json as read (for provenance only; everything used is validated)
    r: int
    lora_alpha: float
    use_rslora: bool
    base_model_name_or_path: str | None
    modules: tuple[LoraModule, ...]  # sorted by (layer, projection order)


def excluded(cfg: Mapping, module_name: str) -> bool:
    """Whether PEFT leaves `module_name` without an adapter because of exclude_modules (a regex matched whole, or
    a list of names matched as the name itself or its dotted suffix), as peft's check_target_module_exists does."""
    exclude = cfg.get("exclude_modules")
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, module_name) is not None
    return module_name in exclude or any(module_name.endswith(f".{key}") for key in exclude)


def pattern_key(pattern_keys: Iterable[str], module_name: str) -> str:
    """The rank_pattern/alpha_pattern key that applies to `module_name`, matched as PEFT's get_pattern_key does."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name


_OTHER_VARIANTS = ("alora_invocation_tokens", "velora_config", "monteclora_config", "use_bdlora", "arrow_config",
                   "kasa_config")

# What an engine holding one rank and one alpha for every adapted layer (the trainer's) cannot honour besides.
_NOT_UNIFORM = {
    "rank_pattern": "per-module ranks (rank_pattern, e.g. an adaptive-rank adapter) cannot be trained on; "
                    "evaluate, chat with or export it, or start from an adapter of one rank",
    "exclude_modules": "projections left without an adapter (exclude_modules, e.g. pruned to rank 0 by adaptive "
                       "rank) cannot be trained on",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "layers_to_transform": "an adapter on only some layers (layers_to_transform) is not supported",
    "use_qalora": "QA-LoRA is not supported",
}


def load_adapter_config(folder: Path | str) -> dict:
    """adapter_config.json of a PEFT adapter folder as a dict; FileNotFoundError or AdapterError when unusable."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {ADAPTER_CONFIG} is missing")
    return read_json_object(path, "adapter config")


def refusals(cfg: Mapping, *, uniform: bool = False) -> list[str]:
    """Reasons this adapter cannot be used (empty when it can). `uniform`: the consumer needs one rank and alpha
    on every layer, so per-module patterns and partial layer sets are refused too."""
    reasons = []
    if cfg.get("peft_type") == "ADALORA":
        # Its P·Λ·Q form and kept-triplet masks are what an adaptive-rank run trains; everything after training
        # reads the plain LoRA those triplets fold into (per-module ranks), which the run writes beside it.
        reasons.append("it is an AdaLoRA adapter (peft_type 'ADALORA'); use the plain LoRA adapter with "
                       "per-module ranks that an adaptive-rank run writes from it (chat loads either)")
    elif cfg.get("peft_type", "LORA") != "LORA":
        reasons.append(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    if cfg.get("use_dora"):
        reasons.append("it uses DoRA (use_dora=true): its magnitude vector is neither trained nor folded here"
                       " (and llama.cpp and Ollama have no DoRA); train the adapter without DoRA")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        reasons.append(f"it trains biases (bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r});"
                       " only bias 'none' is supported")
    if cfg.get("modules_to_save"):
        reasons.append(f"it fully trains modules_to_save={cfg['modules_to_save']!r}, which is not LoRA")
    if cfg.get("trainable_token_indices"):
        reasons.append("it trains token embeddings (trainable_token_indices)")
    if cfg.get("layer_replication"):
        reasons.append("it uses layer_replication, which changes the base model's layer count")
    if cfg.get("target_parameters"):
        reasons.append(f"it targets parameters directly (target_parameters={cfg['target_parameters']!r})")
    if cfg.get("fan_in_fan_out"):
        reasons.append("fan_in_fan_out=true is for Conv1D (GPT-2) models, not llama/qwen Linear layers")
    # PEFT's other LoRA variants (fields tagged is_lora_variant in peft 0.21) change the forward pass itself.
    variants = [f for f in _OTHER_VARIANTS if cfg.get(f)]
    if cfg.get("init_lora_weights") == "mica":
        variants.append("init_lora_weights='mica'")
    if variants:
        reasons.append(f"it is a LoRA variant ({', '.join(variants)}) whose forward pass plain LoRA cannot express")
    if uniform:
        reasons += [why for key, why in _NOT_UNIFORM.items() if cfg.get(key)]
    return reasons


def target_names(cfg: Mapping) -> tuple[str, ...]:
    """target_modules as projection names (q_proj, ...), refusing patterns and anything outside a decoder block.
    "all-linear" gives every name (a model has only some of them: import_adapter narrows them to the base's)."""
    targets = cfg.get("target_modules")
    if targets == "all-linear":
        return tuple(p.split(".")[-1] for p in PROJECTIONS)
    if isinstance(targets, str):
        raise AdapterError(f"target_modules is the pattern {targets!r}; list module names instead")
    names = tuple(t.rsplit(".", 1)[-1] for t in targets or [])
    known = [p.split(".")[-1] for p in PROJECTIONS]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise AdapterError(f"it adapts {', '.join(unknown)}; only {', '.join(known)} can be adapted")
    return names


def read_adapter_tensors(folder: Path | str) -> dict[str, np.ndarray]:
    """The adapter's tensors as float32 numpy arrays under PEFT's names (any adapter name in a key dropped)."""
    import torch

    folder = Path(folder)
    weights, legacy = folder / ADAPTER_WEIGHTS, folder / LEGACY_WEIGHTS
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file  # torch, not numpy: bf16 adapters have no numpy dtype

        # The header checked against the file first, so a truncated or edited file is refused by name.
        for key, entry in safetensors_header(weights, "adapter weights").items():
            if entry.dtype not in FLOAT_DTYPES:
                # Casting integers or booleans to float would give an adapter nobody trained.
                raise AdapterError(f"{weights}: tensor {key} is stored as {entry.dtype}; LoRA weights are "
                                   f"{', '.join(FLOAT_DTYPES)} — this file is not a LoRA adapter's weights")
        try:
            tensors = load_file(weights)
        except SafetensorError as exc:
            raise AdapterError(f"{weights}: cannot be read ({exc}); this adapter weights file is corrupt — "
                               "save or export the adapter again") from None
    elif legacy.is_file():
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:   # torch raises pickle, zip and runtime errors alike for a damaged file
            raise AdapterError(f"{legacy}: cannot be read ({type(exc).__name__}: {exc}); this adapter weights file "
                               "is corrupt — save the adapter again as safetensors") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterError(f"{legacy}: holds no state dict of tensors; it is not a PEFT adapter's weights")
        bad = [k for k, v in tensors.items() if not v.is_floating_point()]
        if bad:
            raise AdapterError(f"{legacy}: tensor {bad[0]} is stored as {tensors[bad[0]].dtype}; LoRA weights are "
                               "floating point — this file is not a LoRA adapter's weights")
    else:
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS} (or {LEGACY_WEIGHTS}) beside {ADAPTER_CONFIG}")
    # Older PEFT versions and some tools keep the adapter name in the key; drop it.
    state = {k.replace(".default.weight", ".weight"): v.to(torch.float32).numpy() for k, v in tensors.items()}
    bad = [k for k, v in state.items() if not np.isfinite(v).all()]
    if bad:
        # One refusal for every consumer (eval, train --init-adapter, resume, both exports, chat): a NaN or inf
        # weight gives NaN logits, whatever reads it.
        raise AdapterError(f"{weights if weights.is_file() else legacy}: tensor {bad[0]} holds non-finite values "
                           f"(NaN or inf{f', and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}); this "
                           "adapter is broken — use an earlier checkpoint or train again with a lower learning rate")
    return state


def read_adapter(path: Path | str) -> LoraAdapter:
    """Load and validate a PEFT LoRA adapter folder; raise ValueError naming what cannot be exported."""
    path = Path(path)
    cfg = load_adapter_config(path)
    reasons = refusals(cfg)
    if reasons:
        raise AdapterError(f"cannot export the adapter in {path}: " + "; ".join(reasons))

    r, alpha, rank_pattern, alpha_pattern = adapter_settings(cfg, path)
    use_rslora = bool(cfg.get("use_rslora", False))
    try:
        targets = set(target_names(cfg))
    except AdapterError as exc:
        raise AdapterError(f"cannot export the adapter in {path}: {exc}") from None

    tensors = read_adapter_tensors(path)
    weights_path = path / ADAPTER_WEIGHTS
    pairs: dict[str, dict] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"cannot export the adapter in {path}: tensor {key!r} is not a lora_A/lora_B weight"
                               f" of a decoder projection ({', '.join(p.split('.')[-1] for p in PROJECTIONS)})")
        if m["proj"].split(".")[-1] not in targets:
            # PEFT applies only target_modules; a tensor for another projection would change the export only.
            raise AdapterError(f"cannot export the adapter in {path}: {weights_path.name} holds {key} but "
                               f"target_modules ({', '.join(sorted(targets))}) does not include "
                               f"{m['proj'].split('.')[-1]}; PEFT would ignore it — fix adapter_config.json")
        if excluded(cfg, m["module"]):
            # PEFT builds no layer for an excluded module and drops its tensors; applying them would differ.
            raise AdapterError(f"cannot export the adapter in {path}: {weights_path.name} holds {key} but "
                               f"exclude_modules ({cfg['exclude_modules']!r}) leaves {m['module']} without an "
                               "adapter; PEFT would ignore it — fix adapter_config.json")
        entry = pairs.setdefault(m["module"], {"layer": int(m["layer"]), "proj": m["proj"]})
        entry[m["ab"]] = value
    if not pairs:
        raise AdapterError(f"{weights_path} holds no LoRA tensors")

    modules = []
    for name, entry in pairs.items():
        if "A" not in entry or "B" not in entry:
            raise AdapterError(f"{weights_path}: {name} has lora_{'A' if 'A' not in entry else 'B'} missing")
        a, b = entry["A"], entry["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{weights_path}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)},"
                               " expected A (r, in) and B (out, r)")
        rank = a.shape[0]
        expected_rank = int(rank_pattern.get(pattern_key(rank_pattern, name), r))
        if rank != expected_rank:
            raise AdapterError(f"{weights_path}: {name} has rank {rank} but adapter_config.json says {expected_rank}")
        module_alpha = float(alpha_pattern.get(pattern_key(alpha_pattern, name), alpha))
        scale = module_alpha / math.sqrt(rank) if use_rslora else module_alpha / rank
        modules.append(LoraModule(name=name, layer=entry["layer"], projection=entry["proj"], a=a, b=b,
                                  alpha=module_alpha, scale=scale))
    modules.sort(key=lambda mod: (mod.layer, PROJECTIONS.index(mod.projection)))
    return LoraAdapter(path=path, config=cfg, r=r, lora_alpha=alpha, use_rslora=use_rslora,
                       base_model_name_or_path=cfg.get("base_model_name_or_path"), modules=tuple(modules))


def adapter_settings(cfg: Mapping, path: Path) -> tuple[int, float, dict, dict]:
    """(r, lora_alpha, rank_pattern, alpha_pattern), each checked: no default is guessed for r or lora_alpha, since
    a guessed alpha silently rescales every update (PEFT's default 8 against a trained 32 is 4x too small)."""
    def bad(why: str) -> AdapterError:
        return AdapterError(f"{path / ADAPTER_CONFIG}: {why}; fix adapter_config.json or save the adapter again")

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise bad(f"r is {r!r}, expected a positive whole number")
    if not number(alpha):
        raise bad(f"lora_alpha is {alpha!r}, expected a number")
    zero = [k for k, v in (cfg.get("rank_pattern") or {}).items() if v == 0] \
        if isinstance(cfg.get("rank_pattern"), dict) else []
    if zero:
        # PEFT's LoRA raises on r = 0 when it builds the layer; a module without an adapter is listed in
        # exclude_modules instead (what engine.lora.peft_write writes for a projection pruned to nothing).
        raise bad(f"rank_pattern gives {zero[0]} rank 0, which PEFT's LoRA refuses; list it in exclude_modules")
    patterns = []
    for key, check in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
                       ("alpha_pattern", number)):
        value = cfg.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(k, str) and check(v) for k, v in value.items()):
            raise bad(f"{key} is {value!r}, expected {{module name: number}}")
        patterns.append(value)
    exclude = cfg.get("exclude_modules")
    if not (exclude is None or isinstance(exclude, str)
            or (isinstance(exclude, list) and all(isinstance(e, str) for e in exclude))):
        raise bad(f"exclude_modules is {exclude!r}, expected a list of module names or one pattern")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise bad(f"target_modules is {targets!r}, expected a list of module names")
    return r, float(alpha), patterns[0], patterns[1]


def read_base_config(base_dir: Path | str) -> dict:
    """The base model's config.json as a dict (the exports need its architecture and head counts)."""
    path = Path(base_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{base_dir} is not a Hugging Face model folder: config.json is missing")
    return read_json_object(path, "model config")


def check_fits_base(adapter: LoraAdapter, base_config: Mapping) -> None:
    """Refuse an adapter whose layer indices or shapes cannot belong to this base model."""
    n_layers = int(base_config["num_hidden_layers"])
    hidden = int(base_config["hidden_size"])
    n_head = int(base_config["num_attention_heads"])
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
    head_dim = int(base_config.get("head_dim") or hidden // n_head)
    inter = int(base_config["intermediate_size"])
    shapes = {  # projection -> (out, in)
        "self_attn.q_proj": (n_head * head_dim, hidden), "self_attn.k_proj": (n_kv * head_dim, hidden),
        "self_attn.v_proj": (n_kv * head_dim, hidden), "self_attn.o_proj": (hidden, n_head * head_dim),
        "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
        # Phi-3's fused projections: q, k, v rows back to back; gate then up.
        "self_attn.qkv_proj": ((n_head + 2 * n_kv) * head_dim, hidden), "mlp.gate_up_proj": (2 * inter, hidden),
    }
    for mod in adapter.modules:
        if mod.layer >= n_layers:
            raise ValueError(f"adapter targets {mod.name} but the base model has {n_layers} layers; wrong base model?")
        got = (mod.b.shape[0], mod.a.shape[1])
        if got != shapes[mod.projection]:
            raise ValueError(f"adapter's {mod.name} is {got[0]}x{got[1]} but the base model's is"
                             f" {shapes[mod.projection][0]}x{shapes[mod.projection][1]}; wrong base model?")


# ---- for the trainer: one rank and alpha everywhere, and exactly the base's shapes -------------------------
def _refuse(folder: Path, why: str) -> AdapterError:
    return AdapterError(f"{folder}: cannot use this adapter: {why}")


def read_adapter_config(folder: str | Path) -> tuple[LoraConfig, dict]:
    """The LoraConfig of a PEFT adapter folder, refusing every setting the engines cannot honour."""
    folder = Path(folder)
    config = load_adapter_config(folder)
    reasons = refusals(config, uniform=True)
    if reasons:
        raise _refuse(folder, "; ".join(reasons))
    try:
        targets = target_names(config)
        lora = LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                          dropout=float(config.get("lora_dropout") or 0.0), targets=targets,
                          use_rslora=bool(config.get("use_rslora", False)))
    except AdapterError as exc:
        raise _refuse(folder, str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise _refuse(folder, f"bad LoRA settings ({exc})") from None
    return lora, config


def import_adapter(folder: str | Path, spec: ModelSpec) -> tuple[LoraConfig, dict[str, np.ndarray], dict]:
    """(LoraConfig, PEFT-named float32 tensors, raw config) of an adapter, checked against the base's shapes."""
    folder = Path(folder)
    lora, config = read_adapter_config(folder)
    try:
        # "all-linear" means the base's own projections; named targets must be the base's (fused on Phi-3).
        lora = replace(lora, targets=spec.lora_targets) if config.get("target_modules") == "all-linear" \
            else fit_targets(spec, lora)
    except ValueError as exc:
        raise _refuse(folder, str(exc)) from None
    state = read_adapter_tensors(folder)
    expected = lora_shapes(spec, lora)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "") + \
                 ("; " if missing and unexpected else "") + \
                 (f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "")
        raise _refuse(folder, f"its tensors do not match a {spec.layers}-layer {spec.model_type} base: {detail}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise _refuse(folder, f"{key} is {list(state[key].shape)} but this base needs {list(shape)} — "
                                  "it was trained for a different base model")
    return lora, {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, config


def adapter_base_model(config: dict) -> str | None:
    value = config.get("base_model_name_or_path")
    return value if isinstance(value, str) and value else None


def inference_state(folder: str | Path, spec: ModelSpec) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """(LoraConfig, PEFT-named float32 tensors) an engine can run forward passes with, for any adapter that
    read_adapter accepts — per-module ranks and alphas, excluded projections — not only uniform ones.

    A uniform adapter is import_adapter's, unchanged. Otherwise every module is padded with zeros to the largest
    rank R (zero rows of A and columns of B add nothing to B @ A) and its scale is carried by B, under an engine
    scale alpha / r = R / R = 1, so the engine adds exactly PEFT's scale * B @ A; a projection without an adapter
    in some layer gets zero A and B. Not for training: the padding and the moved scale would train differently."""
    folder = Path(folder)
    if not refusals(load_adapter_config(folder), uniform=True):
        lora, state, _ = import_adapter(folder, spec)
        return lora, state
    adapter = read_adapter(folder)
    targets = tuple(t for t in TARGET_ORDER if any(m.projection == projection_module(t) for m in adapter.modules))
    rank = max(m.rank for m in adapter.modules)
    lora = LoraConfig(rank=rank, alpha=float(rank), targets=targets)
    modules = {m.name: m for m in adapter.modules}
    state = {}
    for layer in range(spec.layers):
        for target in targets:
            out_f, in_f = spec.projection_shape(target)
            a, b = np.zeros((rank, in_f), np.float32), np.zeros((out_f, rank), np.float32)
            mod = modules.pop(f"model.layers.{layer}.{projection_module(target)}", None)
            if mod is not None:
                if mod.a.shape[1] != in_f or mod.b.shape[0] != out_f:
                    raise _refuse(folder, f"{mod.name} is {mod.b.shape[0]}x{mod.a.shape[1]} but this base needs "
                                          f"{out_f}x{in_f} — it was trained for a different base model")
                a[:mod.rank] = mod.a
                b[:, :mod.rank] = mod.scale * mod.b
            state[peft_key(layer, target, "A")], state[peft_key(layer, target, "B")] = a, b
    if modules:
        raise _refuse(folder, f"it adapts {next(iter(modules))} but the base has {spec.layers} layers — it was "
                              "trained for a different base model")
    return lora, state
