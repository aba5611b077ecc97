// Prune + compress kernel for fp16/bf16 rows, CUDA C++ (sm_80+). Bit-identical to
// mustafar.reference.compress_reference, NaN entries included (they rank above every magnitude, lower channels
// first, as the reference's sort orders them; a row never keeps more than k_keep).
//
// Rule (Mustafar, arXiv 2505.22913): keep the k_keep entries of largest |x| per row, ties to the lower channel.
// One thread per row: the row sits in registers as packed pairs; the k_keep-th largest magnitude is found by
// bisection over its 15-bit pattern, counting with packed half2 comparisons (one compare and one add per pair
// of channels per bit); then the kept entries are written in channel order with the bitmap. Rows are staged
// through shared memory so that global reads and writes are coalesced.
//
// FP8 kept values (issue 15, the rule of mustafar/fp8.py, bit-identical to compress_reference followed by
// quantize_kept): the same selection; each kept value is written as e4m3 bits over one scale per row, in the
// cache dtype: NaN if the row holds a non-finite entry (one is then kept), 0 if it is all zero, else
// max(round(float32(amax) / 448), smallest normal); the values are e4m3(clamp(float32(x) / scale, -448, 448))
// rounded to nearest even (x / 1 for a zero scale), 0x7F (torch's NaN) throughout a row of NaN scale.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "kernels.h"

