"""What was used and what was not: per-file and corpus statistics, as a dict (JSON) and as text (CLI).

Tokens are counted with the model's real tokenizer after truncation, exactly as they enter the sequences;
trainable tokens are those whose label is not -100 (the loss uses each of them except one that opens a
sequence, which nothing precedes). Packing separators are counted in the split totals only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class SkippedRecord:
    line: int
    reason: str


@dataclass
class FileStats:
    path: str
    split: str = "train"                 # "train", or "val" for a file given in val_files
    container: str = ""                  # text | jsonl | json | csv
    encoding: str = ""
    bytes: int = 0
    formats: dict[str, int] = field(default_factory=dict)   # records used, per detected format
    records: int = 0                     # records used (a raw text file is one record)
    tokens: int = 0
    trainable_tokens: int = 0
    truncated_records: int = 0           # cut to seq_len (raw text is windowed instead, never cut)
    truncated_tokens: int = 0            # tokens cut off and not trained on
    skipped_count: int = 0               # every skipped record; `skipped` lists the first max_skipped_listed
    skipped: list[SkippedRecord] = field(default_factory=list)
    refused: str | None = None           # set when the whole file was refused: nothing of it is used
    skipped_limit: int = field(default=10_000, repr=False)

    def skip(self, line: int, reason: str):
        self.skipped_count += 1
        if len(self.skipped) < self.skipped_limit:
            self.skipped.append(SkippedRecord(line, reason))

    def refuse(self, reason: str):
        """Forget what was read: a refused file contributes nothing."""
        self.refused = reason
        self.formats, self.records, self.tokens, self.trainable_tokens = {}, 0, 0, 0
        self.truncated_records = self.truncated_tokens = self.skipped_count = 0
        self.skipped = []

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("skipped_limit")
        out["skipped"] = [{"line": s.line, "reason": s.reason} for s in self.skipped]
        return out


@dataclass
class SplitStats:
    sequences: int = 0
    tokens: int = 0                      # including packing separators
    trainable_tokens: int = 0
    fill: float = 0.0                    # tokens / (sequences * seq_len): how much of each sequence is not padding


@dataclass
class CorpusStats:
    files: list[FileStats]
    seq_len: int
    packing: bool
    train: SplitStats = field(default_factory=SplitStats)
    val: SplitStats = field(default_factory=SplitStats)
    notes: list[str] = field(default_factory=list)   # corpus-level remarks (e.g. too few examples to split)

    @property
    def totals(self) -> dict:
        files = self.files
        return {"files": len(files), "refused_files": sum(f.refused is not None for f in files),
                "records": sum(f.records for f in files), "tokens": sum(f.tokens for f in files),
                "trainable_tokens": sum(f.trainable_tokens for f in files),
                "truncated_records": sum(f.truncated_records for f in files),
                "truncated_tokens": sum(f.truncated_tokens for f in files),
                "skipped": sum(f.skipped_count for f in files)}

    def to_dict(self) -> dict:
        return {"seq_len": self.seq_len, "packing": self.packing, "totals": self.totals,
                "train": asdict(self.train), "val": asdict(self.val), "notes": list(self.notes),
                "files": [f.to_dict() for f in self.files]}

    def format_text(self) -> str:
        t = self.totals
        lines = [f"corpus: {t['files']} file(s), {t['records']:,} records, {t['tokens']:,} tokens, "
                 f"{t['trainable_tokens']:,} trained, {t['skipped']:,} skipped, {t['refused_files']} file(s) refused"]
        for f in self.files:
            head = f"{f.path} [{f.split}]"
            if f.refused is not None:
                lines.append(f"  {head}: REFUSED: {f.refused}")
                continue
            formats = ", ".join(f"{k} {v:,}" for k, v in sorted(f.formats.items())) or "no usable records"
            lines.append(f"  {head}: {f.container}, {f.encoding}, {formats}; {f.records:,} records, "
                         f"{f.tokens:,} tokens, {f.trainable_tokens:,} trained, {f.skipped_count:,} skipped")
            if f.truncated_records:
                lines.append(f"    {f.truncated_records:,} record(s) cut to {self.seq_len} tokens, "
                             f"{f.truncated_tokens:,} tokens dropped")
            for s in f.skipped:
                lines.append(f"    line {s.line}: {s.reason}")
            if f.skipped_count > len(f.skipped):
                lines.append(f"    ... and {f.skipped_count - len(f.skipped):,} more skipped records")
        for name, s in (("train", self.train), ("val", self.val)):
            lines.append(f"{name}: {s.sequences:,} sequences of up to {self.seq_len} tokens"
                         f"{' (packed)' if self.packing else ''}, {s.tokens:,} tokens, {s.trainable_tokens:,} "
                         f"trained, {100 * s.fill:.1f}% filled")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
