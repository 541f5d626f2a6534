"""AdaLoRA (Zhang et al., 2023; PEFT's AdaLoraConfig / AdaLoraModel): an SVD-shaped adapter P·Λ·Q whose
triplets are pruned toward a total-rank budget by smoothed sensitivity.

This module owns the settings, the parametrization (flat A, E, B and their map onto the ordinary LoRA a backend
runs), the orthogonality regulariser, the rank allocator (importance EMAs, budget schedule, masking) and the fold
into a per-module-rank LoRA; engine.train.adaptive runs the step, engine.lora.adalora_write writes the adapter.
Field names, defaults and formulas are PEFT 0.21.2's (peft/tuners/adalora/{config,layer,model}.py), so a setting
means here what it means there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from engine.model.hf_names import module_path
from engine.model.spec import ModelSpec


@dataclass(frozen=True)
class AdaLoraSettings:
    init_r: int = field(default=12, metadata={"help": "rank every targeted projection starts with"})
    target_r: int = field(default=8, metadata={"help": "average rank per projection once the budget is spent"})
    tinit: int = field(default=0, metadata={"help": "steps before pruning starts (the budget stays full)"})
    tfinal: int = field(default=0, metadata={"help": "last steps that train with the final ranks fixed"})
    deltaT: int = field(default=1, metadata={"help": "steps between two budget allocations"})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity"})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity's uncertainty"})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "weight of the orthogonality regulariser on P, Q"})
    total_step: int = field(default=0, metadata={
        "help": "the run's optimizer steps; 0: filled in from the run's length when the run is planned"})

    def __post_init__(self):
        for name, low in (("init_r", 1), ("target_r", 1), ("tinit", 0), ("tfinal", 0), ("deltaT", 1),
                          ("total_step", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"adaptive rank: {name} must be an integer >= {low}, got {value!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"adaptive rank: the target rank ({self.target_r}) cannot exceed the initial rank "
                             f"({self.init_r}); pruning only removes rank")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"adaptive rank: {name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.orth_reg_weight >= 0:
            raise ValueError(f"adaptive rank: orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"adaptive rank: tinit {self.tinit} and tfinal {self.tfinal} leave no budgeting phase "
                             f"in {self.total_step} steps; lower them or train longer")

    def to_dict(self) -> dict:
        return asdict(self)


# -- the parametrization ----------------------------------------------------------------------------------------
# PEFT's SVDLinear adds  x·(A ⊙ E)ᵀ·Bᵀ · lora_alpha / (ranknum + 1e-5)  with A [r, in] (right singular vectors),
# E [r, 1] (singular values), B [out, r] (left singular vectors) and ranknum = init_r for the whole run (it is not
# lowered as triplets are pruned, nor when a pruned adapter is loaded). The engine's backends run ordinary LoRA
# (x·Aᵀ·Bᵀ·scaling), so an AdaLoRA step feeds them A_eff = c·(E ⊙ A) with c = adalora_scaling / lora scaling.

def adalora_key(layer: int, target: str, which: str) -> str:
    """The tensor name PEFT's save_pretrained writes for an AdaLoRA adapter, which in "A", "B", "E":
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_E (no ".weight": they are ParameterDict entries)."""
    return f"base_model.model.{module_path(layer, target)}.lora_{which}"


def rank_pattern_key(layer: int, target: str) -> str:
    """A module's key in adapter_config.json's rank_pattern: model.layers.{i}.self_attn.q_proj.lora_E."""
    return f"{module_path(layer, target)}.lora_E"


def adalora_scaling(lora_alpha: float, init_r: int) -> float:
    """lora_alpha / (ranknum + 1e-5) as PEFT computes it: ranknum is a float32 tensor, so the sum is rounded to
    float32 (12 + 1e-5 -> 12.0000095)."""
    return float(lora_alpha) / float(np.float32(init_r) + np.float32(1e-5))


@dataclass(frozen=True)
class AdaLoraModule:
    layer: int
    target: str
    out_features: int
    in_features: int


def adalora_modules(spec: ModelSpec, targets: tuple[str, ...]) -> list[AdaLoraModule]:
    """Every adapted projection, layer by layer in target order (the order of lora_shapes and the rank map)."""
    return [AdaLoraModule(layer, target, *spec.projection_shape(target))
            for layer in range(spec.layers) for target in targets]


@dataclass(frozen=True)
class AdaLoraGroup:
    """The modules of one target, stacked over layers: batched matmuls instead of one call per module."""
    target: str
    index: list[int]          # positions in AdaLoraParams.modules, layer order
    A: np.ndarray             # [n, r, in]
    E: np.ndarray             # [n, r, 1]
    B: np.ndarray             # [n, out, r]


class AdaLoraParams:
    """Every triplet of a run in one flat float32 vector, so the host optimizer updates them in one call and a
    checkpoint stores them as one array. Laid out target by target (A of every layer, then E, then B), so each
    target's stack is a view (`groups`); `A[i]`, `E[i]`, `B[i]` are module i's views, modules layer-major."""

    def __init__(self, modules: list[AdaLoraModule], init_r: int, flat: np.ndarray | None = None):
        self.modules, self.init_r = modules, init_r
        targets = list(dict.fromkeys(m.target for m in modules))
        index = {t: [i for i, m in enumerate(modules) if m.target == t] for t in targets}
        shapes = {t: ((len(index[t]), init_r, modules[index[t][0]].in_features), (len(index[t]), init_r, 1),
                      (len(index[t]), modules[index[t][0]].out_features, init_r)) for t in targets}
        size = sum(int(np.prod(shape)) for t in targets for shape in shapes[t])
        if flat is None:
            flat = np.zeros(size, np.float32)
        if flat.dtype != np.float32 or flat.shape != (size,):
            raise ValueError(f"AdaLoRA parameters: expected float32 [{size}], got {flat.dtype}{list(flat.shape)}")
        self.flat = flat
        self.groups: list[AdaLoraGroup] = []
        offset = 0
        for t in targets:
            views = []
            for shape in shapes[t]:
                views.append(flat[offset:offset + int(np.prod(shape))].reshape(shape))
                offset += int(np.prod(shape))
            self.groups.append(AdaLoraGroup(t, index[t], *views))
        self.A: list[np.ndarray] = [None] * len(modules)     # [r, in] each
        self.E: list[np.ndarray] = [None] * len(modules)     # [r, 1]
        self.B: list[np.ndarray] = [None] * len(modules)     # [out, r]
        for g in self.groups:
            for j, i in enumerate(g.index):
                self.A[i], self.E[i], self.B[i] = g.A[j], g.E[j], g.B[j]

    def like(self, flat: np.ndarray) -> AdaLoraParams:
        """The same layout over another vector (gradients, EMAs)."""
        return AdaLoraParams(self.modules, self.init_r, flat)

    def peft_tensors(self) -> dict[str, np.ndarray]:
        """Copies under PEFT's AdaLoRA names, untruncated."""
        out = {}
        for m, a, e, b in zip(self.modules, self.A, self.E, self.B):
            out[adalora_key(m.layer, m.target, "A")] = a.copy()
            out[adalora_key(m.layer, m.target, "B")] = b.copy()
            out[adalora_key(m.layer, m.target, "E")] = e.copy()
        return out

    def load_peft_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        """Set every triplet from PEFT-named, untruncated tensors; raise naming a missing or misshapen one."""
        for m, views in zip(self.modules, zip(self.A, self.E, self.B)):
            for which, view in zip("AEB", views):
                key = adalora_key(m.layer, m.target, which)
                if key not in tensors:
                    raise ValueError(f"the AdaLoRA starting state lacks {key}: an AdaLoRA run starts from its own "
                                     "A, E, B (PEFT's AdaLoRA names), not from an ordinary LoRA adapter")
                value = np.asarray(tensors[key], np.float32)
                if value.shape != view.shape:
                    raise ValueError(f"AdaLoRA tensor {key} has shape {list(value.shape)}; expected {list(view.shape)}")
                view[...] = value


