"""The perplexity loop of Hugging Face's guide (https://huggingface.co/docs/transformers/perplexity), on a
transformers/PEFT model, with the exact count of scored tokens in place of the guide's `valid - batch`."""
from __future__ import annotations

import math

import numpy as np


def hf_guide_perplexity(model, ids: np.ndarray, labels: np.ndarray, max_length: int, stride: int) -> tuple[float, int]:
    import torch

    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    seq_len = len(ids)
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = torch.from_numpy(ids[begin_loc:end_loc].astype(np.int64))[None]
        target_ids = torch.from_numpy(labels[begin_loc:end_loc].astype(np.int64))[None].clone()
        target_ids[:, :-trg_len] = -100
        counted = int((target_ids[:, 1:] != -100).sum())
        if counted:
            with torch.no_grad():
                loss = model(input_ids, labels=target_ids).loss
            nll_sum += float(loss) * counted
            n_tokens += counted
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens
