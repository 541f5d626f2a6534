"""Corpus loading throughput: a generated JSONL of mixed chats, completions and texts, read with the fixture
tokenizer. Prints JSON: machine, versions, MB/s, records/s, tokens/s and peak RSS growth.

    python bench/corpus_throughput.py [--mb 50] [--packing]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.corpus import CorpusConfig, load_corpus  # noqa: E402
from bench.tiny_models import make_tokenizer  # noqa: E402

RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of "
                  "France?"}, {"role": "assistant", "content": "The capital of France is Paris."},
                  {"role": "user", "content": "Thank you."},
                  {"role": "assistant", "content": "I am fine, thank you."}]},
    {"prompt": "Instruction: summarise the text. Input: the cat sat on the mat.", "completion": " a cat sat on a mat."},
    {"text": "LoRA adapters add a low rank update to the frozen weights of a language model. " * 8},
    {"instruction": "summarise the text.", "input": "The loss falls as the model learns the corpus.",
     "output": "The model learns."},
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=50)
    parser.add_argument("--packing", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(Path(tmp) / "tok")
        path = Path(tmp) / "corpus.jsonl"
        lines = [json.dumps(r) + "\n" for r in RECORDS]
        with open(path, "w") as f:
            written = 0
            while written < args.mb * 1e6:
                for line in lines:
                    f.write(line)
                    written += len(line)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        corpus = load_corpus([path], tok, CorpusConfig(seq_len=512, packing=args.packing))
        seconds = time.perf_counter() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = corpus.stats.totals
        import tokenizers
        import transformers
        print(json.dumps({
            "bench": "corpus_throughput", "machine": platform.platform(), "cpu": platform.processor(),
            "python": platform.python_version(), "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "file_mb": round(path.stat().st_size / 1e6, 1),
            "packing": args.packing, "seconds": round(seconds, 2),
            "mb_per_s": round(path.stat().st_size / 1e6 / seconds, 2), "records_per_s": round(t["records"] / seconds),
            "tokens_per_s": round(t["tokens"] / seconds), "records": t["records"], "tokens": t["tokens"],
            "trainable_tokens": t["trainable_tokens"], "train_sequences": len(corpus.train),
            "peak_rss_growth_mb": round((rss1 - rss0) / 1024, 1)}, indent=2))


if __name__ == "__main__":
    main()
