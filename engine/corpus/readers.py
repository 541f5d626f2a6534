"""From a decoded text stream to raw records: JSONL lines, the elements of a JSON array, CSV rows, text blocks.

Every reader is a generator over a `TextStream`, so a 1 GB file is never held in memory. A record that cannot
be parsed becomes a `RawRecord` with an `error` (reported as skipped, with its line); a problem that makes the
whole file unusable raises `RefusedFile`. JSON nesting is measured before `json.loads` sees the text, so a
hostile `[[[[...` neither exhausts the stack nor allocates a deep structure.
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.corpus.textstream import RefusedFile, TextStream

CONTAINERS = {".txt": "text", ".md": "text", ".markdown": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".json": "json", ".csv": "csv"}

_NON_SPACE = re.compile(r"\S")
_IN_STRING = re.compile(r'["\\]')
_STRUCTURE = re.compile(r'[\[\]{}",]')
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class RawRecord:
    line: int                  # 1-based line where the record starts
    value: object = None       # parsed JSON value, or {column: cell} for CSV
    error: str | None = None   # why it cannot be used (then value is None)


def container_of(path: Path) -> str:
    kind = CONTAINERS.get(Path(path).suffix.lower())
    if kind is None:
        raise RefusedFile(f"{path}: unsupported file type {Path(path).suffix or '(no extension)'!r}; "
                          f"use one of {', '.join(sorted(CONTAINERS))}")
    return kind


def too_long(limit: int) -> str:
    return f"longer than the limit of {limit} bytes (max_line_bytes); skipped unread"


def json_depth_exceeds(text: str, limit: int) -> bool:
    """True when brackets outside strings nest deeper than `limit`. Counting brackets first makes this free
    for ordinary records."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for m in _STRING_OR_BRACKET.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


def parse_json(text: str, max_depth: int) -> tuple[object, str | None]:
    if json_depth_exceeds(text, max_depth):
        return None, f"JSON nested deeper than the limit of {max_depth} levels (max_json_depth)"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} (column {exc.colno})"
    except ValueError as exc:  # an integer of more than sys.int_max_str_digits digits
        return None, f"not usable JSON: {exc}"
    except RecursionError:  # unreachable with a sane max_json_depth; kept so no input can crash the loader
        return None, "JSON nested too deeply to parse"
    if _SURROGATE_ESCAPE.search(text):  # "\ud800" alone parses to a str that no tokenizer can encode
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, "holds an unpaired UTF-16 surrogate escape (like \\ud800), which is not text"
    return value, None


def read_jsonl(stream: TextStream, max_line_bytes: int, max_depth: int) -> Iterator[RawRecord]:
    for line in stream.lines(max_line_bytes):
        if line.text is None:
            yield RawRecord(line.number, error=f"line {too_long(max_line_bytes)}")
        elif line.text.strip():
            value, error = parse_json(line.text, max_depth)
            yield RawRecord(line.number, value, error)


def read_json_array(stream: TextStream, max_bytes: int, max_depth: int) -> Iterator[RawRecord]:
    splitter = JsonArraySplitter(stream.path, max_bytes, max_depth)
    for chunk in stream.chunks():
        yield from splitter.feed(chunk)
    yield from splitter.finish()


