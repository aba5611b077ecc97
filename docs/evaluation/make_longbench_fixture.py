"""Write a tiny LongBench-format fixture: 4 tasks, 2 records each (a smoke test of the runner, not LongBench).

Usage: ``python docs/evaluation/make_longbench_fixture.py DIR``, then
``mustafar eval --tasks longbench --data-dir DIR``.
"""

import json
import pathlib
import sys

CITIES = [("Lyon", "the Rhône"), ("Cologne", "the Rhine"), ("Budapest", "the Danube"), ("Kraków", "the Vistula")]
CLASSES = ["Human being", "Description", "Location", "Entity", "Numeric value", "Abbreviation"]
PASSAGES = "\n".join(f"Passage {i + 1}:\n{city} lies on {river}. It is a city with a long history."
                     for i, (city, river) in enumerate(CITIES))
TREC_SHOTS = ("Question: Who wrote Hamlet?\nType: Human being\nQuestion: What is a cat?\nType: Description\n",
              "Question: Where is Rome?\nType: Location\nQuestion: Who painted the Mona Lisa?\nType: Human being\n")
CALCULATOR = "class Calculator:\n    def multiply(self, a, b):\n        return a * b\n\n"
TOTAL = "def total(items):\n    result = 0\n    for item in items:\n        result += item\n    return result\n\n"


def records() -> dict[str, list[dict]]:
    return {
        "hotpotqa": [{"input": f"Which river does {city} lie on?", "context": PASSAGES * 8,
                      "answers": [river.split()[-1]]} for city, river in CITIES[:2]],
        "trec": [{"input": "Question: Where is the Eiffel Tower?\nType:", "answers": ["Location"],
                  "context": TREC_SHOTS[0] * 20, "all_classes": CLASSES},
                 {"input": "Question: How many legs does a spider have?\nType:", "answers": ["Numeric value"],
                  "context": TREC_SHOTS[1] * 20, "all_classes": CLASSES}],
        "passage_count": [{"input": "", "answers": [str(n)], "context": "\n\n".join(
            f"Paragraph {i + 1}: {CITIES[i % n][0]} lies on {CITIES[i % n][1]}." for i in range(12))} for n in (3, 4)],
        "lcc": [{"input": "", "answers": ["        return a + b"],
                 "context": CALCULATOR * 15 + "    def add(self, a, b):\n"},
                {"input": "", "answers": ["    for item in items:"],
                 "context": TOTAL * 12 + "def count(items):\n    n = 0\n"}],
    }


def main(directory: str) -> None:
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for task, rows in records().items():
        with open(out / f"{task}.jsonl", "w", encoding="utf-8") as file:
            for row in rows:
                row = {"all_classes": None, "length": len(row["context"].split()), "dataset": task,
                       "language": "en", **row}
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
    print("wrote", sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main(sys.argv[1])
