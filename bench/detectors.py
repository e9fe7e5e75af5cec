"""Detector and masking benchmark: recall, false positives, throughput, decision latency.

Run ``.venv/bin/python -m bench.detectors`` (10 to 15 s on a 2-core machine). It builds the
labelled corpus (:mod:`bench.corpus`, seeded), then reports against the targets of issue 4:

* **recall per type** over the positives: a label counts as found when a finding *of its type*
  covers its whole span. ``covered`` also counts labels masked under another type (the value
  would still be masked, but the record would name the wrong type). The held-out templates
  are scored beside it, not in the targets.
* **false positives** over the clean documents (library files, prose, configs): the share of
  clean documents with at least one finding, overall and per type. ``extra`` counts findings in
  positive documents that cover no label (the surrounding template text fired).
* **masking throughput** in MB/s of request JSON (all types masked, one session per body).
* **decision latency** for 1 KB, 10 KB and 100 KB prompts (and a 10 KB prompt dense with
  findings): what the policy service does with a body per call — parse the JSON, detect and
  mask secrets for the upstream and PII for the record (``mask_request_layers``: one scan per
  string), serialise both bodies. Rule matching on metadata (users, models, tools) is not
  included; it does not scan text. Percentiles are nearest-rank over every sample; the
  machine's load average is printed, as other processes on a 2-core machine show up directly
  in p99.

Targets: recall >= 99 % on every secret type and >= 97 % on every PII type, false positives
<= 0.5 % of clean documents, 10 KB decided in < 2 ms at p99. Each is printed as MET or NOT MET.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import orjson

from bench.corpus import DEFAULT_SEED, Corpus, Document, build, fakes, prose
from bench.stats import percentile
from skillgate.events import Identity
from skillgate.policy.bundle import DEFAULT_BUNDLE, Bundle, load_bundle
from skillgate.policy.detectors import BUILTIN_TYPES, DetectorSet, Finding
from skillgate.policy.engine import CallContext, Verdict
from skillgate.policy.engine import evaluate as evaluate_call
from skillgate.policy.masking import Masker

_BENCH_IDENTITY = Identity(
    subject="bench",
    issuer="bench",
    username="bench",
    email=None,
    groups=["eng"],
    client_id=None,
    token_id=None,
)

RECALL_SECRET = 0.99
RECALL_PII = 0.97
FP_RATE = 0.005
P99_10KB_MS = 2.0
SIZES = (
    ("1 KB", 1024, False),
    ("10 KB", 10 * 1024, False),
    ("100 KB", 100 * 1024, False),
    ("10 KB dense", 10 * 1024, True),
)


def _covers(finding: Finding, start: int, end: int) -> bool:
    return finding.start <= start and finding.end >= end


def _overlaps(finding: Finding, start: int, end: int) -> bool:
    return finding.start < end and start < finding.end


def recall(detectors: DetectorSet, documents: list[Document]) -> dict[str, Any]:
    """Per type: labels, labels found with their type, labels covered by any finding, misses."""
    found: Counter[str] = Counter()
    covered: Counter[str] = Counter()
    total: Counter[str] = Counter()
    extra: Counter[str] = Counter()
    misses: dict[str, list[str]] = defaultdict(list)
    for doc in documents:
        findings = detectors.scan(doc.text)
        for label in doc.labels:
            total[label.type] += 1
            if any(f.type == label.type and _covers(f, label.start, label.end) for f in findings):
                found[label.type] += 1
            else:
                misses[label.type].append(doc.id)
            if any(_covers(f, label.start, label.end) for f in findings):
                covered[label.type] += 1
        for f in findings:
            if not any(_overlaps(f, lb.start, lb.end) for lb in doc.labels):
                extra[f.type] += 1
    return {"found": found, "covered": covered, "total": total, "extra": extra, "misses": misses}


def evaluate(detectors: DetectorSet, corpus: Corpus) -> dict[str, Any]:
    """Recall per type over the positives and false-positive rates over the clean documents."""
    fp_docs: Counter[str] = Counter()
    fp_by_kind: Counter[str] = Counter()
    clean_by_kind: Counter[str] = Counter()
    fp_any = 0
    fp_examples: list[tuple[Document, Finding]] = []
    for doc in corpus.clean:
        clean_by_kind[doc.kind] += 1
        findings = detectors.scan(doc.text)
        if findings:
            fp_any += 1
            fp_by_kind[doc.kind] += 1
            fp_examples.extend((doc, f) for f in findings)
        for type_ in {f.type for f in findings}:
            fp_docs[type_] += 1
    return {
        **recall(detectors, corpus.positives),
        "held_out": recall(detectors, corpus.held_out),
        "fp_docs": fp_docs,
        "fp_any": fp_any,
        "fp_by_kind": fp_by_kind,
        "clean_by_kind": clean_by_kind,
        "fp_examples": fp_examples,
    }


def _request(rng: random.Random, size: int, dense: bool = False) -> dict[str, Any]:
    """A Messages request of about ``size`` bytes of JSON: prose and code with some findings.

    Typical: about one finding per 1.5 KB (a key, an address, a phone number). Dense: about
    one per 100 bytes, the worst case for masking (every finding is fingerprinted and replaced).
    """
    parts: list[str] = []
    length = 0
    secret_share, pii_share = (0.08, 0.16) if dense else (0.005, 0.015)
    while length < size:
        roll = rng.random()
        if roll < secret_share:
            piece = f"My key is {fakes.GENERATORS[rng.choice(('AWS_ACCESS_KEY', 'GITHUB_TOKEN', 'OPENAI_API_KEY'))](rng)}."
        elif roll < pii_share:
            piece = f"Contact {fakes.email(rng)} or {fakes.phone(rng)}."
        elif roll < 0.5:
            piece = f"```python\ndef f_{rng.randrange(999)}(x):\n    return [v * {rng.randrange(9)} for v in x if v]\n```"
        else:
            piece = prose.sentence(rng)
        parts.append(piece)
        length += len(piece) + 1
    text = " ".join(parts)
    half = len(text) // 2
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": "You are a helpful assistant for the platform team.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": text[:half]}]},
            {"role": "assistant", "content": "Sure, let me look."},
            {"role": "user", "content": text[half:]},
        ],
    }
    encoded = orjson.dumps(body)
    while len(encoded) > size and len(body["messages"][2]["content"]) > 10:
        body["messages"][2]["content"] = body["messages"][2]["content"][: -(len(encoded) - size)]
        encoded = orjson.dumps(body)
    return body


def decide(bundle: Bundle, masker: Masker, raw: bytes) -> Verdict:
    """A whole policy decision as the policy service makes it (minus the Avro decode): parse the
    request, match every rule of the bundle (entity detection, token estimate...), mask for the
    model and for the record, re-serialise what changed."""
    body = orjson.loads(raw)
    ctx = CallContext(identity=_BENCH_IDENTITY, request=body, body=raw, headers={})
    return evaluate_call(bundle, ctx, masker)


def measure(bundle: Bundle, masker: Masker, seed: int, quick: bool) -> dict[str, dict[str, float]]:
    """Latency percentiles of :func:`decide` (under ``bundle``) and masking throughput per size."""
    rng = random.Random(f"{seed}:latency")
    results: dict[str, dict[str, float]] = {}
    for label, size, dense in SIZES:
        bodies = [orjson.dumps(_request(rng, size, dense)) for _ in range(20)]
        iterations = {1024: 3000, 10 * 1024: 2000, 100 * 1024: 200}[size] // (4 if quick else 1)
        for raw in bodies:  # warm-up
            decide(bundle, masker, raw)
        gc.collect()
        samples: list[float] = []
        for i in range(iterations):
            raw = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            decide(bundle, masker, raw)
            samples.append((time.perf_counter() - t0) * 1000)
        samples.sort()
        # throughput: one full masking pass (all types) over the parsed bodies
        parsed = [orjson.loads(raw) for raw in bodies]
        nbytes = 0
        t0 = time.perf_counter()
        rounds = max(1, iterations // len(bodies) // 2)
        for _ in range(rounds):
            for raw, body in zip(bodies, parsed, strict=True):
                masker.mask_request(body)
                nbytes += len(raw)
        elapsed = time.perf_counter() - t0
        results[label] = {
            "bytes": float(sum(len(b) for b in bodies) / len(bodies)),
            "p50": percentile(samples, 50),
            "p99": percentile(samples, 99),
            "max": samples[-1],
            "n": float(len(samples)),
            "mb_s": nbytes / elapsed / 1e6,
        }
    return results


def _pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:6.2f}%" if d else "    n/a"


def report(
    detectors: DetectorSet, corpus: Corpus, ev: dict[str, Any], show_fp: int
) -> list[tuple[str, bool]]:
    """Print the recall / false-positive table; return the verdicts of the accuracy targets."""
    clean_n = len(corpus.clean)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(ev["clean_by_kind"].items()))
    print(
        f"\ncorpus (seed {corpus.seed}): {len(corpus.positives)} positive documents"
        f" (+{len(corpus.held_out)} held out), {clean_n} clean ({kinds})"
    )
    print(f"library chunks the oracle left out of the clean set: {dict(corpus.excluded_code) or 'none'}")
    print(
        f"\n{'type':28} {'cat':6} {'labels':>6} {'recall':>8} {'covered':>8} {'FP docs':>8} {'FP rate':>8}"
        f" {'extra':>6}   {'held-out':>8} {'recall':>8}"
    )
    verdicts: list[tuple[str, bool]] = []
    worst: dict[str, float] = {}
    held = ev["held_out"]
    for type_ in sorted(BUILTIN_TYPES, key=lambda t: (BUILTIN_TYPES[t], t)):
        cat = BUILTIN_TYPES[type_]
        total = ev["total"][type_]
        recall = ev["found"][type_] / total if total else 0.0
        worst[cat] = min(worst.get(cat, 1.0), recall)
        print(
            f"{type_:28} {cat:6} {total:6d} {_pct(ev['found'][type_], total):>8} {_pct(ev['covered'][type_], total):>8}"
            f" {ev['fp_docs'][type_]:8d} {_pct(ev['fp_docs'][type_], clean_n):>8} {ev['extra'][type_]:6d}"
            f"   {held['total'][type_]:8d} {_pct(held['found'][type_], held['total'][type_]):>8}"
        )
    fp_rate = ev["fp_any"] / clean_n
    by_kind = ", ".join(
        f"{k} {_pct(ev['fp_by_kind'][k], n).strip()}" for k, n in sorted(ev["clean_by_kind"].items())
    )
    print(f"\nclean documents with any finding: {ev['fp_any']}/{clean_n} = {100 * fp_rate:.2f}% ({by_kind})")
    for type_, ids in sorted(ev["misses"].items()):
        print(f"  missed {type_}: {len(ids)} (e.g. {', '.join(ids[:4])})")
    held_found, held_total = sum(held["found"].values()), sum(held["total"].values())
    print(
        f"held-out templates (scored apart from the targets; history in bench/README.md): {held_found}/{held_total} found"
        f" ({_pct(held_found, held_total).strip()})"
    )
    for type_, ids in sorted(held["misses"].items()):
        print(f"  held-out missed {type_}: {len(ids)} (e.g. {', '.join(ids[:3])})")
    if show_fp:
        print(f"\nfirst {show_fp} false positives (type, document, position; values not printed):")
        for doc, f in ev["fp_examples"][:show_fp]:
            line = doc.text.count("\n", 0, f.start) + 1
            print(f"  {f.type:26} {doc.id:12} {doc.origin or doc.kind} line {line} chars {f.start}-{f.end}")
    verdicts.append(
        (
            f"recall >= {RECALL_SECRET:.0%} on every secret type (worst {worst['secret']:.2%})",
            worst["secret"] >= RECALL_SECRET,
        )
    )
    verdicts.append(
        (
            f"recall >= {RECALL_PII:.0%} on every PII type (worst {worst['pii']:.2%})",
            worst["pii"] >= RECALL_PII,
        )
    )
    verdicts.append(
        (f"false positives <= {FP_RATE:.1%} of clean documents ({100 * fp_rate:.2f}%)", fp_rate <= FP_RATE)
    )
    return verdicts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Detector recall / false positives, masking throughput, decision latency."
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--per-type", type=int, default=200, help="positive documents per type")
    parser.add_argument("--code", type=int, default=1500, help="clean library-code chunks")
    parser.add_argument("--quick", action="store_true", help="a quarter of the latency iterations")
    parser.add_argument(
        "--show-fp", type=int, default=0, metavar="N", help="list the first N false positives"
    )
    parser.add_argument("--no-latency", action="store_true", help="accuracy only")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    corpus = build(args.seed, per_type=args.per_type, code=args.code)
    t1 = time.perf_counter()
    detectors = DetectorSet()
    t2 = time.perf_counter()
    print(
        f"corpus built in {t1 - t0:.1f} s; detector set ({len(detectors.types)} types) compiled in {1000 * (t2 - t1):.1f} ms"
    )
    ev = evaluate(detectors, corpus)
    verdicts = report(detectors, corpus, ev, args.show_fp)

    if not args.no_latency:
        bundle = load_bundle(DEFAULT_BUNDLE)
        masker = Masker(bundle.detectors, os.urandom(32))
        load_before = os.getloadavg()[0]
        results = measure(bundle, masker, args.seed, args.quick)
        load_after = os.getloadavg()[0]
        print(
            f"\n{'prompt':8} {'body bytes':>10} {'decide p50 ms':>14} {'p99 ms':>8} {'max ms':>8} {'samples':>8} {'mask MB/s':>10}"
        )
        for label, r in results.items():
            print(
                f"{label:8} {r['bytes']:10.0f} {r['p50']:14.3f} {r['p99']:8.3f} {r['max']:8.2f} {r['n']:8.0f} {r['mb_s']:10.1f}"
            )
        print(
            f"load average (1 min) before/after: {load_before:.2f}/{load_after:.2f} on {os.cpu_count()} cores"
        )
        p99 = results["10 KB"]["p99"]
        verdicts.append(
            (f"10 KB prompt decided in < {P99_10KB_MS:g} ms at p99 ({p99:.3f} ms)", p99 < P99_10KB_MS)
        )

    print("\ntargets:")
    for text, ok in verdicts:
        print(f"  {'MET    ' if ok else 'NOT MET'}  {text}")


if __name__ == "__main__":
    main()
