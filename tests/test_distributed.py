"""The caches under tensor parallelism and multi-device placement, on the CPU (issue 6).

- Real tensor parallelism: two processes (``torchrun``, gloo backend) load a tiny Llama with
  transformers' ``tp_plan="auto"``; each rank computes half of the KV heads and its cache must hold
  exactly those (:mod:`distributed_worker`). Run this file under another interpreter (e.g. one with
  transformers 5.17) to test that version: the worker runs under ``sys.executable``.
- Head slicing in one process: the caches and the ``"mustafar"`` attention over half of the KV heads
  (and their query heads) give the heads' slice of the full computation.
- Per-layer placement: a CPU has no second device, so each layer is fed keys of its own dtype, head
  count and device (the ``meta`` device stands in for a second one); each layer's storage must follow
  its own keys. The real two-GPU ``device_map`` check is ``benchmarks/multi_gpu.py device-map``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import mustafar
from mustafar.attention import mustafar_attention_forward

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2


def _save_model(directory: Path) -> Path:
    """A 2-layer float32 Llama, 8 query heads, 4 KV heads (2 per rank), head_dim 16, no special tokens.

    Weights of std 0.1 (not transformers' 0.02, whose greedy output repeats one token): the greedy
    tokens vary, K0.5V0.5 changes them, and the top-2 logit gaps (> 1e-3) dwarf the rounding of the
    sharded matmuls (~1e-6), so tokens must match exactly.
    """
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=200,
                                      initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Run the worker on 2 ranks; return the two ranks' JSON and saved layer-0 keys."""
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("transformers needs accelerate to load a model with tp_plan")
    root = tmp_path_factory.mktemp("tp")
    model_dir, out = _save_model(root / "model"), root / "out"
    out.mkdir()
    torch.manual_seed(1)
    torch.save(torch.randint(200, (2, 40)), out / "prompt.pt")
    src = str(Path(mustafar.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               str(WORKER), str(model_dir), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return ranks, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_tp_dense_tokens_equal_single_process(tp_run):
    ranks, _ = tp_run
    for rank in ranks:
        assert rank["world_size"] == WORLD and rank["k_proj_local_rows"] == 2 * 16  # 2 KV heads of 16 channels
        assert rank["reference"]["dense"] == rank["reference"]["dynamic"]  # K0V0 = transformers' DynamicCache
        assert rank["tp"]["dense"] == rank["reference"]["dynamic"]


def test_tp_sparse_tokens_equal_single_process(tp_run):
    ranks, _ = tp_run
    for rank in ranks:
        assert rank["tp"]["sparse"] == rank["reference"]["sparse"]
        assert rank["tp"]["static"] == rank["reference"]["static"]
        assert len(rank["tp"]["sparse"][0]) == 12
        assert rank["tp"]["sparse"] != rank["tp"]["dense"]  # the pruning is really applied


@pytest.mark.parametrize("kind", ["dense", "sparse", "static"])
def test_tp_each_rank_holds_only_its_kv_heads(tp_run, kind):
    ranks, _ = tp_run
    for rank in ranks:
        tp, reference = rank["tp"]["caches"][kind], rank["reference"]["caches"][kind]
        assert len(tp["layers"]) == 2
        for layer in tp["layers"]:
            assert layer["window_heads"] == layer["key_store_heads"] == layer["value_store_heads"] == 4 // WORLD
            assert layer["device"] == layer["store_device"] == "cpu"
        assert all(layer["window_heads"] == 4 for layer in reference["layers"])
        assert tp["nbytes"] * WORLD == reference["nbytes"]
        assert tp["allocated_nbytes"] * WORLD == reference["allocated_nbytes"]


def test_tp_rank_cache_is_the_slice_of_the_full_cache(tp_run):
    """Rank r's compressed + window keys of layer 0 are KV heads [2r, 2r + 2) of the single-process cache."""
    _, saved = tp_run
    for r, keys in enumerate(saved):
        heads = 4 // WORLD
        assert keys["tp"].shape[1] == heads
        torch.testing.assert_close(keys["tp"], keys["reference"][:, r * heads:(r + 1) * heads], rtol=1e-5, atol=1e-5)


class _Attention(torch.nn.Module):
    """The attributes the ``"mustafar"`` attention reads from a transformers attention module."""

    def __init__(self, groups: int, head_dim: int):
        super().__init__()
        self.is_causal, self.num_key_value_groups, self.scaling = True, groups, head_dim ** -0.5


def _attend(cache, module, layer_idx, q, k, v):
    keys, values = cache.update(k, v, layer_idx)
    out, _ = mustafar_attention_forward(module, q, keys, values, None, scaling=module.scaling, is_causal=q.shape[2] > 1)
    return out  # [batch, q_len, q_heads, head_dim]


@pytest.mark.parametrize("make_cache", [
    lambda: mustafar.MustafarCache(0.5, 0.7, window=8, chunk=16, backend="torch"),
    lambda: mustafar.StaticMustafarCache(max_tokens=60, key_sparsity=0.5, value_sparsity=0.7, window=8,
                                         backend="torch"),
], ids=["MustafarCache", "StaticMustafarCache"])
@pytest.mark.parametrize("world", [2, 4])
def test_head_slices_equal_full_heads(make_cache, world):
    """Each 'rank' caches and attends over kv_heads / world heads; concatenated, they equal the full heads."""
    torch.manual_seed(world)
    batch, kv_heads, groups, d, n = 3, 4, 2, 32, 41
    module = _Attention(groups, d)
    full, parts = make_cache(), [make_cache() for _ in range(world)]
    per = kv_heads // world
    for step in range(6):
        length = n if step == 0 else 1
        q = torch.randn(batch, kv_heads * groups, length, d)
        k, v = torch.randn(batch, kv_heads, length, d), torch.randn(batch, kv_heads, length, d)
        expected = _attend(full, module, 0, q, k, v)
        outs = [_attend(part, module, 0, q[:, r * per * groups:(r + 1) * per * groups], k[:, r * per:(r + 1) * per],
                        v[:, r * per:(r + 1) * per]) for r, part in enumerate(parts)]
        torch.testing.assert_close(torch.cat(outs, dim=2), expected, rtol=1e-5, atol=1e-6)
    for r, part in enumerate(parts):
        layer, whole = part.layers[0], full.layers[0]
        assert layer.keys.shape[1] == layer.key_store.shape[1] == per
        assert torch.equal(layer.key_store.decompress(), whole.key_store.decompress()[:, r * per:(r + 1) * per])
    assert sum(part.nbytes for part in parts) == full.nbytes


# (dtype, kv_heads, device) per layer: each layer's storage must follow its own keys.
_LAYERS = [(torch.float32, 2, "cpu"), (torch.bfloat16, 3, "meta"), (torch.float16, 1, "cpu")]


@pytest.mark.parametrize("make_cache", [
    lambda: mustafar.MustafarCache(0.5, 0.5, window=4, chunk=8),
    lambda: mustafar.StaticMustafarCache(max_tokens=40, window=4),
    lambda: mustafar.StaticMustafarCache(transformers.LlamaConfig(num_hidden_layers=3), batch_size=2,
                                         max_tokens=40, window=4, dtype=None, device="cpu"),
], ids=["MustafarCache", "StaticMustafarCache", "StaticMustafarCache-config"])
def test_each_layer_follows_its_own_keys(make_cache):
    cache = make_cache()
    if isinstance(cache, mustafar.StaticMustafarCache) and cache.layers:  # device="cpu" given: no meta layer
        layers = [(dtype, heads, "cpu") for dtype, heads, _ in _LAYERS]
    else:
        layers = _LAYERS
    assert cache.allocated_nbytes == 0
    for step in (20, 1):
        for i, (dtype, heads, device) in enumerate(layers):
            k = torch.randn(2, heads, step, 16).to(dtype=dtype, device=device)
            cache.update(k, k.clone(), i)
            cache.layers[i].consume()  # as the "mustafar" attention would
    for layer, (dtype, heads, device) in zip(cache.layers, layers, strict=True):
        for tensor in (layer.keys, layer.values, *layer.key_store.storage, *layer.value_store.storage):
            assert tensor.device.type == device and tensor.shape[1] == heads
        assert layer.keys.dtype == layer.key_store.dtype == layer.value_store.dtype == dtype
        assert layer.get_seq_length() == 21
    assert cache.allocated_nbytes >= cache.nbytes > 0
