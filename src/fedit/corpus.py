"""Text corpora for second-moment statistics: a file, a folder of files, or the shipped sample."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Iterator

from fedit.core.tokens import encode
from fedit.errors import StatsError

DEFAULT_CORPUS = "default"
_SUFFIXES = {".txt", ".raw", ".text", ".md"}


@dataclass(frozen=True)
class Corpus:
    """A list of UTF-8 text files read in order. ``id`` names it in cache keys."""

    paths: tuple[Path, ...]
    id: str

    def lines(self) -> Iterator[str]:
        for p in self.paths:
            with p.open(encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.strip()
                    if line and not (line.startswith("=") and line.endswith("=")):
                        yield line

    def chunks(self, tok, seq_len: int) -> Iterator[list[int]]:
        """Token chunks of ``seq_len`` ids: the tokenizer's BOS (if it adds one) + text tokens."""
        probe = encode(tok, "a")
        bos = [probe[0]] if len(probe) > len(encode(tok, "a", special=False)) else []
        body = seq_len - len(bos)
        buf: list[int] = []
        for line in self.lines():
            buf.extend(encode(tok, line + "\n", special=False))
            while len(buf) >= body:
                yield bos + buf[:body]
                buf = buf[body:]


def default_corpus_path() -> Path:
    return Path(str(files("fedit").joinpath("resources/corpus/wikitext2_sample.txt")))


def open_corpus(spec: str | Path | None = None) -> Corpus:
    """``None``/``"default"`` is the WikiText-2 sample shipped with fedit; else a file or folder."""
    if spec is None or str(spec) == DEFAULT_CORPUS:
        p = default_corpus_path()
        paths = (p,)
        label = "wikitext2-sample"
    else:
        p = Path(spec).expanduser()
        if p.is_dir():
            paths = tuple(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in _SUFFIXES))
            if not paths:
                raise StatsError(f"corpus folder {p} holds no text files ({sorted(_SUFFIXES)}).",
                                 "point --corpus at a .txt file or a folder of them.")
        elif p.is_file():
            paths = (p,)
        else:
            raise StatsError(f"corpus {p} does not exist.", "point --corpus at a text file or folder, "
                             "or leave it out for the shipped WikiText-2 sample.")
        label = p.name
    h = hashlib.sha256()
    for q in paths:
        h.update(q.name.encode())
        h.update(hashlib.sha256(q.read_bytes()).digest())
    return Corpus(paths=paths, id=f"{label}-{h.hexdigest()[:12]}")
