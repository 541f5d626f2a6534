"""Preference objectives (DPO, ORPO): their configuration, and the loss with its derivatives with respect to the
per-sequence sums of completion log-probabilities. The one implementation both backends use.

A preference micro-batch is (input_ids, labels) [2P, T] in TRL's concatenated layout: rows 0..P−1 the chosen
answers, rows P..2P−1 the rejected answers to the same prompts (engine.corpus.preferences makes them). Labels
follow the SFT convention (unshifted, −100 where not counted), so a row's completion log-probability is
S = Σ_t log p(labels[t+1] | ids[..t]) over its counted targets (base.shift_labels). A pair whose two rows count
no token (a batch's filler) takes no part.

Both losses depend on the weights only through the S of every row, so their gradient is
dL/dθ = Σ_rows (∂L/∂S_row) · dS_row/dθ, a cross-entropy backward with each row's tokens weighted by −∂L/∂S_row:
the backends reuse their cross-entropy gradient with per-token weights instead of 1/tokens.

Formulas (TRL's DPOTrainer loss_type="sigmoid" and ORPOTrainer), means over the step's pairs:
- DPO: z = (S_c − R_c) − (S_r − R_r), R = the reference's S (the base model, adapter off);
  L = mean(−(1−ε)·logσ(βz) − ε·logσ(−βz)); rewards β(S − R).
- ORPO: with the length-averaged log-probabilities a = S / n, log-odds = (a_c − a_r) − (log(1−e^a_c) − log(1−e^a_r));
  L = NLL(chosen) − λ·mean(logσ(log-odds)), NLL = −Σ S_c / Σ n_c (mean token CE over the chosen completions);
  rewards λ·a.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OBJECTIVES = ("dpo", "orpo")


@dataclass(frozen=True)
class PreferenceObjective:
    name: str = field(default="dpo", metadata={"help": "dpo | orpo"})
    beta: float = field(default=0.1, metadata={"help": "DPO: β, the strength of the KL penalty to the reference"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "DPO: ε, the assumed probability that a pair's labels are swapped (cDPO); 0 = plain DPO"})
    orpo_lambda: float = field(default=0.1, metadata={"help": "ORPO: λ, the weight of the odds-ratio term"})

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"preference objective {self.name!r} is unknown; choose from {', '.join(OBJECTIVES)}")
        for key, lo, hi in (("beta", 0.0, None), ("orpo_lambda", 0.0, None), ("label_smoothing", 0.0, 0.5)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or \
                    (value <= lo if key != "label_smoothing" else value < lo) or (hi is not None and value >= hi):
                limit = f"in [0, {hi})" if hi is not None else "> 0"
                raise ValueError(f"{key} must be a number {limit}, got {value!r}")

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"


@dataclass(frozen=True)
class PreferenceLoss:
    loss: float
    d_logps: np.ndarray          # [2P] ∂L/∂S per row, in the rows' order (chosen block, then rejected block)
    pairs: int                   # pairs that counted
    reward_margin: float         # mean(chosen reward − rejected reward)
    reward_accuracy: float       # fraction of pairs whose chosen reward is the larger
    chosen_reward: float         # mean chosen reward
    rejected_reward: float       # mean rejected reward


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_sigmoid(x))


def pair_rows(counts: np.ndarray) -> np.ndarray:
    """Which pairs count, from the [2P] counted tokens per row; ValueError for a pair with only one answer."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size % 2:
        raise ValueError(f"a preference batch needs an even number of rows (chosen, then rejected), got "
                         f"{counts.size}")
    chosen, rejected = np.split(counts, 2)
    lone = np.flatnonzero((chosen > 0) != (rejected > 0))
    if lone.size:
        raise ValueError(f"pair {int(lone[0])} has a counted token in only one of its two rows (chosen "
                         f"{int(chosen[lone[0]])}, rejected {int(rejected[lone[0]])}); both answers need a completion")
    return chosen > 0