namespace {

constexpr int kRowsPerCta = 128;
constexpr int kPad = 16;  // bytes of padding per staged input row: keeps 16-byte alignment, spreads banks

template <typename T>
struct Packed;

template <>
struct Packed<__half> {
  __device__ static float count(uint32_t acc) {
    const __half2 h = *reinterpret_cast<const __half2*>(&acc);
    return __low2float(h) + __high2float(h);
  }
  __device__ static uint32_t add_ge(uint32_t acc, uint32_t x, uint32_t c) {
    __half2 r = __hadd2(*reinterpret_cast<__half2*>(&acc),
                        __hge2(__habs2(*reinterpret_cast<__half2*>(&x)), *reinterpret_cast<__half2*>(&c)));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static uint32_t add_gt(uint32_t acc, uint32_t x, uint32_t c) {
    __half2 r = __hadd2(*reinterpret_cast<__half2*>(&acc),
                        __hgt2(__habs2(*reinterpret_cast<__half2*>(&x)), *reinterpret_cast<__half2*>(&c)));
    return *reinterpret_cast<uint32_t*>(&r);
  }
};

template <>
struct Packed<__nv_bfloat16> {
  __device__ static float count(uint32_t acc) {
    const __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&acc);
    return __low2float(h) + __high2float(h);
  }
  __device__ static uint32_t add_ge(uint32_t acc, uint32_t x, uint32_t c) {
    __nv_bfloat162 r = __hadd2(*reinterpret_cast<__nv_bfloat162*>(&acc),
                               __hge2(__habs2(*reinterpret_cast<__nv_bfloat162*>(&x)), *reinterpret_cast<__nv_bfloat162*>(&c)));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static uint32_t add_gt(uint32_t acc, uint32_t x, uint32_t c) {
    __nv_bfloat162 r = __hadd2(*reinterpret_cast<__nv_bfloat162*>(&acc),
                               __hgt2(__habs2(*reinterpret_cast<__nv_bfloat162*>(&x)), *reinterpret_cast<__nv_bfloat162*>(&c)));
    return *reinterpret_cast<uint32_t*>(&r);
  }
};

// The FP8 scale rule's constants in the cache dtype T (15-bit magnitude patterns of +inf and of the smallest
// normal, the NaN that torch writes) and its conversions.
template <typename T>
struct Fp8Rule;

template <>
struct Fp8Rule<__half> {
  static constexpr uint32_t kInf = 0x7c00u, kTiny = 0x0400u, kNan = 0x7e00u;
  __device__ static float to_float(uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
  __device__ static uint32_t round(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

template <>
struct Fp8Rule<__nv_bfloat16> {
  static constexpr uint32_t kInf = 0x7f80u, kTiny = 0x0080u, kNan = 0x7fc0u;
  __device__ static float to_float(uint32_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits)));
  }
  __device__ static uint32_t round(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

constexpr float kE4m3Max = 448.0f;  // e4m3's largest finite value: a row's largest kept |x| maps to it
constexpr uint8_t kE4m3Nan = 0x7f;  // torch's float8_e4m3fn NaN

// Scale bits of a row whose largest 15-bit magnitude pattern is amax (NaN patterns above +inf's).
template <typename T>
__device__ __forceinline__ uint32_t fp8_scale(uint32_t amax) {
  if (amax >= Fp8Rule<T>::kInf) return Fp8Rule<T>::kNan;
  if (amax == 0u) return 0u;
  return max(Fp8Rule<T>::round(__fdiv_rn(Fp8Rule<T>::to_float(amax), kE4m3Max)), Fp8Rule<T>::kTiny);
}

// e4m3 bits of one kept value x (T bits) over its row's divisor (the scale, or 1 for a zero scale).
template <typename T>
__device__ __forceinline__ uint8_t fp8_quantize(uint32_t x, float divisor, bool nan_row) {
  if (nan_row) return kE4m3Nan;  // x / NaN: NaN, torch's 0x7F (the conversion below never sees a NaN)
  const float y = fminf(fmaxf(__fdiv_rn(Fp8Rule<T>::to_float(x), divisor), -kE4m3Max), kE4m3Max);
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3));
}

// Count of channels with |x| >= c (GE) or > c (!GE), c a 15-bit magnitude pattern (|.| folds into HSET2).
template <typename T, int PAIRS, bool GE>
__device__ __forceinline__ int count_magnitudes(const uint32_t (&raw)[PAIRS], uint32_t c) {
  const uint32_t c2 = c | (c << 16);
  uint32_t acc[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < PAIRS; ++i)
    acc[i & 3] = GE ? Packed<T>::add_ge(acc[i & 3], raw[i], c2) : Packed<T>::add_gt(acc[i & 3], raw[i], c2);
  return static_cast<int>(Packed<T>::count(acc[0]) + Packed<T>::count(acc[1]) + Packed<T>::count(acc[2]) +
                          Packed<T>::count(acc[3]));
}

template <typename T, int D, bool FP8>
__global__ void __launch_bounds__(kRowsPerCta) compress_kernel(const __grid_constant__ CompressParams p) {
  using Val = std::conditional_t<FP8, uint8_t, uint16_t>;  // a kept value: T bits, or e4m3 bits
  constexpr int kPairs = D / 2, kChunks = D / 8, kWords = D / 32;
  constexpr int kRowBytes = D * 2 + kPad;
  extern __shared__ __align__(16) char smem[];
  const int bh = blockIdx.y, t0 = blockIdx.x * kRowsPerCta;
  const int b = bh / p.kv_heads, h = bh % p.kv_heads;
  const int rows = min(kRowsPerCta, p.tokens - t0);
  const uint16_t* x = p.x + b * p.x_sb + h * p.x_sh + (long long)t0 * p.x_st;
  long long out_row = t0;  // first output row of this CTA
  if (p.position) {        // static decode eviction of one ring slot
    const long long pos = *p.position;
    if (pos < p.window || pos - p.window >= p.capacity) return;
    x = p.x + b * p.x_sb + h * p.x_sh + (pos % p.window) * p.x_st;
    out_row = pos - p.window;
  }
  for (int c = threadIdx.x; c < rows * kChunks; c += kRowsPerCta) {
    const int r = c / kChunks, col = c % kChunks;
    *reinterpret_cast<uint4*>(smem + r * kRowBytes + col * 16) =
        *reinterpret_cast<const uint4*>(x + r * p.x_st + col * 8);
  }
  __syncthreads();
  const int r = threadIdx.x, k_keep = p.k_keep;
  const char* row = smem + r * kRowBytes;
  Val* out_vals = reinterpret_cast<Val*>(smem + kRowsPerCta * kRowBytes);
  uint32_t* out_bits =
      reinterpret_cast<uint32_t*>(smem + kRowsPerCta * kRowBytes + kRowsPerCta * k_keep * sizeof(Val) + 16);
  if (r < rows) {
    uint32_t raw[kPairs];
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const uint4 v = *reinterpret_cast<const uint4*>(row + i * 16);
      raw[4 * i] = v.x, raw[4 * i + 1] = v.y, raw[4 * i + 2] = v.z, raw[4 * i + 3] = v.w;
    }
    // The row's largest magnitude pattern (FP8's scale) and its NaN count; the NaNs are kept first, lower
    // channels first (the reference's sort ranks them above every magnitude; the counts below, half comparisons,
    // never count them), the other entries fill the k_sel remaining places: never more than k_keep in a row.
    uint32_t amax = 0u;
    int n_nan = 0;
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      const uint32_t lo = raw[i] & 0x7fffu, hi = (raw[i] >> 16) & 0x7fffu;
      amax = max(amax, max(lo, hi));
      n_nan += (lo > Fp8Rule<T>::kInf) + (hi > Fp8Rule<T>::kInf);
    }
    const int k_sel = max(k_keep - n_nan, 0);
    uint32_t threshold = 0;
#pragma unroll 1
    for (int bit = 14; bit >= 0; --bit) {
      const uint32_t candidate = threshold | (1u << bit);
      if (count_magnitudes<T, kPairs, true>(raw, candidate) >= k_sel) threshold = candidate;
    }
    // Ties at the threshold beyond what fits go to the higher channels: keep the first `room` of them.
    int room = k_sel - count_magnitudes<T, kPairs, false>(raw, threshold);
    int nan_room = k_keep;  // the NaNs kept, lower channels first
    float divisor = 1.0f;
    if constexpr (FP8) {
      const uint32_t scale = fp8_scale<T>(amax);
      p.scales[b * p.s_sb + h * p.s_sh + out_row + r] = static_cast<uint16_t>(scale);
      if (scale != 0u) divisor = Fp8Rule<T>::to_float(scale);
    }
    Val* dst = out_vals + r * k_keep;
    uint32_t words[kWords];
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = 0u;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const uint4 v4 = *reinterpret_cast<const uint4*>(row + i * 16);
      const uint32_t v[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int d = 8 * i + j;
        const uint32_t bits = v[j >> 1] >> (16 * (j & 1));
        const uint32_t m = bits & 0x7fffu;
        bool keep;
        if (m > Fp8Rule<T>::kInf) {
          keep = nan_room > 0;
          nan_room -= keep;
        } else {
          keep = m > threshold;
          if (m == threshold && room > 0) {
            keep = true;
            --room;
          }
        }
        if (keep) {
          if constexpr (FP8)
            *dst++ = fp8_quantize<T>(bits & 0xffffu, divisor, amax >= Fp8Rule<T>::kInf);
          else
            *dst++ = static_cast<uint16_t>(bits);
          words[d >> 5] |= 1u << (d & 31);
        }
      }
    }
#pragma unroll
    for (int w = 0; w < kWords; ++w) out_bits[r * kWords + w] = words[w];
  }
  __syncthreads();
  Val* vals = reinterpret_cast<Val*>(p.vals) + b * p.v_sb + h * p.v_sh + out_row * k_keep;
  for (int i = threadIdx.x; i < rows * k_keep; i += kRowsPerCta) vals[i] = out_vals[i];
  uint32_t* bits = p.bits + b * p.b_sb + h * p.b_sh + out_row * kWords;
  for (int i = threadIdx.x; i < rows * kWords; i += kRowsPerCta) bits[i] = out_bits[i];
}

