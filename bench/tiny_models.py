"""Tiny, seeded, hub-free models and tokenizer that tests and benchmarks build from transformers configs.

Sizes are deliberately awkward (hidden sizes not multiples of 64, GQA ratio 3, odd MLP widths) so kernels
that assume tidy shapes fail here rather than on a user's model.
"""
from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# A few paragraphs to learn BPE merges from: enough that ordinary English becomes multi-byte tokens.
_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. What is the capital of France? The capital of France is Paris.
LoRA adapters add a low rank update to the frozen weights of a language model. Training only the adapter
needs far less memory than training the whole model. A user asks a question and the assistant answers it.
The loss falls as the model learns the corpus. Hello world! How are you today? I am fine, thank you.
Instruction: summarise the text. Input: the cat sat on the mat. Output: a cat sat on a mat.
""" * 4

# Each architecture as its transformers config: small, seeded, with the features the engine must honour.
TINY_CONFIGS = {
    # GQA ratio 3, head_dim 24, tied embeddings like SmolLM2.
    "llama": dict(model_type="llama", hidden_size=72, intermediate_size=136, num_hidden_layers=2,
                  num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=256, tie_word_embeddings=True),
    # q/k/v biases, untied LM head.
    "qwen2": dict(model_type="qwen2", hidden_size=80, intermediate_size=152, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  max_position_embeddings=256, tie_word_embeddings=False),
    # q_norm/k_norm and an explicit head_dim that is not hidden/heads.
    "qwen3": dict(model_type="qwen3", hidden_size=88, intermediate_size=120, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, max_position_embeddings=256, tie_word_embeddings=True),
    # Gemma 3 text (Gemma-3-270M's layout): (1+w) norms (randomised, RANDOM_NORMS), four per layer, GeGLU,
    # sqrt(hidden) embedding scale, query_pre_attn_scalar != head_dim, q/k norms, a global layer between two
    # sliding ones with their own rope thetas. The window (16) is longer than the test sequences.
    "gemma3": dict(model_type="gemma3_text", hidden_size=76, intermediate_size=124, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=20, query_pre_attn_scalar=28,
                   rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=16,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   max_position_embeddings=256, tie_word_embeddings=True),
    # Gemma 2: Gemma 3's layout without q/k norms and with one rope, plus attention-logit and final-logit
    # soft-capping, caps low enough that tanh bends the tiny model's scores and logits; sliding layers 0 and 2
    # (Gemma2Config's default alternation) with a window (4) shorter than the test sequences.
    "gemma2": dict(model_type="gemma2", hidden_size=68, intermediate_size=116, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=20, query_pre_attn_scalar=24,
                   rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4, attn_logit_softcapping=1.5,
                   final_logit_softcapping=2.5, max_position_embeddings=256, tie_word_embeddings=True),
    # Granite: Llama with embedding, attention, residual and logits multipliers, none of them 1.
    "granite": dict(model_type="granite", hidden_size=80, intermediate_size=140, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                    embedding_multiplier=3.5, attention_multiplier=0.11, residual_multiplier=0.22,
                    logits_scaling=2.5, max_position_embeddings=256, tie_word_embeddings=True),
    # OLMo 2: no pre-norms, norms after the attention and MLP outputs, q/k norms over the whole projection
    # width (randomised, RANDOM_NORMS), untied head.
    "olmo2": dict(model_type="olmo2", hidden_size=72, intermediate_size=116, num_hidden_layers=2,
                  num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=500000.0,
                  max_position_embeddings=256, tie_word_embeddings=False),
    # SmolLM3: Llama with layer 1 of 3 (its no_rope_layers 0) attending without rotary embeddings.
    "smollm3": dict(model_type="smollm3", hidden_size=64, intermediate_size=132, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=5000000.0,
                    no_rope_layers=[1, 0, 1], max_position_embeddings=256, tie_word_embeddings=True),
    # Phi-3 (Phi-3-mini's layout): fused qkv_proj [q | k | v] and gate_up_proj [gate | up], GQA ratio 3, untied
    # head, randomised norms, and a sliding window (4) shorter than the test sequences (Phi-3-mini-4k's 2047).
    "phi3": dict(model_type="phi3", hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                 num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=10000.0,
                 sliding_window=4, max_position_embeddings=256, original_max_position_embeddings=256,
                 tie_word_embeddings=False),
    # Phi-4-mini's layout: RoPE on 18 of each head's 24 dims (partial_rotary_factor 0.75) with longrope, whose
    # factors (one per rotary pair) switch to the long ones past original_max_position_embeddings (5, below the
    # test sequences' 7), and a tied head.
    "phi4mini": dict(model_type="phi3", hidden_size=72, intermediate_size=116, num_hidden_layers=2,
                     num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-5, partial_rotary_factor=0.75,
                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                      "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8, 4.6],
                                      "long_factor": [1.2, 1.9, 2.7, 3.9, 5.5, 7.4, 9.9, 13.0, 17.0]},
                     original_max_position_embeddings=5, max_position_embeddings=64, tie_word_embeddings=True),
}
# The architectures every architecture-generic test runs on; Gemma 3 runs in the tests of its own quirks
# (tests/model/test_gemma3.py) and where a test names it.
ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Models whose norms transformers initialises to zero weights (Gemma's (1+w)): randomised, so a norm that
# ignores its weight or its offset fails.
RANDOM_NORMS = ("gemma2", "gemma3", "olmo2", "phi3", "phi4mini")


def make_tokenizer(out_dir: Path, vocab_size: int = 384):
    """Train a byte-level BPE on a fixed text (deterministic), with ChatML specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TRAINING_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def make_model(arch: str, out_dir: Path, seed: int = 0, **overrides):
    """Build a seeded random model of `arch`, save it (config, safetensors, tokenizer) and return it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer(out_dir)
    spec = dict(TINY_CONFIGS[arch], **overrides)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                                  initializer_range=0.1, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.eval()
    if arch in RANDOM_NORMS:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.randn(p.shape) * 0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def model_summary(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())