def preference_loss(objective: PreferenceObjective, logps: np.ndarray, counts: np.ndarray,
                    reference: np.ndarray | None = None) -> PreferenceLoss:
    """The loss over all pairs of a step and ∂L/∂S per row. `logps` [2P]: S per row (float64 is best);
    `counts` [2P]: counted tokens per row; `reference` [2P]: the reference's S (DPO only). Filler pairs
    (no counted token) get derivative 0."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):   # a NaN S (overflow) gives a NaN loss
        return _preference_loss(objective, np.asarray(logps, np.float64), np.asarray(counts, np.int64), reference)


def _preference_loss(objective: PreferenceObjective, logps: np.ndarray, counts: np.ndarray,
                     reference: np.ndarray | None) -> PreferenceLoss:
    used = pair_rows(counts)
    n = int(used.sum())
    d = np.zeros(logps.size, np.float64)
    if n == 0:
        return PreferenceLoss(float("nan"), d, 0, float("nan"), float("nan"), float("nan"), float("nan"))
    half = logps.size // 2
    s_c, s_r = logps[:half][used], logps[half:][used]
    if objective.name == "dpo":
        if reference is None:
            raise ValueError("DPO needs the reference log-probabilities (the base model's, adapter off)")
        reference = np.asarray(reference, np.float64)
        r_c, r_r = reference[:half][used], reference[half:][used]
        beta, eps = objective.beta, objective.label_smoothing
        z = (s_c - r_c) - (s_r - r_r)
        losses = -(1 - eps) * _log_sigmoid(beta * z) - eps * _log_sigmoid(-beta * z)
        dz = (-(1 - eps) * beta * _sigmoid(-beta * z) + eps * beta * _sigmoid(beta * z)) / n
        d_c, d_r = dz, -dz
        reward_c, reward_r = beta * (s_c - r_c), beta * (s_r - r_r)
        loss = float(losses.mean())
    else:
        lam = objective.orpo_lambda
        n_c, n_r = counts[:half][used].astype(np.float64), counts[half:][used].astype(np.float64)
        a_c, a_r = s_c / n_c, s_r / n_r
        # log(1 − e^a) for a < 0, as TRL's log1p(−exp(a)); expm1 keeps it exact when a is near 0.
        log1m_c, log1m_r = np.log(-np.expm1(a_c)), np.log(-np.expm1(a_r))
        log_odds = (a_c - a_r) - (log1m_c - log1m_r)
        chosen_tokens = n_c.sum()
        nll = -s_c.sum() / chosen_tokens
        loss = float(nll - lam * _log_sigmoid(log_odds).mean())
        d_odds = -lam * _sigmoid(-log_odds) / n
        # ∂log-odds/∂a_c = 1 + e^a/(1 − e^a) = −1/expm1(a); ∂a/∂S = 1/n_tokens.
        d_c = -1.0 / chosen_tokens + d_odds * (-1.0 / np.expm1(a_c)) / n_c
        d_r = d_odds * (1.0 / np.expm1(a_r)) / n_r
        reward_c, reward_r = lam * a_c, lam * a_r
    d[:half][used], d[half:][used] = d_c, d_r
    return PreferenceLoss(loss, d, n, float((reward_c - reward_r).mean()), float((reward_c > reward_r).mean()),
                          float(reward_c.mean()), float(reward_r.mean()))


def join_pairs(rows: list[np.ndarray]) -> np.ndarray:
    """Per-row values of several micro-batches [2P_i] as one step's [2ΣP]: every chosen block, then every
    rejected block, so pair k of the step is (k, ΣP + k) as preference_loss expects."""
    halves = [np.split(np.asarray(r), 2) for r in rows]
    return np.concatenate([h[0] for h in halves] + [h[1] for h in halves])


def split_pairs(values: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """The inverse of join_pairs: the step's [2ΣP] back to each micro-batch's [2P_i] (sizes = the 2P_i)."""
    half = len(values) // 2
    bounds = np.cumsum([0] + [s // 2 for s in sizes])
    return [np.concatenate([values[a:b], values[half + a:half + b]]) for a, b in zip(bounds, bounds[1:])]
