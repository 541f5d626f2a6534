"""DPO and ORPO written in PyTorch after TRL's DPOTrainer (loss_type="sigmoid") and ORPOTrainer, on a PEFT model:
the oracle the backends' preference objectives are checked against. The reference model is TRL's choice for a
PEFT policy without a ref_model: the same model under `disable_adapter()`."""
from __future__ import annotations

import numpy as np


def row_logps(model, input_ids: np.ndarray, labels: np.ndarray, average: bool = False):
    """TRL's get_batch_logps: Σ (or mean) over each row's labelled targets of log softmax(logits)[target], and the
    logits (for ORPO's NLL)."""
    import torch

    ids = torch.from_numpy(input_ids.astype(np.int64))
    lab = torch.from_numpy(labels.astype(np.int64))
    logits = model(input_ids=ids).logits
    targets, mask = lab[:, 1:].clone(), lab[:, 1:] != -100
    targets[~mask] = 0
    picked = torch.gather(logits[:, :-1].log_softmax(-1), 2, targets.unsqueeze(2)).squeeze(2)
    total = (picked * mask).sum(-1)
    return (total / mask.sum(-1) if average else total), logits


def dpo_loss_and_grads(model, input_ids: np.ndarray, labels: np.ndarray, beta: float, label_smoothing: float = 0.0):
    """Rows 0..P−1 chosen, P..2P−1 rejected. Returns (loss, chosen rewards, rejected rewards, grads by PEFT name)."""
    import torch
    import torch.nn.functional as F

    half = len(input_ids) // 2
    with torch.no_grad(), model.disable_adapter():
        ref, _ = row_logps(model, input_ids, labels)
    model.zero_grad(set_to_none=True)
    pol, _ = row_logps(model, input_ids, labels)
    logits = (pol[:half] - ref[:half]) - (pol[half:] - ref[half:])
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    loss = losses.mean()
    loss.backward()
    rewards = beta * (pol - ref).detach()
    return float(loss.detach()), rewards[:half].numpy(), rewards[half:].numpy(), _grads(model)


def orpo_loss_and_grads(model, input_ids: np.ndarray, labels: np.ndarray, lam: float):
    import torch
    import torch.nn.functional as F

    half = len(input_ids) // 2
    model.zero_grad(set_to_none=True)
    logps, logits = row_logps(model, input_ids, labels, average=True)
    lab = torch.from_numpy(labels.astype(np.int64))
    nll = F.cross_entropy(logits[:half, :-1].reshape(-1, logits.shape[-1]), lab[:half, 1:].reshape(-1),
                          ignore_index=-100)
    chosen, rejected = logps[:half], logps[half:]
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    loss = nll - (lam * F.logsigmoid(log_odds)).mean()
    loss.backward()
    return float(loss.detach()), (lam * chosen).detach().numpy(), (lam * rejected).detach().numpy(), _grads(model)


def _grads(model) -> dict[str, np.ndarray]:
    return {name.replace(".default.weight", ".weight"): p.grad.detach().numpy().copy()
            for name, p in model.named_parameters() if p.requires_grad}


def random_pairs(vocab: int, pairs: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[2P, seq] rows in the concatenated layout: each pair shares a prompt of its own length; answers of different
    lengths, right-padded (labels −100); the first pair also counts one early target, so a row's counted targets
    need not be one contiguous span (the objective follows the labels, whatever they mark)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (2 * pairs, seq)).astype(np.int32)
    labels = np.full(ids.shape, -100, np.int32)
    for k in range(pairs):
        prompt = int(rng.integers(2, seq - 3))
        ids[pairs + k, :prompt] = ids[k, :prompt]
        for row in (k, pairs + k):
            end = int(rng.integers(prompt + 1, seq + 1))
            labels[row, prompt:end] = ids[row, prompt:end]
            ids[row, end:] = 0
    labels[0, 1] = ids[0, 1]        # the prompt prefix stays identical between the two rows
    labels[pairs, 1] = ids[pairs, 1]
    return ids, labels
