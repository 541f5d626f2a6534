"""Reading a user's file as text, one chunk at a time: encoding by BOM, binary detection, CRLF, bounded lines.

Accepted: UTF-8 (with or without BOM) and UTF-16 with a BOM. Anything else (Latin-1, Windows-1252, a file with
NUL bytes) is refused as a whole with the byte offset of the first bad byte, because a half-decoded corpus is
worse than a clear "save it as UTF-8". Memory stays bounded by the chunk size plus `max_line_bytes`.
"""
from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

_BOMS = (  # longest first: the UTF-32 BOMs start with the UTF-16 ones
    (codecs.BOM_UTF32_LE, None), (codecs.BOM_UTF32_BE, None),
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
)


class RefusedFile(ValueError):
    """The whole file cannot be used (encoding, binary content, structure); the message says why and where."""


@dataclass(frozen=True)
class Line:
    number: int           # 1-based
    text: str | None      # without its newline; None when the line was longer than the limit (and was dropped)
    length: int           # characters (a lower bound when text is None)


class TextStream:
    """Decoded text of one file in chunks, with `bytes_read` for progress. Raises RefusedFile on bad content."""

    def __init__(self, path: Path, chunk_bytes: int, on_bytes: Callable[[int], None] | None = None):
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        self.on_bytes = on_bytes
        self.bytes_read = 0
        with open(self.path, "rb") as f:
            head = f.read(4)
        self.encoding = "utf-8"
        self.bom = 0
        for bom, encoding in _BOMS:
            if head.startswith(bom):
                if encoding is None:
                    raise RefusedFile(f"{self.path}: UTF-32 text is not supported; save the file as UTF-8")
                self.encoding, self.bom = encoding, len(bom)
                break
        self.utf16 = self.encoding.startswith("utf-16")

    @property
    def encoding_label(self) -> str:
        return {"utf-8": "UTF-8", "utf-8-sig": "UTF-8 with BOM", "utf-16-le": "UTF-16 LE with BOM",
                "utf-16-be": "UTF-16 BE with BOM"}[self.encoding]

    def chunks(self) -> Iterator[str]:
        """Decoded text with CRLF turned into LF. A CR that ends a chunk waits for the next one."""
        decoder = codecs.getincrementaldecoder("utf-8" if self.encoding == "utf-8-sig" else self.encoding)("strict")
        held_cr = ""
        with open(self.path, "rb") as f:
            f.seek(self.bom)
            start = self.bom  # file offset of the first byte of `raw`
            while True:
                raw = f.read(self.chunk_bytes)
                final = not raw
                pending = len(decoder.getstate()[0])  # bytes of a split character carried from the last chunk
                try:
                    text = decoder.decode(raw, final)
                except UnicodeDecodeError as exc:
                    offset = start - pending + exc.start
                    bad = exc.object[exc.start:exc.start + 1].hex().upper()
                    what = "UTF-16" if self.utf16 else "UTF-8"
                    raise RefusedFile(f"{self.path}: byte offset {offset}: byte 0x{bad} is not valid {what} "
                                      f"({exc.reason}); only UTF-8 and UTF-16 with a BOM are read — save the "
                                      "file as UTF-8") from None
                if "\x00" in text:
                    at = raw.find(b"\x00") if not self.utf16 else 2 * text.index("\x00")
                    raise RefusedFile(f"{self.path}: byte offset {start + max(at, 0)}: NUL byte — this looks like a "
                                      "binary file, not text")
                start += len(raw)
                self.bytes_read = start
                if self.on_bytes is not None and raw:
                    self.on_bytes(len(raw))
                text = held_cr + text
                held_cr = ""
                if text.endswith("\r") and not final:
                    text, held_cr = text[:-1], "\r"
                if text:
                    yield text.replace("\r\n", "\n")
                if final:
                    return

    def lines(self, max_line_bytes: int) -> Iterator[Line]:
        """Lines without their newline. A line over `max_line_bytes` (UTF-8 bytes) is dropped while it is read
        and yielded with text None, so one endless line costs at most `max_line_bytes` of memory."""
        parts: list[str] = []
        size = 0          # characters in parts
        too_long = False
        number = 1
        for chunk in self.chunks():
            pos = 0
            while True:
                nl = chunk.find("\n", pos)
                end = len(chunk) if nl < 0 else nl
                if not too_long:
                    parts.append(chunk[pos:end])
                    size += end - pos
                    if size > max_line_bytes:
                        too_long, parts = True, []
                else:
                    size += end - pos
                if nl < 0:
                    break
                yield self._line(number, parts, size, too_long, max_line_bytes)
                number += 1
                parts, size, too_long = [], 0, False
                pos = nl + 1
        if parts and size or too_long:
            yield self._line(number, parts, size, too_long, max_line_bytes)

    @staticmethod
    def _line(number: int, parts: list[str], size: int, too_long: bool, limit: int) -> Line:
        if too_long:
            return Line(number, None, size)
        text = "".join(parts)
        # Characters <= UTF-8 bytes <= 4 x characters: encode only when the count alone cannot decide.
        if 4 * len(text) > limit and len(text.encode("utf-8", "surrogatepass")) > limit:
            return Line(number, None, len(text))
        return Line(number, text, len(text))
