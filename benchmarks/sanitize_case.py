"""One small call of each CUDA kernel, for ``compute-sanitizer --tool memcheck`` (issue 7; FP8 kept values: issue 15)."""

import torch

from mustafar import compress
from mustafar.format import BitmapKV
from mustafar.ops import compress_into, sparse_decode_attention

torch.manual_seed(0)
FP8 = torch.float8_e4m3fn
for dtype, d, kept in ((torch.float16, 128, None), (torch.bfloat16, 64, None), (torch.float16, 128, FP8),
                       (torch.bfloat16, 64, FP8)):
    q = torch.randn(2, 8, 1, d, device="cuda", dtype=dtype)
    keys = compress(torch.randn(2, 2, 333, d, device="cuda", dtype=dtype), 0.7, kept_dtype=kept)
    values = compress(torch.randn(2, 2, 333, d, device="cuda", dtype=dtype), 0.5, kept_dtype=kept)  # K != V counts
    kw = torch.randn(2, 2, 21, d, device="cuda", dtype=dtype)
    vw = torch.randn(2, 2, 21, d, device="cuda", dtype=dtype)
    mask = torch.rand(2, 1, 1, 354, device="cuda") > 0.2
    out = sparse_decode_attention(q, keys, values, kw, vw, backend="cuda", attention_mask=mask)
    out2 = sparse_decode_attention(q, keys, values, kw, vw, backend="cuda")
    store = BitmapKV.empty(2, 2, d, 0.5, dtype, "cuda", capacity=100, kept_dtype=kept)
    compress_into(torch.randn(2, 2, 77, d, device="cuda", dtype=dtype), 0.5, *store.storage, 3, backend="cuda",
                  scales=store.scale_storage)
    torch.cuda.synchronize()
    print(dtype, d, kept, "finite:", bool(torch.isfinite(out).all() and torch.isfinite(out2).all()))
