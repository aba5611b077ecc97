"""Render a pruning study's JSON (benchmarks/eval_study.py) into tables, plots and docs/EVALUATION.md's data sections.

Writes ``tables.md`` and the plots next to the copy of the JSON in ``--out-dir`` (default
``docs/evaluation/study-h200``), then replaces the bodies between the ``<!-- study:NAME:begin -->``
/ ``<!-- study:NAME:end -->`` markers of ``--doc`` (default ``docs/EVALUATION.md``): setup (command,
date, device, versions), headline (RULER mean with 95 % intervals per method and setting, KV ratio,
perplexity), comparisons (paired differences with intervals), per-task scores, plots. The prose
around the markers is left alone: no number is written outside them.

Usage (repository root)::

    PYTHONPATH=src python docs/evaluation/make_study_docs.py study-h200/study.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from mustafar.evaluation.study import data_sections, render, update_sections


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="study.json written by benchmarks/eval_study.py")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/evaluation/study-h200"))
    parser.add_argument("--doc", type=Path, default=Path("docs/EVALUATION.md"))
    args = parser.parse_args(argv)
    document = json.loads(args.study.read_text(encoding="utf-8"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.study.resolve() != (args.out_dir / "study.json").resolve():
        shutil.copyfile(args.study, args.out_dir / "study.json")
    paths = render(document, args.out_dir)
    relative = os.path.relpath(args.out_dir, args.doc.parent)
    text = update_sections(args.doc.read_text(encoding="utf-8"), data_sections(document, relative))
    args.doc.write_text(text, encoding="utf-8")
    print(f"wrote {args.out_dir / 'tables.md'}, {len(paths)} plots, and the data sections of {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
