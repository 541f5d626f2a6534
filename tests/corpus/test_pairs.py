"""Preference pairs: each pair format to chosen/rejected ids and completion masks with the fixture tokenizer
(ChatML template, eos <|im_end|>), checked against hand-written text pieces; located refusals of bad pairs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from engine.backends.base import IGNORE_LABEL
from engine.corpus import CorpusConfig, load_corpus
from engine.corpus.preferences import load_preferences
from tests.corpus_helpers import expected_from_pieces, write_jsonl

USER = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
SYSTEM = "<|im_start|>system\nBe brief.<|im_end|>\n"
CHOSEN, REJECTED = ("Hello world!<|im_end|>\n", True), ("Go away.<|im_end|>\n", True)

# record -> (format, prompt pieces, chosen pieces, rejected pieces, append eos)
CASES = {
    "explicit_messages": ({"prompt": [{"role": "user", "content": "Hi"}],
                           "chosen": [{"role": "assistant", "content": "Hello world!"}],
                           "rejected": [{"role": "assistant", "content": "Go away."}]},
                          "pair_explicit", [(USER, False)], [CHOSEN], [REJECTED], False),
    "explicit_strings": ({"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Rome."},
                         "pair_explicit", [("What is the capital of France?", False)], [(" Paris.", True)],
                         [(" Rome.", True)], True),
    "implicit": ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello world!"}],
                  "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
                 "pair_implicit", [(USER, False)], [CHOSEN], [REJECTED], False),
    "alpaca_ranking": ({"instruction": "Hi", "input": "", "system": "Be brief.", "chosen": "Hello world!",
                        "rejected": "Go away."}, "pair_alpaca", [(SYSTEM + USER, False)], [CHOSEN], [REJECTED],
                       False),
    "sharegpt_ranking": ({"conversations": [{"from": "human", "value": "Hi"}],
                          "chosen": {"from": "gpt", "value": "Hello world!"},
                          "rejected": {"from": "gpt", "value": "Go away."}},
                         "pair_sharegpt", [(USER, False)], [CHOSEN], [REJECTED], False),
}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.parametrize("case", list(CASES))
def test_pair_formats_give_the_hand_written_rows(tmp_path, tok, case):
    record, fmt, prompt, chosen, rejected, eos = CASES[case]
    prefs = load_preferences([write_jsonl(tmp_path / "p.jsonl", [record])], tok)
    fs = prefs.stats.files[0]
    assert not fs.skipped, fs.skipped
    assert fs.formats == {fmt: 1} and len(prefs.train) == 1
    pair = prefs.train[0]
    for ids, labels, answer in ((pair.chosen_ids, pair.chosen_labels, chosen),
                                (pair.rejected_ids, pair.rejected_labels, rejected)):
        want_ids, want_labels = expected_from_pieces(tok, prompt + answer, eos)
        assert ids.tolist() == want_ids and labels.tolist() == want_labels
    prompt_ids, _ = expected_from_pieces(tok, prompt)
    assert pair.prompt_tokens == len(prompt_ids)
    assert fs.trainable_tokens == int(np.sum(pair.chosen_labels != IGNORE_LABEL) +
                                      np.sum(pair.rejected_labels != IGNORE_LABEL))


def test_multi_turn_prompt_trains_only_the_final_answers(tmp_path, tok):
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "How are you?"}]
    record = {"prompt": convo, "chosen": [{"role": "assistant", "content": "I am fine."}],
              "rejected": [{"role": "assistant", "content": "No."}]}
    pair = load_preferences([write_jsonl(tmp_path / "p.jsonl", [record])], tok).train[0]
    head = USER + "Hello<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
    ids, labels = expected_from_pieces(tok, [(head, False), ("I am fine.<|im_end|>\n", True)])
    assert pair.chosen_ids.tolist() == ids and pair.chosen_labels.tolist() == labels


def test_batches_put_chosen_rows_first_and_pad(tmp_path, tok):
    records = [CASES["explicit_messages"][0], CASES["implicit"][0], CASES["sharegpt_ranking"][0]]
    prefs = load_preferences([write_jsonl(tmp_path / "p.jsonl", records)], tok, CorpusConfig(seq_len=40))
    got = list(prefs.batches(2, shuffle=False))
    assert len(got) == 2 and all(ids.shape == (4, 40) for ids, _ in got)
    ids, labels = got[1]
    p = prefs.train[2]
    assert ids[0, :len(p.chosen_ids)].tolist() == p.chosen_ids.tolist()
    assert ids[2, :len(p.rejected_ids)].tolist() == p.rejected_ids.tolist()
    assert (labels[[1, 3]] == IGNORE_LABEL).all()           # the filler pair counts for nothing


BAD = [
    ({"prompt": "Q?", "chosen": " A."}, "'rejected' is missing"),
    ({"prompt": "Q?", "chosen": " A.", "rejected": " A."}, "identical"),
    ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}],
      "rejected": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "B"}]}, "no leading message"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "A"}],
      "rejected": [{"role": "assistant", "content": "B"}]}, "assistant's answer"),
    ({"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt"},
      "rejected": {"from": "gpt", "value": "B"}}, "chosen[0] must be an object"),
]


def test_bad_pairs_are_skipped_with_their_line_and_reason(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CASES["implicit"][0]) + "\n" + "".join(json.dumps(r) + "\n" for r, _ in BAD)
                    + "[1]\n", encoding="utf-8")
    prefs = load_preferences([path], tok)
    fs = prefs.stats.files[0]
    assert len(prefs.train) == 1 and fs.skipped_count == len(BAD) + 1
    for skipped, (_, reason) in zip(fs.skipped, BAD):
        assert reason in skipped.reason, (skipped, reason)
    assert [s.line for s in fs.skipped] == list(range(2, len(BAD) + 3))
    assert "not a preference pair" in fs.skipped[-1].reason


def test_a_template_that_rewrites_the_prompt_per_answer_is_refused(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # The user turn is rendered with the answer's length, so the prompt is not the same before both answers.
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}U{{ messages[-1]['content'] | length }}"
                         ": {{ m['content'] }}\n{% else %}A: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    record = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Yes."}],
              "rejected": [{"role": "assistant", "content": "No, never."}]}
    prefs = load_preferences([write_jsonl(tmp_path / "p.jsonl", [record])], tok)
    assert not prefs.train
    assert "rewrites earlier turns" in prefs.stats.files[0].skipped[0].reason


def test_strings_whose_answer_merges_with_the_prompt_are_refused_token_by_token(tmp_path, tok):
    # "The ca" + "t sat." tokenizes "cat" as one token spanning the boundary: the prompt's tokens before the
    # chosen answer are not those before the rejected one (" dog.").
    assert tok("The cat sat.", add_special_tokens=False)["input_ids"][:3] != \
        tok("The ca", add_special_tokens=False)["input_ids"]
    record = {"prompt": "The ca", "chosen": "t sat.", "rejected": " dog."}
    prefs = load_preferences([write_jsonl(tmp_path / "p.jsonl", [record])], tok)
    assert not prefs.train
    reason = prefs.stats.files[0].skipped[0].reason
    assert "prompt renders differently before chosen" in reason and "first difference at token" in reason


def test_validation_split_and_truncation_are_counted(tmp_path, tok):
    records = [{"prompt": f"Question {i}?", "chosen": " Yes" * 30, "rejected": " No."} for i in range(6)]
    prefs = load_preferences([write_jsonl(tmp_path / "p.jsonl", records)], tok,
                             CorpusConfig(seq_len=24, val_fraction=0.34, seed=3))
    assert len(prefs.train) == 4 and len(prefs.val) == 2
    fs = prefs.stats.files[0]
    assert fs.truncated_records == 6 and all(len(p.chosen_ids) == 24 for p in prefs.train + prefs.val)
    assert prefs.stats.train.sequences == 8
    same = [{"prompt": "Question?", "chosen": " Yes" * 30 + " indeed.", "rejected": " Yes" * 30 + " no."}]
    prefs = load_preferences([write_jsonl(tmp_path / "same.jsonl", same)], tok, CorpusConfig(seq_len=24))
    assert not prefs.train and "the same after cutting to seq_len 24" in prefs.stats.files[0].skipped[0].reason


def test_the_sft_corpus_points_pairs_to_the_preference_objectives(tmp_path, tok):
    corpus = load_corpus([write_jsonl(tmp_path / "p.jsonl", [CASES["implicit"][0]])], tok)
    assert not corpus.train and "objective dpo or orpo" in corpus.stats.files[0].skipped[0].reason


def test_packing_is_refused(tmp_path, tok):
    with pytest.raises(ValueError, match="packing"):
        load_preferences([write_jsonl(tmp_path / "p.jsonl", [CASES["implicit"][0]])], tok, CorpusConfig(packing=True))