def init_adalora_params(spec: ModelSpec, targets: tuple[str, ...], init_r: int, seed: int = 0) -> AdaLoraParams:
    """PEFT's reset_lora_parameters: E zero, A and B normal(0, 0.02); seeded, module by module A then B."""
    params = AdaLoraParams(adalora_modules(spec, targets), init_r)
    rng = np.random.default_rng(seed)
    for a, b in zip(params.A, params.B):
        a[...] = rng.normal(0.0, 0.02, a.shape)
        b[...] = rng.normal(0.0, 0.02, b.shape)
    return params


def effective_lora(params: AdaLoraParams, c: float, lora_key) -> dict[str, np.ndarray]:
    """The ordinary LoRA tensors {lora_key(layer, target, "A"|"B"): ...} a backend runs: A_eff = c·(E ⊙ A), B
    (fresh arrays, not views of the parameters)."""
    out = {}
    for g in params.groups:
        a_eff, b = np.float32(c) * (g.E * g.A), g.B.copy()
        for j, i in enumerate(g.index):
            m = params.modules[i]
            out[lora_key(m.layer, m.target, "A")] = a_eff[j]
            out[lora_key(m.layer, m.target, "B")] = b[j]
    return out


def chain_gradients(params: AdaLoraParams, grads: AdaLoraParams, c: float, lora_grads: dict[str, np.ndarray],
                    lora_key) -> None:
    """Into `grads`: ∂L/∂A, ∂L/∂E, ∂L/∂B from a backend's ∂L/∂A_eff, ∂L/∂B (A_eff = c·E ⊙ A, row-wise):
    dA = c·E ⊙ dA_eff, dE_i = c·Σ_j dA_eff_ij·A_ij, dB = dB."""
    c32 = np.float32(c)
    for g, dg in zip(params.groups, grads.groups):
        keys = [(params.modules[i].layer, g.target) for i in g.index]
        d_eff = np.stack([lora_grads[lora_key(layer, target, "A")] for layer, target in keys])   # [n, r, in]
        np.multiply(c32, g.E * d_eff, out=dg.A)
        np.multiply(c32, np.sum(d_eff * g.A, axis=2, keepdims=True), out=dg.E)
        for j, (layer, target) in enumerate(keys):
            dg.B[j] = lora_grads[lora_key(layer, target, "B")]


