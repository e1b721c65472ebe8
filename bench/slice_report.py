"""A slice of the catalogue in every mode, side by side: speed, and how alike the texts are, against `ar` on the
same entities (issue 25's guard, chosen from figures). The files come from runs back to back on an idle machine:

    S="--templates short --max-new-tokens 256 --users 150 --items 150"
    for m in ar strict relaxed; do .venv/bin/dare generate-all --mode $m $S --out results/knowledge/slice/ml-100k-short-$m.jsonl; done
    for p in 0.5 0.3; do .venv/bin/dare generate-all --mode relaxed --relaxed-max-top1 $p $S \
        --out results/knowledge/slice/ml-100k-short-relaxed-top1-$p.jsonl; done
    .venv/bin/python -P bench/slice_report.py results/knowledge/slice/sweep.json
"""

import json
import sys
from pathlib import Path

from dare.quality import file_texts, read_knowledge, read_summary

ROOT = Path("results/knowledge/slice")
NAMES = ["ar", "strict", "relaxed", "relaxed-top1-0.5", "relaxed-top1-0.3"]


def main() -> None:
    rows = {}
    for name in NAMES:
        path = ROOT / f"ml-100k-short-{name}.jsonl"
        if not path.exists() or not read_summary(path):
            continue
        records, summary = read_knowledge(path), read_summary(path)
        rows[name] = {"summary": {k: summary[k] for k in ("entities", "tokens", "wall_s", "tokens_per_s", "mean_accepted")},
                      "text": file_texts(records, summary)}
    ar = rows["ar"]["summary"]
    print("| mode | entities | tokens | tokens/s | vs ar | wall s | entities/s vs ar | tokens per step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        s = r["summary"]
        print(f"| {name} | {s['entities']} | {s['tokens']:,} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / ar['tokens_per_s']:.2f}x "
              f"| {s['wall_s']:.0f} | {ar['wall_s'] / s['wall_s']:.2f}x | {s['mean_accepted']:.2f} |")
    print()
    print("| mode | kind | distinct-2 | first sentence shared | repeated 6-grams | copied span mean / p95 | cut at 256 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in ("user", "item"):
        for name, r in rows.items():
            m = r["text"]["by_kind"][kind]
            print(f"| {name} | {kind}s | {m['distinct_2']:.3f} | {100 * m['shared_first_sentence']:.1f} % | {100 * m['repeated_6gram']:.1f} % "
                  f"| {m['copied_span_mean']:.1f} / {m['copied_span_p95']:.0f} | {100 * m['truncated']:.0f} % |")
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
