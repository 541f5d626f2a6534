"""The corpus pipeline: whatever files the user has, turned into training sequences, with an exact account of
what was used and what was not.

    corpus = load_corpus(["chats.jsonl", "notes.txt"], tokenizer, CorpusConfig(seq_len=512, packing=True),
                         progress=lambda done, total: ..., cancel=lambda: False)
    corpus.stats.format_text()          # per file: formats, records, tokens, trained tokens, skipped lines
    corpus.stats.to_dict()              # the same as JSON-ready data (the CLI's --json)
    corpus.preview(0)                   # [(text, trained), ...] of train sequence 0, for the GUI
    steps = batch_count(len(corpus.train), 8)
    for input_ids, labels in corpus.batches(8, epoch=e, start_batch=b):   # [B, T] int32, -100 = not trained
        ...                             # (e, b) is the exact data position to resume from

`tokenizer` is a transformers tokenizer (`load_tokenizer(folder)` loads one) or a model folder.

Modules, in the order data flows: `textstream` (bytes -> text: encodings, binary refusal, CRLF, bounded lines),
`readers` (text -> raw records per container), `formats` (record -> Example), `render` (Example -> ids and
labels with the model's chat template and prompt masking), `sequences` (windows, truncation, packing,
validation split, batches), `stats`, and `loader` which drives them. Preference pairs (DPO/ORPO) take `pairs`
(record -> chosen/rejected Examples, the shared-prompt check) and `preferences` (load_preferences) instead of
`formats` and `loader`. Nothing here imports Qt.
"""
from engine.corpus.config import CorpusConfig
from engine.corpus.formats import FORMATS, Example, RecordError
from engine.corpus.loader import Corpus, CorpusCancelled, load_corpus
from engine.corpus.readers import CONTAINERS
from engine.backends.base import IGNORE_LABEL
from engine.corpus.render import DEFAULT_CHAT_TEMPLATE, CorpusTokenizer, chat_template_of, load_tokenizer
from engine.corpus.sequences import Segment, Sequence, batch_count, batch_order, batches
from engine.corpus.stats import CorpusStats, FileStats, SkippedRecord, SplitStats
from engine.corpus.textstream import RefusedFile

__all__ = ["CONTAINERS", "DEFAULT_CHAT_TEMPLATE", "FORMATS", "IGNORE_LABEL", "Corpus", "CorpusCancelled",
           "chat_template_of", "CorpusConfig", "CorpusStats", "CorpusTokenizer", "Example", "FileStats", "RecordError", "RefusedFile",
           "Segment", "Sequence", "SkippedRecord", "SplitStats", "batch_count", "batch_order", "batches",
           "load_corpus", "load_tokenizer"]
