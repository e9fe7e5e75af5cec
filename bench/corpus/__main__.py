"""Write the corpus as JSON lines: ``python -m bench.corpus --out DIR [--seed N]``.

Three files: ``positives.jsonl``, ``held_out.jsonl`` and ``clean.jsonl``, one document per line with its labels, so a
reader can see exactly what the detector benchmark scores against.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from bench.corpus import DEFAULT_SEED, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the JSON lines into")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--per-type", type=int, default=200)
    parser.add_argument("--code", type=int, default=1500)
    args = parser.parse_args()
    corpus = build(args.seed, per_type=args.per_type, code=args.code)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, docs in (
        ("positives", corpus.positives),
        ("held_out", corpus.held_out),
        ("clean", corpus.clean),
    ):
        with (args.out / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for doc in docs:
                fh.write(json.dumps(asdict(doc), ensure_ascii=False) + "\n")
    print(f"{len(corpus.positives)} positives, {len(corpus.clean)} clean documents in {args.out}")
    print(f"library chunks left out of the clean set (oracle): {dict(corpus.excluded_code)}")


if __name__ == "__main__":
    main()
