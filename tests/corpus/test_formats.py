"""Each record format to token ids and label masks with the fixture tokenizer (ChatML template, eos <|im_end|>).

Three independent checks per format: literal golden ids/labels (regressions), the hand-written text pieces
tokenized one by one (what should be trained, written as text), and for chats TRL's completion-only masking."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from engine.corpus import DEFAULT_CHAT_TEMPLATE, CorpusConfig, load_corpus
from tests.corpus_helpers import IGNORE, expected_from_pieces, seq_lists, write_jsonl

SYSTEM_CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello world!"}]}
MULTI_TURN = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "How are you?"},
                                {"from": "gpt", "value": "I am fine."}]}
ALPACA = {"instruction": "summarise the text.", "input": "the cat sat on the mat.", "output": "a cat sat.",
          "system": "Be brief."}
PROMPT_COMPLETION = {"prompt": "What is the capital of France?", "completion": " Paris."}
TEXT = {"text": "The quick brown fox."}

# Records: the text pieces that must come out, trained (True) or masked (False).
CASES = {
    "openai": (SYSTEM_CHAT, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello world!<|im_end|>\n", True)], False),
    "sharegpt": (MULTI_TURN, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello<|im_end|>\n", True),
        ("<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n", False),
        ("I am fine.<|im_end|>\n", True)], False),
    "alpaca": (ALPACA, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nsummarise the text.\n\nthe cat sat on the "
         "mat.<|im_end|>\n<|im_start|>assistant\n", False),
        ("a cat sat.<|im_end|>\n", True)], False),
    "prompt_completion": (PROMPT_COMPLETION, [("What is the capital of France?", False), (" Paris.", True)], True),
    "text": (TEXT, [("The quick brown fox.", True)], True),
}

# Literal ids produced with the fixture tokenizer and the [start, end) ranges of trained tokens (the rest -100).
# Checked against CASES by the first test, so a change here is a change in what the model sees.
_HEADER = [1, 86, 92, 86, 87, 348, 202, 37, 72, 224, 340, 76, 72, 73, 17, 2, 202, 1, 88, 375, 202]  # system + user
GOLDEN = {
    "openai": (_HEADER + [43, 76, 2, 202, 1, 68, 286, 271, 377, 87, 202, 43, 276, 360, 288, 282, 358, 4, 2, 202],
               [(32, 41)]),
    "sharegpt": (_HEADER + [43, 76, 2, 202, 1, 68, 286, 271, 377, 87, 202, 43, 276, 360, 2, 202, 1, 88, 375, 202,
                            43, 283, 261, 372, 312, 34, 2, 202, 1, 68, 286, 271, 377, 87, 202, 44, 261, 80, 273, 270,
                            72, 17, 2, 202], [(32, 37), (56, 65)]),
    "alpaca": (_HEADER + [86, 304, 363, 72, 263, 260, 351, 87, 17, 202, 202, 87, 262, 318, 324, 291, 263, 316, 17, 2,
                          202, 1, 68, 286, 271, 377, 87, 202, 68, 318, 324, 17, 2, 202], [(49, 55)]),
    "prompt_completion": ([336, 264, 309, 263, 329, 290, 328, 34, 224, 333, 17, 2], [(8, 12)]),
    "text": ([278, 311, 355, 224, 340, 283, 81, 273, 367, 17, 2], [(0, 11)]),
}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def load_one(tmp_path, tok, record, **config):
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    corpus = load_corpus([path], tok, CorpusConfig(**config))
    assert not corpus.stats.files[0].skipped, corpus.stats.files[0].skipped
    assert len(corpus.train) == 1
    return corpus


@pytest.mark.parametrize("fmt", list(CASES))
def test_format_ids_and_masks_match_the_hand_written_pieces(tmp_path, tok, fmt):
    record, pieces, eos = CASES[fmt]
    corpus = load_one(tmp_path, tok, record)
    assert seq_lists(corpus.train[0]) == expected_from_pieces(tok, pieces, eos)
    fs = corpus.stats.files[0]
    assert fs.formats == {fmt: 1} and fs.records == 1
    ids, labels = expected_from_pieces(tok, pieces, eos)
    assert fs.tokens == len(ids) and fs.trainable_tokens == sum(x != IGNORE for x in labels)


@pytest.mark.parametrize("fmt", list(GOLDEN))
def test_golden_literal_ids_and_masks(tmp_path, tok, fmt):
    ids, trained = GOLDEN[fmt]
    labels = [IGNORE] * len(ids)
    for a, b in trained:
        labels[a:b] = ids[a:b]
    assert seq_lists(load_one(tmp_path, tok, CASES[fmt][0]).train[0]) == (ids, labels)


def test_preview_shows_trained_and_masked_text(tmp_path, tok):
    corpus = load_one(tmp_path, tok, MULTI_TURN)
    assert corpus.preview(0) == [(t, f) for t, f in CASES["sharegpt"][1]]


def test_mask_switch_off_trains_every_token(tmp_path, tok):
    for fmt in ("openai", "sharegpt", "alpaca", "prompt_completion"):
        record, pieces, eos = CASES[fmt]
        corpus = load_one(tmp_path, tok, record, mask_prompt=False)
        ids, labels = seq_lists(corpus.train[0])
        assert ids == expected_from_pieces(tok, pieces, eos)[0]
        assert labels == ids


def test_pre_tokenized_records_are_used_exactly(tmp_path, tok):
    corpus = load_one(tmp_path, tok, {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8]})
    assert seq_lists(corpus.train[0]) == ([5, 6, 7, 8], [-100, 6, -100, 8])
    corpus = load_one(tmp_path, tok, {"input_ids": [5, 6, 7]})  # labels default to input_ids, no BOS/EOS
    assert seq_lists(corpus.train[0]) == ([5, 6, 7], [5, 6, 7])
    assert corpus.stats.files[0].formats == {"input_ids": 1}


def test_mixed_file_counts_each_format_and_lists_skipped_lines(tmp_path, tok):
    records = [SYSTEM_CHAT, "oops", TEXT, {"foo": 1}, PROMPT_COMPLETION, TEXT, {"text": 3},
               {"messages": [{"role": "user", "content": "only a question"}]},
               {"input_ids": [1, 10_000]}, {"input_ids": [1, 2], "labels": [-100, -100]},
               {"conversations": [{"from": "alien", "value": "x"}]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    with open(path, "a") as f:
        f.write("\n{not json}\n")
    fs = load_corpus([path], tok, CorpusConfig()).stats.files[0]
    assert fs.formats == {"openai": 1, "text": 2, "prompt_completion": 1}
    assert fs.records == 4
    reasons = {s.line: s.reason for s in fs.skipped}
    assert sorted(reasons) == [2, 4, 7, 8, 9, 10, 11, 13]  # line 12 is blank: ignored, not skipped
    assert "expected a JSON object" in reasons[2]
    assert "unknown record format (fields: foo)" in reasons[4]
    assert "'text' must be a string" in reasons[7]
    assert "no assistant turn" in reasons[8]
    assert "outside the tokenizer's vocabulary" in reasons[9]
    assert "every label is -100" in reasons[10]
    assert "unknown from 'alien'" in reasons[11]
    assert "not valid JSON" in reasons[13]
    assert fs.skipped_count == 8


def test_conversational_prompt_completion_trains_only_the_completion_turns(tmp_path, tok):
    record = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "How are you?"}],
              "completion": [{"role": "assistant", "content": "I am fine."}]}
    corpus = load_one(tmp_path, tok, record)
    assert seq_lists(corpus.train[0]) == expected_from_pieces(tok, [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nHow are "
         "you?<|im_end|>\n<|im_start|>assistant\n", False), ("I am fine.<|im_end|>\n", True)])


def test_model_without_template_gets_the_documented_default(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = None
    corpus = load_one(tmp_path, tok, MULTI_TURN)
    assert corpus.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE and not corpus.tokenizer.has_own_template
    assert seq_lists(corpus.train[0]) == expected_from_pieces(tok, [
        ("Be brief.\n\n### User:\nHi\n\n### Assistant:\n", False), ("Hello<|im_end|>\n\n", True),
        ("### User:\nHow are you?\n\n### Assistant:\n", False), ("I am fine.<|im_end|>\n\n", True)])


def test_bos_is_prepended_masked_to_text_and_completions(tmp_path, tiny_tokenizer_dir):
    from tokenizers import processors

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)  # made to add a BOS, like Llama's tokenizer
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                  special_tokens=[("<|endoftext|>", 0)])
    corpus = load_one(tmp_path, tok, PROMPT_COMPLETION)
    ids, labels = expected_from_pieces(tok, CASES["prompt_completion"][1], eos=True)
    assert seq_lists(corpus.train[0]) == ([0] + ids, [IGNORE] + labels)
    corpus = load_one(tmp_path, tok, SYSTEM_CHAT)  # the chat template owns the start of a chat: no BOS added
    assert seq_lists(corpus.train[0]) == expected_from_pieces(tok, CASES["openai"][1])


# --- TRL-style completion-only masking ------------------------------------------------------------------------
# TRL is not a dependency (TRL 1.16, the release that resolves here, needs datasets, accelerate, pandas and
# pyarrow, none installed), so this re-implements, for one example, the instruction-template branch of
# DataCollatorForCompletionOnlyLM.torch_call from trl 0.19.1 (trl/trainer/utils.py, its last release): find the
# response template's token ids, mask everything up to each response and from each instruction template on.

def trl_completion_only_labels(ids: list[int], response: list[int], instruction: list[int]) -> list[int]:
    labels = list(ids)
    response_idxs = [i + len(response) for i in range(len(ids)) if ids[i:i + len(response)] == response]
    human_idxs = [i for i in range(len(ids)) if ids[i:i + len(instruction)] == instruction]
    if not response_idxs or not human_idxs:
        return [IGNORE] * len(ids)
    if human_idxs[0] > response_idxs[0]:
        human_idxs = [0] + human_idxs
    for n, (start, end) in enumerate(zip(human_idxs, response_idxs)):
        if n:
            labels[start:end] = [IGNORE] * (end - start)
        else:
            labels[:end] = [IGNORE] * end
    if len(response_idxs) < len(human_idxs):
        labels[human_idxs[-1]:] = [IGNORE] * (len(ids) - human_idxs[-1])
    return labels


def trl_prompt_completion_labels(tok, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """TRL 1.x SFTTrainer for a non-conversational prompt/completion: EOS text appended to the completion, the
    completion starts where tokenize(prompt) and tokenize(prompt + completion) diverge."""
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(prompt + completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(prompt_ids), len(ids)) and prompt_ids[n] == ids[n]:
        n += 1
    return ids, [IGNORE] * n + ids[n:]


@pytest.mark.parametrize("record", [SYSTEM_CHAT, MULTI_TURN, ALPACA,
                                    {"messages": [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello"},
                                                  {"role": "user", "content": "What is the capital of France?"},
                                                  {"role": "assistant", "content": "Paris."},
                                                  {"role": "user", "content": "Thank you."}]}],
                         ids=["system", "multi-turn", "alpaca", "ends-with-user"])
def test_chat_masks_agree_with_trl_completion_only_collator(tmp_path, tok, record):
    response = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    instruction = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    ids, labels = seq_lists(load_one(tmp_path, tok, record).train[0])
    assert labels == trl_completion_only_labels(ids, response, instruction)
    assert any(x != IGNORE for x in labels)


def test_prompt_completion_masks_agree_with_trl(tmp_path, tok):
    for prompt, completion in [("What is the capital of France?", " Paris."),
                               ("Instruction: summarise the text.\nOutput:", " a cat sat on a mat.")]:
        corpus = load_one(tmp_path, tok, {"prompt": prompt, "completion": completion})
        assert seq_lists(corpus.train[0]) == trl_prompt_completion_labels(tok, prompt, completion)


# --- templates whose prefixes do not render consistently ------------------------------------------------------

COUNTING_TEMPLATE = (  # the header changes with the number of messages, so a prefix is not a prefix of the whole
    "{{ 'turns: ' + messages|length|string + '\n' }}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_inconsistent_template_falls_back_to_generation_blocks(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = COUNTING_TEMPLATE
    corpus = load_one(tmp_path, tok, MULTI_TURN)
    out = tok.apply_chat_template(corpus_messages(MULTI_TURN), return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = seq_lists(corpus.train[0])
    assert ids == list(out["input_ids"])
    assert labels == [i if m else IGNORE for i, m in zip(out["input_ids"], out["assistant_masks"])]
    assert corpus.preview(0)[1] == ("Hello<|im_end|>\n", True)


def test_inconsistent_template_without_generation_blocks_skips_with_reason(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = COUNTING_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    path = write_jsonl(tmp_path / "c.jsonl", [MULTI_TURN, TEXT])
    corpus = load_corpus([path], tok, CorpusConfig())
    fs = corpus.stats.files[0]
    assert [s.line for s in fs.skipped] == [1] and "{% generation %}" in fs.skipped[0].reason
    # Said in the user's terms first, with what to do (it used to be the template jargon alone).
    assert fs.skipped[0].reason.startswith("this model's chat format rewrites earlier turns")
    assert "split it into one conversation per answer" in fs.skipped[0].reason
    assert fs.formats == {"text": 1}
    unmasked = load_corpus([path], tok, CorpusConfig(mask_prompt=False))  # the advice in the reason works
    assert unmasked.stats.files[0].formats == {"sharegpt": 1, "text": 1}


def test_template_that_refuses_a_conversation_skips_it(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    path = write_jsonl(tmp_path / "c.jsonl", [SYSTEM_CHAT])
    fs = load_corpus([path], tok, CorpusConfig()).stats.files[0]
    assert fs.records == 0 and "System role not supported" in fs.skipped[0].reason


def test_json_array_and_csv_give_the_same_examples_as_jsonl(tmp_path, tok):
    records = [PROMPT_COMPLETION, TEXT, {"prompt": "Hello, \"world\"\nagain", "completion": " ok"}]
    jsonl = load_corpus([write_jsonl(tmp_path / "a.jsonl", records)], tok, CorpusConfig())
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    as_json = load_corpus([tmp_path / "a.json"], tok, CorpusConfig())
    (tmp_path / "pc.csv").write_text('prompt,completion,extra\n"What is the capital of France?"," Paris.",1\n'
                                     '"Hello, ""world""\nagain", ok,2\n', encoding="utf-8")
    as_csv = load_corpus([tmp_path / "pc.csv"], tok, CorpusConfig())
    (tmp_path / "t.csv").write_text("id,text\n1,The quick brown fox.\n", encoding="utf-8")
    text_csv = load_corpus([tmp_path / "t.csv"], tok, CorpusConfig())
    want = [seq_lists(s) for s in jsonl.train]
    assert [seq_lists(s) for s in as_json.train] == want
    assert [seq_lists(s) for s in as_csv.train] == [want[0], want[2]]
    assert [seq_lists(s) for s in text_csv.train] == [want[1]]
    assert [s.segments[0].line for s in as_json.train] == [2, 6, 9]
    assert [s.segments[0].line for s in as_csv.train] == [2, 3]
    assert as_csv.stats.files[0].container == "csv" and as_json.stats.files[0].formats == {
        "prompt_completion": 2, "text": 1}


QWEN3_LIKE_TEMPLATE = (  # like Qwen3: only the latest assistant turn carries an (empty) <think></think> block
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_that_rewrites_earlier_turns_still_masks_every_assistant_turn(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = QWEN3_LIKE_TEMPLATE
    corpus = load_one(tmp_path, tok, MULTI_TURN)
    assert corpus.preview(0) == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello<|im_end|>\n", True),
        ("<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\n\n</think>\n\nI am fine.<|im_end|>\n", True)]
    ids, labels = seq_lists(corpus.train[0])
    assert ids == tok(corpus.tokenizer.render(corpus_messages(MULTI_TURN)), add_special_tokens=False)["input_ids"]


def corpus_messages(sharegpt: dict) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": roles[m["from"]], "content": m["value"]} for m in sharegpt["conversations"]]


def test_openai_roles_are_case_insensitive_and_developer_is_system(tmp_path, tok):
    record = {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "User", "content": "Hi"},
                           {"role": "assistant", "content": [{"type": "text", "text": "Hello "},
                                                             {"type": "text", "text": "world!"}]}]}
    corpus = load_one(tmp_path, tok, record)
    assert seq_lists(corpus.train[0]) == expected_from_pieces(tok, CASES["openai"][1])