def orth_regulariser(params: AdaLoraParams, weight: float, grads: AdaLoraParams | None = None) -> float:
    """AdaLoraModel.forward's term: weight · mean over every A and B of ‖A·Aᵀ − I‖_F and ‖Bᵀ·B − I‖_F (pruned
    triplets included: only E is masked). Adds its gradient, weight/n · (2·(AAᵀ−I)·A / ‖·‖ and 2·B·(BᵀB−I) / ‖·‖),
    into `grads` when given; a zero norm contributes no gradient, as torch's norm backward."""
    count = 2 * len(params.modules)
    if count == 0:
        return 0.0
    total = 0.0
    per = weight / count
    eye = np.eye(params.init_r, dtype=np.float32)
    for gi, g in enumerate(params.groups):
        for is_a in (True, False):
            mat = g.A if is_a else g.B                                   # [n, r, in] or [n, out, r]
            cov = mat @ mat.transpose(0, 2, 1) if is_a else mat.transpose(0, 2, 1) @ mat
            cov -= eye                                                   # [n, r, r]
            norms = np.sqrt(np.einsum("nij,nij->n", cov, cov, dtype=np.float64))
            total += float(norms.sum())
            if grads is not None:
                factor = np.where(norms > 0, 2.0 * per / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)
                step = (cov @ mat) if is_a else (mat @ cov)
                target = grads.groups[gi].A if is_a else grads.groups[gi].B
                target += factor[:, None, None] * step
    return weight * total / count


# -- the rank allocator -----------------------------------------------------------------------------------------

def budget_schedule(step: int, settings: AdaLoraSettings, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
    """RankAllocator.budget_schedule: (total rank budget, whether to mask at this step). Full budget up to tinit,
    then a cubic fall to target_bgt reached at total_step − tfinal, masking every deltaT steps; target after."""
    tinit, tfinal, total = settings.tinit, settings.tfinal, settings.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt), step % settings.deltaT == 0


