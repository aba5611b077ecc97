"""Per-sample results and their append-only store (resumable runs).

Every finished run of one sample under one (method, setting) is a
:class:`SampleResult`, appended at once as one JSON line to ``samples.jsonl``
in the output directory. A later run with the same output directory reads the
file back and skips the runs whose :attr:`SampleResult.key` -- (task, setting,
method, context length, sample index, seed) -- is already there, so an
interrupted evaluation resumes where it stopped. Each line also carries the
run's ``fingerprint`` (model, dtype, window, chunk, generation options): results
of another configuration in the same file are refused, never mixed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

__all__ = ["SampleResult", "ResultStore", "ResultKey"]

ResultKey = tuple[str, str, str, int, int, int]


@dataclass
class SampleResult:
    """One (method, setting, task, context length, sample) run. Bytes are KV bytes over all layers.

    ``score``: the task's metric in [0, 1] (retrieval: 1.0 if ``correct``); ``simulated``:
    the cache was a :class:`~.simulate.SimulatedCache` (pruned, stored dense, so
    ``kv_bytes == dense_bytes``); ``references``: the expected answers.
    """

    setting: str
    task: str
    context_length: int
    index: int
    prompt_tokens: int
    kv_bytes: int
    dense_bytes: int
    seconds: float
    depth: float | None = None
    answer: str | None = None
    output: str | None = None
    correct: bool | None = None
    nll: float | None = None
    scored_tokens: int | None = None
    extra: dict = field(default_factory=dict)
    method: str = "per-token"
    simulated: bool = False
    seed: int = 0
    score: float | None = None
    suite: str = "retrieval"
    references: list[str] | None = None

    @property
    def key(self) -> ResultKey:
        """(task, setting, method, context length, sample index, seed): what makes a run unique."""
        return self.task, self.setting, self.method, self.context_length, self.index, self.seed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SampleResult:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class ResultStore:
    """Append-only JSONL of :class:`SampleResult`, read back on creation.

    Args:
        path: the ``.jsonl`` file (created with its directory on the first append); ``None``: in memory only.
        fingerprint: options that change results besides the key (model, window, ...);
            stored with each line and compared with those already in the file.
        fresh: delete the file first (start over).

    Raises:
        ValueError: the file holds results of another fingerprint, or JSON that is not a result
            (lines that are not JSON, cut by an interruption, are skipped and counted in ``skipped``).
    """

    def __init__(self, path: str | os.PathLike | None, fingerprint: dict | None = None, fresh: bool = False):
        self.path, self.fingerprint = (Path(path) if path is not None else None), dict(fingerprint or {})
        if fresh and self.path is not None and self.path.exists():
            self.path.unlink()
        self.results: dict[ResultKey, SampleResult] = {}
        self.skipped = 0  # lines cut by an interruption
        if self.path is not None and self.path.exists():
            self._read()

    def _read(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            with self.path.open("a", encoding="utf-8") as out:
                out.write("\n")  # so that the next result starts a line of its own
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                self.skipped += 1  # a line cut by an interruption: that run is done again
                continue
            try:
                result = SampleResult.from_dict(data["result"])
            except (KeyError, TypeError) as error:
                raise ValueError(f"{self.path}:{number} must be a result line ({error!r})") from None
            self._check(data.get("fingerprint", {}), number)
            self.results[result.key] = result

    def _check(self, other: dict, number: int) -> None:
        diff = {k: (other.get(k), v) for k, v in self.fingerprint.items() if other.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}={old!r} there, {new!r} now" for k, (old, new) in diff.items())
            raise ValueError(f"{self.path}:{number} holds results of another configuration ({shown}): use another "
                             "output directory or start over (--fresh)")

    def __contains__(self, key: ResultKey) -> bool:
        return key in self.results

    def __len__(self) -> int:
        return len(self.results)

    def get(self, key: ResultKey) -> SampleResult | None:
        return self.results.get(key)

    def append(self, result: SampleResult) -> None:
        """Record ``result`` and append it to the file (flushed, so an interruption loses at most this line)."""
        self.results[result.key] = result
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"fingerprint": self.fingerprint, "result": result.to_dict()}, default=str)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(line + "\n")
