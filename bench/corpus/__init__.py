"""A labelled corpus for the detectors: positives of every type, and clean documents.

``build(seed)`` is deterministic for a given seed (and, for the code part, a given venv):

* **positives** — for every detector type, documents made from realistic templates (config files,
  code, shell sessions, logs, chat questions; :mod:`bench.corpus.templates`) filled with
  format-valid fake values (:mod:`bench.corpus.fakes`), sometimes wrapped in generated prose.
  Every embedded value is labelled with its type and character span.
* **held out** — positives from a second set of templates written after the detectors were tuned
  on the first (``templates.HELD_OUT``), scored separately: an estimate for formats nobody wrote
  a template for.
* **clean** — documents that must not trigger: library files from the venv's ``site-packages``
  (chunks an independent oracle finds free of real values; what it left out is counted),
  generated prose full of near misses (:mod:`bench.corpus.prose`), and generated configs full
  of placeholders and references (:mod:`bench.corpus.clean`).

``python -m bench.corpus --out DIR`` writes the corpus as JSON lines for inspection.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from bench.corpus import clean, prose, templates

DEFAULT_SEED = 20261121


@dataclass(frozen=True, slots=True)
class Label:
    """A labelled value: its detector type and character span in the document."""

    type: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Document:
    """One corpus document. ``kind``: ``positive``, ``held-out``, ``library``, ``prose`` or ``config``."""

    id: str
    kind: str
    text: str
    labels: tuple[Label, ...] = ()
    origin: str = ""  # template type or source file:line
    primary: str = ""  # for positives: the type the document was generated for


@dataclass
class Corpus:
    """Positives, held-out positives, clean documents, and why library chunks were left out."""

    seed: int
    positives: list[Document] = field(default_factory=list)
    clean: list[Document] = field(default_factory=list)
    excluded_code: Counter[str] = field(default_factory=Counter)
    held_out: list[Document] = field(default_factory=list)


def positive(rng: random.Random, type_: str, index: int, held_out: bool = False) -> Document:
    """A document generated for ``type_``: a template, sometimes with prose around it."""
    options = (templates.HELD_OUT if held_out else templates.TEMPLATES)[type_]
    template = options[index % len(options)] if index < len(options) else rng.choice(options)
    text, spans = templates.render(template, rng)
    before = prose.paragraph(rng, rng.randrange(1, 3)) + "\n\n" if rng.random() < 0.4 else ""
    after = "\n\n" + prose.paragraph(rng, rng.randrange(1, 3)) if rng.random() < 0.4 else ""
    shift = len(before)
    labels = tuple(Label(t, s + shift, e + shift) for t, s, e in spans)
    kind = "held-out" if held_out else "positive"
    return Document(f"{kind}-{type_.lower()}-{index}", kind, before + text + after, labels, type_, type_)


def build(
    seed: int = DEFAULT_SEED,
    per_type: int = 200,
    code: int = 1500,
    prose_docs: int = 600,
    configs: int = 400,
) -> Corpus:
    """Build the corpus (a few seconds for the defaults: most of it is reading site-packages)."""
    corpus = Corpus(seed)
    for type_ in sorted(templates.TEMPLATES):
        rng = random.Random(f"{seed}:{type_}")
        corpus.positives.extend(positive(rng, type_, i) for i in range(per_type))
    for type_ in sorted(templates.HELD_OUT):
        rng = random.Random(f"{seed}:held-out:{type_}")
        corpus.held_out.extend(positive(rng, type_, i, held_out=True) for i in range(max(20, per_type // 5)))
    rng = random.Random(f"{seed}:code")
    chunks, corpus.excluded_code = clean.clean_code(rng, code)
    corpus.clean.extend(
        Document(f"library-{i}", "library", text, (), origin) for i, (origin, text) in enumerate(chunks)
    )
    rng = random.Random(f"{seed}:prose")
    corpus.clean.extend(
        Document(f"prose-{i}", "prose", prose.document(rng, rng.randrange(300, 4000)))
        for i in range(prose_docs)
    )
    rng = random.Random(f"{seed}:config")
    corpus.clean.extend(Document(f"config-{i}", "config", clean.config_document(rng)) for i in range(configs))
    return corpus
