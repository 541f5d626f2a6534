"""`CorpusConfig`: every knob of the corpus pipeline, validated once when it is built."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class CorpusConfig:
    seq_len: int = field(default=512, metadata={
        "help": "tokens per training sequence (truncate / window / pack to this)"})
    mask_prompt: bool | None = field(default=None, metadata={
        "help": "train only on assistant/completion tokens. None: on for chat, prompt/completion and alpaca "
                "records, off for raw text; False: train on every token. Pre-tokenized records keep their labels."})
    packing: bool = field(default=False, metadata={
        "help": "pack several examples into one sequence (EOS between them) instead of one example per sequence"})
    val_fraction: float = field(default=0.0, metadata={
        "help": "fraction of examples (text windows for raw text) held out for validation, chosen with `seed`"})
    val_files: tuple[Path, ...] = field(default=(), metadata={
        "help": "files used only for validation (instead of val_fraction)"})
    seed: int = field(default=0, metadata={"help": "seed of the validation split"})
    max_line_bytes: int = field(default=16 * MIB, metadata={
        "help": "longest line (JSONL/CSV/text) or JSON array element accepted, in UTF-8 bytes; longer ones are "
                "skipped and reported, so a hostile file cannot exhaust memory"})
    max_json_depth: int = field(default=64, metadata={
        "help": "deepest JSON nesting accepted in a record; deeper records are skipped before parsing"})
    max_skipped_listed: int = field(default=10_000, metadata={
        "help": "skipped records listed per file (all are counted); bounds memory on a file of garbage"})
    read_chunk_bytes: int = field(default=1 * MIB, metadata={
        "help": "bytes read per step; progress is reported per chunk"})

    def __post_init__(self):
        def need_int(name, lo, hi=None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"corpus {name} must be an integer, got {value!r}")
            if value < lo or (hi is not None and value > hi):
                limit = f">= {lo}" if hi is None else f"between {lo} and {hi}"
                raise ValueError(f"corpus {name} must be {limit}, got {value}")

        need_int("seq_len", 2, 1 << 20)
        need_int("seed", 0)
        need_int("max_line_bytes", 64)
        need_int("max_json_depth", 2, 10_000)
        need_int("max_skipped_listed", 0)
        need_int("read_chunk_bytes", 16)
        if self.mask_prompt not in (None, True, False):
            raise ValueError(f"corpus mask_prompt must be True, False or None (per-format default), "
                             f"got {self.mask_prompt!r}")
        if not isinstance(self.packing, bool):
            raise ValueError(f"corpus packing must be True or False, got {self.packing!r}")
        fraction = self.val_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise ValueError(f"corpus val_fraction must be a number in [0, 1), got {fraction!r}")
        if isinstance(self.val_files, (str, Path)):
            raise ValueError(f"corpus val_files must be a list of paths, got the single path {self.val_files!r}")
        object.__setattr__(self, "val_files", tuple(Path(p) for p in self.val_files))
        if self.val_files and fraction > 0:
            raise ValueError(f"choose either val_fraction ({fraction}) or val_files ({len(self.val_files)} file(s)), "
                             "not both")
