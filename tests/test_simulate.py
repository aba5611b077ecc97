"""Simulated pruning: what leaves the window is pruned by the rule, the rest stays dense; per-token = MustafarCache."""

import pytest
import torch
from helpers import save_tiny_model

import mustafar
from mustafar.config import SparsityConfig
from mustafar.evaluation.runner import make_eval_cache
from mustafar.evaluation.simulate import OBSERVE_NAME, SimulatedCache, observe_queries, value_rule
from mustafar.generation import fill_cache, forward, prefill
from mustafar.pruning import get_rule, keep_count

WINDOW, CHUNK, HEADS, DIM = 4, 8, 2, 16


def _states(tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, HEADS, tokens, DIM, generator=generator) for _ in range(2)]


def _boundary(total: int) -> int:
    return max(0, (total - WINDOW) // CHUNK) * CHUNK


def _expected(x: torch.Tensor, rule, sparsity: float, queries, total: int, steps: list[int]) -> torch.Tensor:
    """Prune ``x`` block by block as the policy moves them: each block pruned on its own, once."""
    out, done = x.clone(), 0
    for held in steps:
        stop = _boundary(held)
        if stop > done and sparsity > 0:
            out[:, :, done:stop] = rule.prune(x[:, :, done:stop], sparsity, queries if rule.needs_queries else None)
        done = max(done, stop)
    return out[:, :, :total]


@pytest.mark.parametrize("method", ["per-token", "output-aware", "per-channel", "think"])
@pytest.mark.parametrize("ks, vs", [(0.5, 0.5), (0.7, 0.0), (0.0, 0.6)])
def test_pruned_exactly_when_leaving_the_window(method, ks, vs):
    keys, values = _states(45, seed=1)
    queries = torch.randn(1, 2 * HEADS, WINDOW, DIM)
    cache = SimulatedCache(SparsityConfig(ks, vs, WINDOW, CHUNK, method), {0: queries})
    out_k, out_v = cache.update(keys[:, :, :21], values[:, :, :21], 0)
    assert torch.equal(out_k, keys[:, :, :21]) and torch.equal(out_v, values[:, :, :21]), "prefill attends dense"
    steps = [21]
    for t in range(21, 45):
        out_k, _ = cache.update(keys[:, :, t:t + 1], values[:, :, t:t + 1], 0)
        steps.append(t + 1)
        layer = cache.layers[0]
        assert layer.pruned_tokens == _boundary(t + 1) and torch.equal(out_k, layer.keys)
        exp_k = _expected(keys, get_rule(method), ks, queries, t + 1, steps)
        exp_v = _expected(values, value_rule(method), vs, queries, t + 1, steps)
        torch.testing.assert_close(layer.keys, exp_k, rtol=0, atol=0)
        torch.testing.assert_close(layer.values, exp_v, rtol=0, atol=0)
        tail = slice(layer.pruned_tokens, t + 1)
        assert torch.equal(layer.keys[:, :, tail], keys[:, :, tail]), "the window stays dense"


def test_rule_shapes_of_pruned_blocks():
    keys, values = _states(40, seed=2)
    queries = torch.randn(1, 2 * HEADS, WINDOW, DIM)
    for method, per_token in (("per-token", True), ("output-aware", True), ("think", False)):
        cache = fill_cache(SimulatedCache(SparsityConfig(0.5, 0.5, WINDOW, CHUNK, method), {0: queries}),
                           _dynamic(keys, values))
        block = cache.layers[0].keys[:, :, :32]
        kept = block != 0
        if per_token:
            assert (kept.sum(-1) == keep_count(DIM, 0.5)).all()
        else:  # ThinK: the same channels for every token of a head, in keys and values
            assert (kept == kept[:, :, :1]).all() and (kept[:, :, 0].sum(-1) == keep_count(DIM, 0.5)).all()
            vkept = cache.layers[0].values[:, :, :32] != 0
            assert (vkept == vkept[:, :, :1]).all()
    cache = fill_cache(SimulatedCache(SparsityConfig(0.5, 0.5, WINDOW, CHUNK, "per-channel")), _dynamic(keys, values))
    kept = cache.layers[0].keys[:, :, :32] != 0
    assert (kept.sum(-2) == keep_count(32, 0.5)).all(), "per channel: half of the block's tokens per channel"


def _dynamic(keys, values):
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(keys, values, 0)
    return cache


def test_simulated_cache_saves_no_memory_and_checks_queries():
    keys, values = _states(40, seed=3)
    cache = fill_cache(SimulatedCache(SparsityConfig(0.7, 0.7, WINDOW, CHUNK, "per-channel")), _dynamic(keys, values))
    assert cache.nbytes == cache.dense_nbytes == 2 * keys.numel() * keys.element_size()
    with pytest.raises(ValueError, match="queries"):
        SimulatedCache(SparsityConfig(0.5, 0.0, WINDOW, CHUNK, "think")).update(keys, values, 0)
    SimulatedCache(SparsityConfig(0.0, 0.5, WINDOW, CHUNK, "think")).update(keys, values, 0)  # values need none
    with pytest.raises(TypeError, match="config"):
        SimulatedCache("K0.5V0.5")


@pytest.fixture(scope="module")
def model():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as directory:
        lm, _ = mustafar.load_model(str(save_tiny_model(Path(directory))))
    return lm


def test_observe_queries_records_the_last_window(model):
    ids = torch.randint(0, 200, (1, 50))
    before = model.config._attn_implementation
    with observe_queries(model, window=6) as queries:
        assert model.config._attn_implementation == OBSERVE_NAME
        prefill(model, ids)
    assert model.config._attn_implementation == before
    assert sorted(queries) == [0, 1]
    assert all(q.shape == (1, 4, 6, 16) for q in queries.values())
    with pytest.raises(ValueError, match="window"):
        with observe_queries(model, 0):
            pass


def test_per_token_simulation_equals_the_compressed_cache(model):
    torch.manual_seed(4)
    ids = torch.randint(0, 200, (1, 70))
    source, logits = prefill(model, ids)
    setting = SparsityConfig(0.5, 0.7, WINDOW, CHUNK, "per-token")
    real = fill_cache(make_eval_cache(setting), source)
    simulated = fill_cache(SimulatedCache(setting), source)
    assert isinstance(real, mustafar.MustafarCache)
    for layer in simulated.layers:  # the simulated store is the per-token pruning of what left the window
        pruned = layer.pruned_tokens
        assert pruned == _boundary(70)
        assert (layer.keys[:, :, :pruned] != 0).sum(-1).eq(keep_count(16, 0.5)).all()
    token = torch.tensor([[int(logits.argmax())]])
    for _ in range(12):  # decode steps read the compressed store vs the dense-but-pruned tensors
        real_logits, sim_logits = forward(model, token, real)[:, -1], forward(model, token, simulated)[:, -1]
        torch.testing.assert_close(sim_logits, real_logits, rtol=1e-4, atol=1e-4)
        token = real_logits.argmax(-1, keepdim=True)
    assert real.get_seq_length() == simulated.get_seq_length() == 82


def test_run_eval_methods_simulated_rows_and_resume(model, tmp_path, monkeypatch):
    from mustafar.evaluation import EvalConfig, ResultStore, run_eval
    from mustafar.evaluation import runner
    from mustafar.evaluation.report import summarize
    from helpers import tiny_tokenizer

    settings = tuple(mustafar.parse_setting(s, window=WINDOW, chunk=CHUNK) for s in ("dense", "K0.5V0.5"))
    config = EvalConfig(settings, tasks=("niah_single_2", "fwe"), context_lengths=(400,), samples=2,
                        methods=("per-token", "think", "per-channel"), max_new_tokens_cap=3)
    store = ResultStore(tmp_path / "samples.jsonl", {"model": "tiny"})
    results = run_eval(model, tiny_tokenizer(), config, progress=False, store=store)
    assert len(results) == 2 * 2 * 4  # tasks x samples x (dense + 3 methods)
    by_method = {r.method: r for r in results if r.task == "fwe" and r.index == 0}
    assert set(by_method) == {"dense", "per-token", "think", "per-channel"}
    for method, result in by_method.items():
        assert result.simulated == (method in ("think", "per-channel"))
        assert (result.kv_bytes < result.dense_bytes) == (method == "per-token")
        assert result.references and 0.0 <= result.score <= 1.0 and result.extra["new_tokens"] <= 3
    rows = summarize(results, config)
    assert [(r["method"], r["simulated"]) for r in rows] == [
        ("dense", False), ("per-token", False), ("think", True), ("per-channel", True)]
    assert rows[2]["ratio"] == 1.0 and rows[1]["ratio"] < 1.0

    calls = []
    monkeypatch.setattr(runner, "batched_greedy", lambda *a, **k: calls.append(1) or [[] for _ in a[3].pads])
    again = run_eval(model, tiny_tokenizer(), config, progress=False,
                     store=ResultStore(tmp_path / "samples.jsonl", {"model": "tiny"}))
    assert not calls and [r.to_dict() for r in again] == [r.to_dict() for r in results], "finished runs are skipped"
    bigger = EvalConfig(settings, tasks=("niah_single_2", "fwe"), context_lengths=(400,), samples=3,
                        methods=("per-token", "think", "per-channel"), max_new_tokens_cap=3)
    run_eval(model, tiny_tokenizer(), bigger, progress=False,
             store=ResultStore(tmp_path / "samples.jsonl", {"model": "tiny"}))
    assert len(calls) == 2 * 4, "only the new sample index runs"
