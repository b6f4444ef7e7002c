"""The offline default corpus: the English Wikipedia sample that ships in the `gensim` wheel.

`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`
is a 2016 dump of 206 pages (about 6 MB of wiki markup). We turn the article pages into plain
prose (no templates, references, tables or link syntax), in WikiText style: ``= Title =``
headings and one paragraph per line. The file is located without importing gensim, so
`pip install --no-deps gensim` is enough.

Articles are split by position: the first half is for calibration and training, the second
half is held out for evaluation, so lowbit never calibrates on the text it evaluates.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from ..errors import UserError

NAME = "enwiki-sample"
GENSIM_PIP = "gensim==4.4.0"
RELATIVE_PATH = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_ARTICLE_CHARS = 2000  # skips redirects, stubs and list pages


def corpus_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the default text corpus ({NAME}) ships in the 'gensim' wheel, which is not installed; "
            f"install it with: pip install --no-deps {GENSIM_PIP} (or pass --data FILE)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / RELATIVE_PATH
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed gensim; reinstall: pip install --no-deps {GENSIM_PIP}")
    return path


@lru_cache(maxsize=1)
def articles() -> tuple[tuple[str, str], ...]:
    """(title, plain text) of every real article in the sample, in file order."""
    xml = bz2.open(corpus_path()).read().decode("utf-8")
    out = []
    for page in re.finditer(r"<page>(.*?)</page>", xml, re.S):
        body = page.group(1)
        if "<ns>0</ns>" not in body:
            continue
        title = html.unescape(re.search(r"<title>(.*?)</title>", body, re.S).group(1))
        text_match = re.search(r"<text[^>]*>(.*?)</text>", body, re.S)
        if not text_match:
            continue
        markup = html.unescape(text_match.group(1))
        if markup.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = markup_to_text(markup)
        if len(text) >= MIN_ARTICLE_CHARS:
            out.append((title, text))
    return tuple(out)


def split_text(split: str) -> str:
    """'calib' (first half of the articles) or 'eval' (second half, held out)."""
    items = articles()
    half = len(items) // 2
    chosen = items[:half] if split == "calib" else items[half:]
    return "\n".join(f" = {title} = \n\n{text}\n" for title, text in chosen)


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced `open_ ... close` spans (templates and tables nest)."""
    out, depth, i = [], 0, 0
    n, lo, lc = len(text), len(open_), len(close)
    while i < n:
        if text.startswith(open_, i):
            depth += 1
            i += lo
        elif depth and text.startswith(close, i):
            depth -= 1
            i += lc
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")


def markup_to_text(markup: str) -> str:
    """MediaWiki markup to plain prose paragraphs."""
    text = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<(gallery|math|timeline|source|syntaxhighlight|code)[^>]*>.*?</\1>", "", text, flags=re.S | re.I)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    # File/image links may contain nested links in their captions: drop them whole.
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    for _ in range(3):
        text = _LINK.sub(r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    paragraphs = []
    for line in text.split("\n"):
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).lower() in {"references", "external links", "see also", "further reading", "notes", "bibliography"}:
                break  # the rest of an article is lists of sources
            paragraphs.append(f" {'=' * len(heading.group(1))} {heading.group(2)} {'=' * len(heading.group(1))} ")
            continue
        if not line or line[0] in "*#:;|!{}" or len(line) < 40:
            continue
        line = re.sub(r"\s+", " ", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)
        paragraphs.append(line)
    return "\n".join(paragraphs).strip()