class JsonArraySplitter:
    """Splits a top-level JSON array fed in chunks into its elements, each parsed on its own.

    Tracks only strings, escapes and bracket depth (an int, not a stack); an element over `max_bytes` or deeper
    than `max_depth` stops being buffered and is reported, the scan carrying on to the next element."""

    def __init__(self, path: Path, max_bytes: int, max_depth: int):
        self.path, self.max_bytes, self.max_depth = path, max_bytes, max_depth
        self.state = "start"          # start -> element_or_end -> in_element -> ... -> done
        self.line, self._counted = 1, 0
        self._reset_element(1)

    def _reset_element(self, line: int):
        self.elem_line, self.parts, self.size = line, [], 0
        self.depth, self.in_string, self.escape = 0, False, False
        self.too_long = self.too_deep = False

    def _line_at(self, chunk: str, pos: int) -> int:
        self.line += chunk.count("\n", self._counted, pos)
        self._counted = pos
        return self.line

    def _keep(self, piece: str):
        if self.too_long or self.too_deep:
            return
        self.size += len(piece)
        if self.size > self.max_bytes:
            self.too_long, self.parts = True, []
        else:
            self.parts.append(piece)

    def _emit(self) -> RawRecord:
        if self.too_long:
            return RawRecord(self.elem_line, error=f"record {too_long(self.max_bytes)}")
        if self.too_deep:
            return RawRecord(self.elem_line, error=f"JSON nested deeper than the limit of {self.max_depth} levels "
                                                   "(max_json_depth)")
        value, error = parse_json("".join(self.parts), self.max_depth)
        return RawRecord(self.elem_line, value, error)

    def feed(self, chunk: str) -> Iterator[RawRecord]:
        i, n = 0, len(chunk)
        self._counted = 0
        while i < n:
            if self.state in ("start", "element_or_end", "done"):
                m = _NON_SPACE.search(chunk, i)
                if m is None:
                    break
                i, c = m.start(), m.group()
                if self.state == "start":
                    if c != "[":
                        raise RefusedFile(f"{self.path}: line {self._line_at(chunk, i)}: a .json file must hold an "
                                          f"array of records [{{...}}, ...], found {c!r}; put one record per line "
                                          "in a .jsonl file instead")
                    self.state, i = "element_or_end", i + 1
                elif self.state == "done":
                    raise RefusedFile(f"{self.path}: line {self._line_at(chunk, i)}: unexpected {c!r} after the "
                                      "closing ] of the array")
                elif c == "]":
                    self.state, i = "done", i + 1
                else:
                    self._reset_element(self._line_at(chunk, i))
                    self.state, start = "in_element", i
                    i = yield from self._scan(chunk, i, start)
            else:
                i = yield from self._scan(chunk, i, 0)
        self._line_at(chunk, n)

    def _scan(self, chunk: str, i: int, start: int):
        """Scan inside an element from i; return the position after it, or len(chunk) when it continues."""
        n = len(chunk)
        while i < n:
            if self.in_string:
                if self.escape:
                    self.escape, i = False, i + 1
                    continue
                m = _IN_STRING.search(chunk, i)
                if m is None:
                    break
                if m.group() == "\\":
                    self.escape, i = True, m.start() + 1
                else:
                    self.in_string, i = False, m.start() + 1
                continue
            m = _STRUCTURE.search(chunk, i)
            if m is None:
                break
            c, at = m.group(), m.start()
            i = at + 1
            if c == '"':
                self.in_string = True
            elif c in "[{":
                self.depth += 1
                if self.depth > self.max_depth and not self.too_deep:
                    self.too_deep, self.parts = True, []
            elif c in "]}" and self.depth > 0:
                self.depth -= 1
            elif c in ",]" and self.depth == 0:  # the end of this element
                self._keep(chunk[start:at])
                yield self._emit()
                self.state = "element_or_end" if c == "," else "done"
                return i
        self._keep(chunk[start:n])
        return n

    def finish(self) -> Iterator[RawRecord]:
        if self.state == "start":
            raise RefusedFile(f"{self.path}: the file is empty; expected a JSON array of records")
        if self.state == "in_element":
            yield RawRecord(self.elem_line, error="the file ends inside this record (the JSON array is not closed)")
        elif self.state == "element_or_end":
            yield RawRecord(self.line, error="the file ends before the JSON array is closed with ]")


def read_csv(stream: TextStream, max_line_bytes: int) -> Iterator[RawRecord]:
    """Rows as {column: cell}. Needs a `text` column or `prompt` and `completion` columns (case-insensitive)."""
    # The limit is process-wide; raising it to ours is harmless to other users of the csv module.
    csv.field_size_limit(max(csv.field_size_limit(), max_line_bytes))
    long_lines: list[int] = []

    def source():
        for line in stream.lines(max_line_bytes):
            if line.text is None:
                long_lines.append(line.number)
                yield "\n"
            else:
                yield line.text + "\n"

    reader = csv.reader(source(), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise RefusedFile(f"{stream.path}: the CSV file is empty") from None
    except csv.Error as exc:
        raise RefusedFile(f"{stream.path}: line 1: cannot read the CSV header: {exc}") from None
    columns = [h.strip().lower() for h in header]
    if "text" not in columns and not {"prompt", "completion"} <= set(columns):
        raise RefusedFile(f"{stream.path}: the CSV needs a 'text' column or 'prompt' and 'completion' columns; "
                          f"its header is {', '.join(map(repr, header))}")
    # Only the columns that carry the data, so an extra column never changes how a row is read.
    keep = ["prompt", "completion"] if {"prompt", "completion"} <= set(columns) else ["text"]
    where = [columns.index(k) for k in keep]
    line = reader.line_num
    while True:
        start = line + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            line = reader.line_num
            yield RawRecord(start, error=f"CSV error: {exc}")
            continue
        line = reader.line_num
        if long_lines:  # the row held a line we dropped, so it is not what the file says: skip all of it
            yield RawRecord(start, error=f"line {long_lines[0]} {too_long(max_line_bytes)}")
            long_lines.clear()
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(columns):
            yield RawRecord(start, error=f"expected {len(columns)} fields as in the header, found {len(row)}")
            continue
        yield RawRecord(start, {k: row[i] for k, i in zip(keep, where)})


def read_text_blocks(stream: TextStream, max_line_bytes: int, block_chars: int = 1 << 16
                     ) -> Iterator[tuple[int, str | None]]:
    """A raw text file as (first line, text) blocks of about `block_chars`, ending in a newline; a too-long line
    comes as (line, None). Blocks end before a line that starts with a non-space character, where byte-level BPE
    pre-tokenizers split anyway, so tokenizing block by block gives the same ids as tokenizing the whole."""
    parts: list[str] = []
    size, first = 0, 1
    for line in stream.lines(max_line_bytes):
        if line.text is None:
            yield line.number, None
            continue
        # A text whose lines all start with spaces gets cut anyway at 16 blocks: bounded memory beats an exact
        # pre-tokenizer boundary there.
        if size >= block_chars and (line.text[:1].strip() or size >= 16 * block_chars):
            yield first, "".join(parts)
            parts, size = [], 0
        if not parts:
            first = line.number
        parts.append(line.text + "\n")
        size += len(line.text) + 1
    if parts:
        yield first, "".join(parts)
