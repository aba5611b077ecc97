// Torch binding of the mustafar CUDA decode kernels (decode.cu); compiled at first use on CUDA machines.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include "kernels.h"

namespace {

const uint16_t* half_ptr(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "mustafar CUDA ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace

// query [B, Hq, Lq, D]; values [B, Hkv, cap, k_keep]; bitmaps int32 view [B, Hkv, cap, D/32];
// windows [B, Hkv, W, D] or empty; mask bool [B, Hq, Lq, total] (any broadcast strides, last stride 1) or empty.
// FP8 kept values: kv / vv uint8 views of the e4m3 values, ks / vs the scales [B, Hkv, cap] (cache dtype, tokens
// contiguous); empty ks / vs: kept values in the cache dtype.
void decode(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& kb, const torch::Tensor& vv,
            const torch::Tensor& vb, const torch::Tensor& kw, const torch::Tensor& vw, const torch::Tensor& mask,
            torch::Tensor& part_o, torch::Tensor& part_m, torch::Tensor& part_l, torch::Tensor& out, int64_t n_comp,
            int64_t tokens_per_split, int64_t n_splits, double scale_log2e, const torch::Tensor& length,
            int64_t window, const torch::Tensor& ks, const torch::Tensor& vs) {
  const c10::cuda::CUDAGuard device_guard(q.device());  // launch on the tensors' device, not the current one
  DecodeParams p{};
  p.q = half_ptr(q);
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.kv = half_ptr(kv), p.kv_sb = kv.stride(0), p.kv_sh = kv.stride(1);
  p.kb = reinterpret_cast<const uint32_t*>(kb.data_ptr()), p.kb_sb = kb.stride(0), p.kb_sh = kb.stride(1);
  p.vv = half_ptr(vv), p.vv_sb = vv.stride(0), p.vv_sh = vv.stride(1);
  p.vb = reinterpret_cast<const uint32_t*>(vb.data_ptr()), p.vb_sb = vb.stride(0), p.vb_sh = vb.stride(1);
  const bool has_window = kw.numel() > 0;
  p.kw = has_window ? half_ptr(kw) : p.q;
  p.vw = has_window ? half_ptr(vw) : p.q;
  if (has_window) {
    p.kw_sb = kw.stride(0), p.kw_sh = kw.stride(1), p.kw_st = kw.stride(2);
    p.vw_sb = vw.stride(0), p.vw_sh = vw.stride(1), p.vw_st = vw.stride(2);
  }
  if (mask.numel() > 0) {
    p.mask = reinterpret_cast<const uint8_t*>(mask.data_ptr());
    p.m_sb = mask.stride(0), p.m_sh = mask.stride(1), p.m_sl = mask.stride(2);
  }
  p.part_o = part_o.data_ptr<float>(), p.part_m = part_m.data_ptr<float>(), p.part_l = part_l.data_ptr<float>();
  if (ks.numel() > 0) {
    TORCH_CHECK(vs.numel() > 0 && kv.element_size() == 1 && vv.element_size() == 1 && ks.stride(2) == 1 &&
                    vs.stride(2) == 1, "FP8 decode needs uint8 K and V values and both scales with tokens contiguous");
    p.fp8 = 1;
    p.ks = half_ptr(ks), p.ks_sb = ks.stride(0), p.ks_sh = ks.stride(1);
    p.vs = half_ptr(vs), p.vs_sb = vs.stride(0), p.vs_sh = vs.stride(1);
  }
  const int64_t heads = q.size(1), kv_heads = kv.size(1);
  p.kv_heads = kv_heads;
  p.group = heads / kv_heads;
  p.q_len = q.size(2);
  p.k_keep = kv.size(3);
  p.v_keep = vv.size(3);
  p.n_comp = n_comp;
  p.n_win = has_window ? kw.size(2) : 0;
  p.tokens_per_split = tokens_per_split;
  p.n_splits = n_splits;
  p.scale_log2e = static_cast<float>(scale_log2e);
  if (length.numel() > 0) {
    TORCH_CHECK(length.scalar_type() == torch::kLong && length.is_cuda(), "length must be a CUDA int64 tensor");
    p.length = reinterpret_cast<const long long*>(length.data_ptr<int64_t>());
    p.window = window;
    p.n_win = window;
  }
  const int parts = part_m.size(0), batch_heads = q.size(0) * kv_heads;
  const int bf16 = q.scalar_type() == torch::kBFloat16;
  void* stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  check(mustafar_decode_launch(&p, bf16, q.size(3), parts, batch_heads, stream), "decode kernel");
  check(mustafar_merge_launch(p.part_o, p.part_m, p.part_l, out.data_ptr(), bf16, out.stride(0), out.stride(1),
                              out.stride(2), kv_heads, p.group, p.q_len, parts, q.size(3), batch_heads, stream),
        "merge kernel");
}

// x [B, Hkv, n, D] (last dim contiguous, rows 16-byte aligned); values [B, Hkv, n, k_keep] and bitmaps as int32
// [B, Hkv, n, D/32], both with contiguous rows (views into a store at a token offset). FP8 kept values: values a
// uint8 view of the e4m3 store and scales [B, Hkv, n] in x's dtype (tokens contiguous); otherwise scales is empty.
void compress(const torch::Tensor& x, torch::Tensor& values, torch::Tensor& bitmaps, const torch::Tensor& position,
              int64_t window, torch::Tensor& scales) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  CompressParams p{};
  p.x = half_ptr(x), p.x_sb = x.stride(0), p.x_sh = x.stride(1), p.x_st = x.stride(2);
  p.vals = reinterpret_cast<uint16_t*>(values.data_ptr()), p.v_sb = values.stride(0), p.v_sh = values.stride(1);
  p.bits = reinterpret_cast<uint32_t*>(bitmaps.data_ptr()), p.b_sb = bitmaps.stride(0), p.b_sh = bitmaps.stride(1);
  p.batch = x.size(0), p.kv_heads = x.size(1), p.tokens = x.size(2), p.k_keep = values.size(3);
  if (values.scalar_type() == torch::kByte) {  // e4m3 bits
    TORCH_CHECK(scales.scalar_type() == x.scalar_type() && scales.dim() == 3 && scales.size(2) == values.size(2) &&
                    scales.stride(2) == 1,
                "FP8 compress needs scales [B, Hkv, tokens] of x's dtype with contiguous tokens");
    p.fp8 = 1;
    p.scales = reinterpret_cast<uint16_t*>(scales.data_ptr()), p.s_sb = scales.stride(0), p.s_sh = scales.stride(1);
  }
  if (position.numel() > 0) {
    TORCH_CHECK(position.scalar_type() == torch::kLong && position.is_cuda(), "position must be a CUDA int64 tensor");
    p.position = reinterpret_cast<const long long*>(position.data_ptr<int64_t>());
    p.window = window;
    p.capacity = values.size(2);
    p.tokens = 1;
  }
  const int bf16 = x.scalar_type() == torch::kBFloat16;
  void* stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  check(mustafar_compress_launch(&p, bf16, x.size(3), stream), "compress kernel");
}

int64_t occupancy(bool bf16, int64_t head_dim, int64_t rows, bool masked, int64_t k_keep, int64_t v_keep, bool fp8) {
  return mustafar_decode_occupancy(bf16, head_dim, rows, masked, k_keep, v_keep, fp8);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("occupancy", &occupancy, "decode CTAs per multiprocessor");
  m.def("decode", &decode, "mustafar sparse decode attention (CUDA)");
  m.def("compress", &compress, "mustafar per-token prune + compress (CUDA)");
}