class RankAllocator:
    """PEFT's RankAllocator and AdaLoraModel.update_and_allocate over flat arrays.

    State (all in a checkpoint): the EMAs of the sensitivity |p·∂L/∂p| (exp_avg_ipt) and of its uncertainty
    (exp_avg_unc), both laid out like the parameters; `kept` [modules, init_r], the rank pattern; whether a pattern
    exists yet (PEFT's rank_pattern is None until the first masking) and whether the final one is fixed.
    """

    def __init__(self, settings: AdaLoraSettings, params: AdaLoraParams):
        if settings.total_step <= 0:
            raise ValueError("adaptive rank: total_step is 0; fill it in with the run's step count before training")
        self.settings, self.params = settings, params
        n = len(params.modules)
        self.init_bgt, self.target_bgt = n * params.init_r, n * settings.target_r
        self.exp_avg_ipt = np.zeros_like(params.flat)
        self.exp_avg_unc = np.zeros_like(params.flat)
        self._ipt, self._scratch = np.empty_like(params.flat), np.empty_like(params.flat)
        self.kept = np.ones((n, params.init_r), bool)
        self.has_pattern = False
        self.final = False

    def update_and_allocate(self, step: int, grads: np.ndarray) -> None:
        """After the optimizer update of `step` (1-based), with the step's clipped gradients (flat, like params):
        update the importance EMAs, and mask E to the budget where the schedule says so.
        PEFT masks the final pattern at exactly step total_step − tfinal; when that step was skipped (non-finite)
        the first applied step after it fixes the pattern instead, so the final phase always has one."""
        edge = self.settings.total_step - self.settings.tfinal
        if step < edge:
            self._update_ipt(grads)
            budget, mask = budget_schedule(step, self.settings, self.init_bgt, self.target_bgt)
            if mask:
                self._mask_to_budget(budget)
        elif not self.final:
            self._mask_to_budget(self.target_bgt)
            self.final = True
            self.exp_avg_ipt[...] = 0.0           # reset_ipt
            self.exp_avg_unc[...] = 0.0
        else:
            self._apply_pattern()

    def _update_ipt(self, grads: np.ndarray) -> None:
        """PEFT's update_ipt, in place (the same float32 operations in the same order, no temporaries the size of
        the parameters beyond two): ipt = |p·g|; ema = b1·ema + (1−b1)·ipt; unc = b2·unc + (1−b2)·|ipt − ema|."""
        b1, b2 = self.settings.beta1, self.settings.beta2
        ipt, scratch = self._ipt, self._scratch
        np.multiply(self.params.flat, grads, out=ipt)
        np.abs(ipt, out=ipt)
        np.multiply(ipt, np.float32(1 - b1), out=scratch)
        self.exp_avg_ipt *= np.float32(b1)
        self.exp_avg_ipt += scratch
        np.subtract(ipt, self.exp_avg_ipt, out=scratch)
        np.abs(scratch, out=scratch)
        scratch *= np.float32(1 - b2)
        self.exp_avg_unc *= np.float32(b2)
        self.exp_avg_unc += scratch

    def triplet_scores(self) -> np.ndarray:
        """[modules, init_r]: s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki)), with s = exp_avg_ipt · exp_avg_unc."""
        score = self.params.like(self.exp_avg_ipt * self.exp_avg_unc)
        out = np.zeros((len(self.params.modules), self.params.init_r), np.float32)
        for g in score.groups:
            out[g.index] = g.E[:, :, 0] + (g.A.mean(axis=2) + g.B.mean(axis=1))
        return out

    def _mask_to_budget(self, budget: int) -> None:
        """Zero E of every triplet scoring at or below the (init_bgt − budget)-th smallest score (ties go too).
        PEFT's torch.kthvalue refuses k = 0 (a budget still full); here nothing is masked then."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        if k <= 0:
            self.kept[...] = True
        else:
            threshold = np.partition(scores.ravel(), k - 1)[k - 1]
            self.kept[...] = scores > threshold
        self.has_pattern = True
        self._apply_pattern()

    def _apply_pattern(self) -> None:
        for g in self.params.groups:
            g.E[~self.kept[g.index], 0] = 0.0

    def ranks(self) -> np.ndarray:
        """Kept rank per module, int [modules] (init_r everywhere before the first masking)."""
        return self.kept.sum(axis=1)

    def state(self) -> dict[str, np.ndarray]:
        return {"exp_avg_ipt": self.exp_avg_ipt.copy(), "exp_avg_unc": self.exp_avg_unc.copy(),
                "kept": self.kept.astype(np.uint8), "flags": np.array([self.has_pattern, self.final], np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for key in ("exp_avg_ipt", "exp_avg_unc"):
            if np.shape(state[key]) != self.exp_avg_ipt.shape:
                raise ValueError(f"AdaLoRA state {key} has shape {list(np.shape(state[key]))}; "
                                 f"expected {list(self.exp_avg_ipt.shape)}")
            getattr(self, key)[...] = state[key]
        if np.shape(state["kept"]) != self.kept.shape:
            raise ValueError(f"AdaLoRA rank pattern has shape {list(np.shape(state['kept']))}; "
                             f"expected {list(self.kept.shape)}")
        self.kept[...] = np.asarray(state["kept"]).astype(bool)
        self.has_pattern, self.final = (bool(v) for v in np.asarray(state["flags"]))


# -- exports ----------------------------------------------------------------------------------------------------

def fold_to_lora(params: AdaLoraParams, kept: np.ndarray, lora_alpha: float, lora_key
                 ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """An ordinary LoRA adapter equal to the pruned AdaLoRA one: per module the kept triplets K fold into
    A' = A[K] and B' = B[:, K]·diag(E_K)·c', c' = adalora_scaling / (lora_alpha / r_K), so that PEFT's LoRA with
    rank r_K and scaling lora_alpha / r_K (one lora_alpha, no alpha_pattern) computes the same update.
    Returns ({lora_key(layer, target, "A"|"B"): tensor}, {module path: r_K}). A module with nothing kept has
    rank 0 and no tensors: engine.lora.peft_write writes it to exclude_modules (PEFT's LoRA has no rank 0), so
    its update is exactly zero, as the AdaLoRA one."""
    scaling = adalora_scaling(lora_alpha, params.init_r)
    state, ranks = {}, {}
    for m, a, e, b, keep in zip(params.modules, params.A, params.E, params.B, kept):
        r = int(keep.sum())
        ranks[module_path(m.layer, m.target)] = r
        if r == 0:
            continue
        fold = np.float32(scaling / (lora_alpha / r))
        state[lora_key(m.layer, m.target, "A")] = np.ascontiguousarray(a[keep])
        state[lora_key(m.layer, m.target, "B")] = np.ascontiguousarray(
            (b[:, keep] * (e[keep, 0] * fold)[None, :]).astype(np.float32))
    return state, ranks