template <typename T, int D, bool FP8>
cudaError_t launch_compress(const CompressParams& p, cudaStream_t stream) {
  const int val_bytes = FP8 ? 1 : 2;
  const int smem =
      kRowsPerCta * (D * 2 + kPad) + kRowsPerCta * p.k_keep * val_bytes + 16 + kRowsPerCta * (D / 32) * 4;
  auto kernel = compress_kernel<T, D, FP8>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.tokens + kRowsPerCta - 1) / kRowsPerCta, p.batch * p.kv_heads);
  kernel<<<grid, kRowsPerCta, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

extern "C" int mustafar_compress_launch(const CompressParams* p, int dtype_bf16, int head_dim, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p->tokens == 0) return 0;
  cudaError_t err = cudaErrorInvalidValue;
  if (p->fp8) {
    if (head_dim == 128) {
      err = dtype_bf16 ? launch_compress<__nv_bfloat16, 128, true>(*p, s) : launch_compress<__half, 128, true>(*p, s);
    } else if (head_dim == 64) {
      err = dtype_bf16 ? launch_compress<__nv_bfloat16, 64, true>(*p, s) : launch_compress<__half, 64, true>(*p, s);
    }
  } else if (head_dim == 128) {
    err = dtype_bf16 ? launch_compress<__nv_bfloat16, 128, false>(*p, s) : launch_compress<__half, 128, false>(*p, s);
  } else if (head_dim == 64) {
    err = dtype_bf16 ? launch_compress<__nv_bfloat16, 64, false>(*p, s) : launch_compress<__half, 64, false>(*p, s);
  }
  return static_cast<int>(err);
}
