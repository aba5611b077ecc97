// Probe for issue 13 (not part of the library): the K side of decode attention, S = scale * K Q^T over the
// bitmap format, computed SIMT with one thread per token row instead of expanding K into mma fragments.
//
// Why: the library's kernel gathers every channel slot with a predicated 16-bit shared-memory load and is bound
// by the shared-memory pipe (ncu: L1/TEX 87 % at s = 0.7). Per-token pruning keeps exactly k_keep entries in
// every row, so a loop over a row's kept entries has the same trip count in every lane: no divergence, and the
// work follows the kept entries, not the 128 slots. Each kept entry costs a bit-iteration step, one 16-bit load
// of the value (lanes read the same rank of consecutive rows: few bank conflicts) and one gather of the GQA
// group's query channel (lanes' j-th kept channels cluster around j * D / k_keep, so the gathers mostly hit
// distinct banks or broadcast). Compare its time with the library kernel's whole decode (K and V) at the same
// shape: if the K side alone takes well under half, a kernel with this K side and an mma V side is worth building.
//
// Layout: values [BH, T, k_keep] fp16 (rows contiguous), bitmap words [BH, T, D/32] uint32 (word j: channels
// 32j..32j+31), q [BH, G, D] fp16 (the group's query rows), out [BH, G, T] fp32. T a multiple of kRows.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kRows = 128;  // token rows per CTA, one per thread
constexpr int kD = 128;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
}

// G query heads per KV head (1, 2, 4 or 8): the query table holds G values per channel, fp16 (QF32 false: one
// 2*G-byte gather and G conversions per kept entry) or fp32 (QF32 true: one 4*G-byte gather, no conversion).
template <int G, bool QF32>
__global__ void __launch_bounds__(kRows) k_scores_simt(const __half* __restrict__ values,
                                                       const uint32_t* __restrict__ bits,
                                                       const __half* __restrict__ q, float* __restrict__ out,
                                                       int tokens, int k_keep, float scale) {
  extern __shared__ __align__(16) char smem[];
  constexpr int kQBytes = kD * G * (QF32 ? 4 : 2);
  __half* q_table = reinterpret_cast<__half*>(smem);                          // [kD][G] (fp16)
  float* q_table32 = reinterpret_cast<float*>(smem);                          // [kD][G] (fp32)
  __half* vals = reinterpret_cast<__half*>(smem + kQBytes);                   // [kRows][k_keep]
  uint32_t* words = reinterpret_cast<uint32_t*>(smem + kQBytes + kRows * k_keep * 2);  // [kRows][4]
  const int bh = blockIdx.y, t0 = blockIdx.x * kRows, tid = threadIdx.x;

  const char* vsrc = reinterpret_cast<const char*>(values + ((long long)bh * tokens + t0) * k_keep);
  const int vbytes = kRows * k_keep * 2;  // a multiple of 16: kRows is
  for (int off = tid * 16; off < vbytes; off += kRows * 16)
    cp_async16(reinterpret_cast<char*>(vals) + off, vsrc + off);
  const char* bsrc = reinterpret_cast<const char*>(bits + ((long long)bh * tokens + t0) * (kD / 32));
  cp_async16(reinterpret_cast<char*>(words) + tid * 16, bsrc + tid * 16);  // one row's 4 words per thread
  asm volatile("cp.async.commit_group;\n" ::);
  for (int i = tid; i < kD * G; i += kRows) {  // transpose [G][kD] -> [kD][G]
    const int h = i / kD, c = i % kD;
    const __half x = q[((long long)bh * G + h) * kD + c];
    if constexpr (QF32) q_table32[c * G + h] = __half2float(x);
    else q_table[c * G + h] = x;
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();

  const uint4 w4 = reinterpret_cast<const uint4*>(words)[tid];
  uint64_t lo = (uint64_t(w4.y) << 32) | w4.x, hi = (uint64_t(w4.w) << 32) | w4.z;
  float acc[G];
#pragma unroll
  for (int h = 0; h < G; ++h) acc[h] = 0.f;
  const __half* row = vals + tid * k_keep;
#pragma unroll 4
  for (int j = 0; j < k_keep; ++j) {
    const bool use_lo = lo != 0ull;
    uint64_t w = use_lo ? lo : hi;
    const int c = __ffsll(static_cast<long long>(w)) - 1 + (use_lo ? 0 : 64);
    w &= w - 1ull;
    lo = use_lo ? w : lo;
    hi = use_lo ? hi : w;
    const float v = __half2float(row[j]);
    if constexpr (QF32) {
#pragma unroll
      for (int h = 0; h < G; ++h) acc[h] += v * q_table32[c * G + h];  // vectorised: one 4*G-byte load
    } else if constexpr (G == 1) {
      acc[0] += v * __half2float(q_table[c]);
    } else if constexpr (G == 2) {
      const float2 qf = __half22float2(reinterpret_cast<const __half2*>(q_table)[c]);
      acc[0] += v * qf.x, acc[1] += v * qf.y;
    } else {
#pragma unroll
      for (int p = 0; p < G / 4; ++p) {
        const uint2 raw = reinterpret_cast<const uint2*>(q_table)[c * (G / 4) + p];  // 4 halves
        const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
        const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
        acc[4 * p] += v * a.x, acc[4 * p + 1] += v * a.y, acc[4 * p + 2] += v * b.x, acc[4 * p + 3] += v * b.y;
      }
    }
  }
#pragma unroll
  for (int h = 0; h < G; ++h) out[((long long)bh * G + h) * tokens + t0 + tid] = acc[h] * scale;
}

}  // namespace

// Launch for torch: values fp16 [BH, T, k_keep], bits int32 [BH, T, 4], q fp16 [BH, G, 128], out fp32 [BH, G, T].
// q_f32: the fp32 query table variant.
int k_scores_simt_launch(const void* values, const void* bits, const void* q, float* out, int bh, int tokens,
                         int k_keep, int group, float scale, bool q_f32, cudaStream_t stream) {
  if (tokens % kRows) return static_cast<int>(cudaErrorInvalidValue);
  const int smem = kD * group * (q_f32 ? 4 : 2) + kRows * k_keep * 2 + kRows * 16;
  const dim3 grid(tokens / kRows, bh);
  const auto* v = static_cast<const __half*>(values);
  const auto* b = static_cast<const uint32_t*>(bits);
  const auto* qq = static_cast<const __half*>(q);
#define MUSTAFAR_PROBE_LAUNCH_Q(GG, QQ)                                                                \
  do {                                                                                                 \
    cudaFuncSetAttribute(k_scores_simt<GG, QQ>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);   \
    k_scores_simt<GG, QQ><<<grid, kRows, smem, stream>>>(v, b, qq, out, tokens, k_keep, scale);         \
  } while (0)
#define MUSTAFAR_PROBE_LAUNCH(GG)            \
  do {                                       \
    if (q_f32) MUSTAFAR_PROBE_LAUNCH_Q(GG, true);  \
    else MUSTAFAR_PROBE_LAUNCH_Q(GG, false); \
  } while (0)
  switch (group) {
    case 1: MUSTAFAR_PROBE_LAUNCH(1); break;
    case 2: MUSTAFAR_PROBE_LAUNCH(2); break;
    case 4: MUSTAFAR_PROBE_LAUNCH(4); break;
    case 8: MUSTAFAR_PROBE_LAUNCH(8); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
#undef MUSTAFAR_PROBE_LAUNCH
#undef MUSTAFAR_PROBE_LAUNCH_Q
  return static_cast<int>(cudaGetLastError());
}
