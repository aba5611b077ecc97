// Fused sparse decode attention over the mustafar bitmap format, CUDA C++ (sm_80+; tuned on H200).
//
// Method: Mustafar, arXiv 2505.22913 (per-token magnitude pruning; attention on the compressed cache).
// Format (mustafar/format.py): values [B, Hkv, cap, k_keep] (kept entries in ascending channel order, rows
// contiguous), bitmaps [B, Hkv, cap, D/64] int64 read here as uint32 words (little endian: word j holds
// channels 32j..32j+31). `cap` is a multiple of 16, so every 16-token tile that starts below the token count
// lies inside the allocation and is staged whole; rows past the count are masked.
//
// Work layout: grid = (parts, B * Hkv); a CTA of 4 warps handles one split of the token axis of one
// (batch, kv_head) with all query rows of its GQA group (rows = group * q_len <= 16) as one m16 tile, so each
// compressed row is read once for the whole group. Each warp walks its own 16-token tiles (lo + 16 * warp +
// 64 * i) with its own online softmax (fp32); the warps merge through shared memory at the end and write an
// unnormalised partial (m, l, O) per part. The last part covers the dense local window when there is one.
// `merge_kernel` combines the parts.
//
// Expansion costs a bit test per channel and one shared-memory load per kept entry: the mma.sync m16n8k16
// fragments give each thread a contiguous run of channels of a token. For S = Q K^T (B operand = K^T) thread
// (g, t) of a warp owns channels [t D/4, (t+1) D/4) of tokens g and g + 8; for O = P V (B operand = V) it owns
// channels [g D/8, (g+1) D/8) of tokens 2t, 2t+1, 2t+8, 2t+9. Inside a k-block the channel order is permuted
// the same way for Q, so a thread finds the start of its values with the row's prefix count of the earlier
// bitmap words (computed once per row and tile) plus at most one popcount, then walks its kept entries.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels.h"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 16;  // tokens per warp step
constexpr int kRows = 16;  // query rows per CTA (one m16 tile)
// Staging depth per warp and the CTAs per multiprocessor the register budget is sized for (4: 128 registers a
// thread). Measured on the H200 (benchmarks/kernel_variants.py, 2026-12-03): 5 CTAs (96 registers) and 3 stages
// were slower at 8 x 32k and 32 x 32k. Overridable at build time for tuning runs.
#ifndef MUSTAFAR_DECODE_STAGES
#define MUSTAFAR_DECODE_STAGES 2
#endif
#ifndef MUSTAFAR_DECODE_MIN_CTAS
#define MUSTAFAR_DECODE_MIN_CTAS 4
#endif
constexpr int kStages = MUSTAFAR_DECODE_STAGES;
constexpr int kMinCtasPerSm = MUSTAFAR_DECODE_MIN_CTAS;
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);

template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}


// 16-bit load from shared memory by 32-bit shared-window address (no generic-pointer arithmetic in the loops).
__device__ __forceinline__ uint32_t lds_u16(uint32_t addr) {
  unsigned short v;
  asm("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}

// 8-bit load from shared memory (an FP8 kept value), zero-extended.
__device__ __forceinline__ uint32_t lds_u8(uint32_t addr) {
  uint32_t v;
  asm("ld.shared.u8 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

// Two e4m3 values (low byte: first) -> f16x2, exactly (every e4m3 value is an fp16 value; 0x7f/0xff -> NaN).
// sm_89+: the launcher never runs an FP8 variant on older devices (launch/cuda.py).
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t pair) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t out;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(out) : "h"(static_cast<unsigned short>(pair)));
  return out;
#else
  __trap();
  return 0u;
#endif
}

template <typename T>
__device__ __forceinline__ uint32_t e4m3x2_to(uint32_t pair);

template <>
__device__ __forceinline__ uint32_t e4m3x2_to<__half>(uint32_t pair) {
  return e4m3x2_to_f16x2(pair);
}

template <>
__device__ __forceinline__ uint32_t e4m3x2_to<__nv_bfloat16>(uint32_t pair) {
  const uint32_t h = e4m3x2_to_f16x2(pair);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  return pack2<__nv_bfloat16>(f.x, f.y);  // exact: e4m3 values are bf16 values
}

template <typename T>
__device__ __forceinline__ float to_float(uint16_t bits);

template <>
__device__ __forceinline__ float to_float<__half>(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

// The kept values of the compressed rows: the cache dtype (2 bytes) or e4m3 (1 byte, issue 15). `pair` packs the
// values of two loads (low first) into one 32-bit mma operand register of dtype T.
template <bool F8>
struct Kept;

template <>
struct Kept<false> {
  static constexpr int kBytes = 2;
  __device__ static uint32_t load(uint32_t addr) { return lds_u16(addr); }
  template <typename T>
  __device__ static uint32_t pair(uint32_t lo, uint32_t hi) { return __byte_perm(lo, hi, 0x5410); }
};

template <>
struct Kept<true> {
  static constexpr int kBytes = 1;
  __device__ static uint32_t load(uint32_t addr) { return lds_u8(addr); }
  template <typename T>
  __device__ static uint32_t pair(uint32_t lo, uint32_t hi) { return e4m3x2_to<T>(lo | (hi << 8)); }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 2^x for x <= 0 or -inf (softmax in log2 units): one MUFU.EX2, flushing denormal results to zero.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Tile staging by the Hopper bulk-copy engine (MUSTAFAR_DECODE_BULK=1, sm_90+): a few lanes issue one
// cp.async.bulk per contiguous piece (K values, V values, the two bitmap blocks, FP8 scales) that completes on the
// stage's mbarrier, instead of 32 lanes copying 16 bytes per cp.async. Off by default until measured (issue 13).
#ifndef MUSTAFAR_DECODE_BULK
#define MUSTAFAR_DECODE_BULK 0
#endif
#if MUSTAFAR_DECODE_BULK && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900)
#define MUSTAFAR_BULK_PATH 1
#else
#define MUSTAFAR_BULK_PATH 0
#endif
// Host-side view of the switch (the shared-memory size includes the stages' mbarriers).
constexpr bool kBulkStaging = MUSTAFAR_DECODE_BULK != 0;

#if MUSTAFAR_BULK_PATH
__device__ __forceinline__ void mbar_init(uint32_t bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar) : "memory");
}

// The one arrival of a phase, announcing `bytes` of bulk copies that complete it.
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void mbar_inval(uint32_t bar) {
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory, completing on `bar`.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, int bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}

// Orders this thread's earlier shared-memory accesses before later bulk copies (the async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#endif

// Copy `bytes` (a multiple of 16, both sides 16-byte aligned) with the 32 lanes of a warp.
__device__ __forceinline__ void stage_copy(char* dst, const char* src, int bytes, int lane) {
#pragma unroll 1
  for (int off = lane * 16; off < bytes; off += 32 * 16) cp_async16(dst + off, src + off);
}

// Row padding of the staged values (issue 13): rows whose byte count is a power of two of 32 or more start every
// row of a 16-token tile in the same shared-memory banks, so the lanes that read the same rank of different rows
// (the mma fragments read tokens g, g + 8 and 2t, 2t + 1, ...) collide: 8-way at s = 0.5 (fp16, head_dim 128:
// 128-byte rows). Such rows are staged 16 bytes apart (stride = bytes + 16), which spreads the rows over the banks.
#ifndef MUSTAFAR_DECODE_PAD
#define MUSTAFAR_DECODE_PAD 1
#endif

// Bytes between staged rows of `row_bytes` bytes (see MUSTAFAR_DECODE_PAD).
__host__ __device__ __forceinline__ int padded_stride(int row_bytes) {
  const bool pow2 = row_bytes >= 32 && row_bytes <= 512 && (row_bytes & (row_bytes - 1)) == 0;
  return (MUSTAFAR_DECODE_PAD && pow2) ? row_bytes + 16 : row_bytes;
}

// Shared memory of one warp stage: K values, V values (K and V may keep different counts: per-K/V sparsity),
// K bitmaps, V bitmaps, K and V row prefix counts, and with FP8 kept values the K and V scales (16 each).
template <int D>
struct Stage {
  static constexpr int kWords = D / 32;
  static constexpr int kBitsBytes = kTile * kWords * 4;
  static constexpr int kPrefixBytes = kTile * 4;
  static constexpr int kScaleBytes = kTile * 2;
  // bytes of one K / V row in global memory (k_keep * kept bytes) and between rows in shared memory
  int k_row, v_row, k_stride, v_stride, scale_bytes;
  __host__ __device__ Stage(int k_keep, int v_keep, bool fp8)
      : k_row(k_keep * (fp8 ? 1 : 2)), v_row(v_keep * (fp8 ? 1 : 2)), k_stride(padded_stride(k_row)),
        v_stride(padded_stride(v_row)), scale_bytes(fp8 ? 2 * kScaleBytes : 0) {}
  // 16 rows: the global tile (a multiple of 16 bytes) and its shared-memory copy
  __host__ __device__ int k_tile() const { return kTile * k_row; }
  __host__ __device__ int v_tile() const { return kTile * v_row; }
  __host__ __device__ int k_bytes() const { return kTile * k_stride; }
  __host__ __device__ int v_bytes() const { return kTile * v_stride; }
  __host__ __device__ int bits_offset() const { return k_bytes() + v_bytes(); }
  __host__ __device__ int prefix_offset() const { return bits_offset() + 2 * kBitsBytes; }
  __host__ __device__ int scale_offset() const { return prefix_offset() + 2 * kPrefixBytes; }
  __host__ __device__ int size() const { return scale_offset() + scale_bytes; }
};

// Copy a tile of 16 rows (`row_bytes` each, `bytes` in all, a multiple of 16) into rows `stride` bytes apart.
// A padded stride only occurs for power-of-two rows of 32-512 bytes, so a lane's 16-byte chunks stay in one row.
__device__ __forceinline__ void stage_rows(char* dst, const char* src, int bytes, int row_bytes, int stride,
                                           int lane) {
  if (stride == row_bytes) {
    stage_copy(dst, src, bytes, lane);
    return;
  }
  const int shift = __ffs(row_bytes) - 1;
#pragma unroll 1
  for (int off = lane * 16; off < bytes; off += 32 * 16) cp_async16(dst + off + ((off >> shift) << 4), src + off);
}

// The packed exclusive prefix counts of a row's bitmap words: byte j = set bits in words 0..j-1.
template <int WORDS>
__device__ __forceinline__ uint32_t prefix_bytes(const uint32_t* words) {
  uint32_t packed = 0, running = 0;
#pragma unroll
  for (int j = 1; j < WORDS && j < 4; ++j) {
    running += __popc(words[j - 1]);
    packed |= running << (8 * j);
  }
  return packed;
}

// The COUNT bits of a row starting at channel `first` (a run inside one word) and the set bits before it.
template <int COUNT>
__device__ __forceinline__ uint32_t run_of(const uint32_t* words, uint32_t prefix, int first, int& before) {
  const int word = first >> 5, shift = first & 31;
  const uint32_t w = words[word];
  before = ((prefix >> (8 * word)) & 0xffu) + (shift ? __popc(w & ((1u << shift) - 1u)) : 0);
  return COUNT == 32 ? w : (w >> shift) & ((1u << COUNT) - 1u);
}

template <typename T, int D, bool MASKED, int NT, bool F8>
struct Decoder {
  using KeptT = Kept<F8>;
  static constexpr int kWords = D / 32;
  static constexpr int kKB = D / 16;   // k-blocks of S^T = K Q^T
  static constexpr int kMT = D / 16;   // m-tiles of O^T = V^T P^T
  static constexpr int kCPTK = D / 4;  // channels per thread, K side (tokens g, g + 8)
  static constexpr int kCPTV = D / 8;  // channels per thread, V side (tokens 2t, 2t+1, 2t+8, 2t+9)

  const DecodeParams& p;
  int lane, g, t;
  int n_comp, n_win;
  uint32_t qb[NT][kKB][2];  // B fragments of Q^T: query row 8 nt + g
  float o[NT][kMT][4];      // O^T C fragments: channel rows (g, g + 8) of m-tile i x query rows 8 nt + 2t + {0, 1}
  float m[NT][2], l[NT][2]; // online softmax of query rows 8 nt + 2t + {0, 1} (l: this thread's tokens only)
  int last_vis[NT][2];
  int min_last_vis;
  long long mask_off[NT][2];

  __device__ Decoder(const DecodeParams& params, int b, int h) : p(params) {
    lane = threadIdx.x & 31;
    g = lane >> 2;
    t = lane & 3;
    n_comp = p.n_comp, n_win = p.n_win;
    if (p.length) {
      const int held = static_cast<int>(*p.length);
      n_comp = min(max(0, held - p.window), p.n_comp);
      n_win = min(held, p.window);
    }
    const int total = n_comp + n_win, rows = p.group * p.q_len;
    min_last_vis = total - p.q_len;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = 8 * nt + 2 * t + j;
        const bool ok = r < rows;
        const int head = h * p.group + (ok ? r / p.q_len : 0);
        const int qi = ok ? r % p.q_len : 0;
        last_vis[nt][j] = total - p.q_len + qi;
        mask_off[nt][j] = MASKED ? b * p.m_sb + head * p.m_sh + qi * p.m_sl : 0;
        m[nt][j] = -INFINITY;
        l[nt][j] = 0.f;
      }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[nt][i][c] = 0.f;
    load_query(b, h, rows);
  }

  // B fragments of Q^T (k-slots 2t, 2t+1 -> channels tD/4 + 4kb + {0,1}; 2t+8, 2t+9 -> + {2,3}; column g).
  __device__ void load_query(int b, int h, int rows) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int r = 8 * nt + g;
      const uint16_t* row = nullptr;
      if (r < rows) row = p.q + b * p.q_sb + (h * p.group + r / p.q_len) * p.q_sh + (r % p.q_len) * p.q_sl;
#pragma unroll
      for (int kb = 0; kb < kKB; ++kb) {
        const int c = kCPTK * t + 4 * kb;
        qb[nt][kb][0] = row ? row[c] | (uint32_t(row[c + 1]) << 16) : 0u;
        qb[nt][kb][1] = row ? row[c + 2] | (uint32_t(row[c + 3]) << 16) : 0u;
      }
    }
  }

  // S^T tile [16 tokens x 8 NT rows] from compressed K rows in shared memory (tokens g and g + 8).
  // FP8: `scales` (the 16 tokens' K scales, cache dtype bits) multiply the scores (S = scale * q . Q).
  __device__ void scores_sparse(float s[NT][4], const void* vals, const uint32_t* bits, const uint32_t* prefix,
                                int valid, int stride, const uint16_t* scales) {
    uint32_t mine[2], src[2];
    const uint32_t base = smem_addr(vals);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = g + 8 * half;
      int x;
      mine[half] = run_of<kCPTK>(bits + row * kWords, prefix[row], kCPTK * t, x);
      if (row >= valid) mine[half] = 0;
      src[half] = base + row * stride + KeptT::kBytes * x;
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[nt][c] = 0.f;
#pragma unroll
    for (int kb = 0; kb < kKB; ++kb) {
      uint32_t v[2][4] = {{0u, 0u, 0u, 0u}, {0u, 0u, 0u, 0u}};
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (mine[half] & (1u << (4 * kb + i))) {
            v[half][i] = KeptT::load(src[half]);
            src[half] += KeptT::kBytes;
          }
        }
      const uint32_t a[4] = {KeptT::template pair<T>(v[0][0], v[0][1]), KeptT::template pair<T>(v[1][0], v[1][1]),
                             KeptT::template pair<T>(v[0][2], v[0][3]), KeptT::template pair<T>(v[1][2], v[1][3])};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma16816<T>(s[nt], a, qb[nt][kb][0], qb[nt][kb][1]);
    }
    if (F8) {  // C layout: s[nt][0..1] token g, s[nt][2..3] token g + 8
      const float s0 = to_float<T>(scales[g]), s1 = to_float<T>(scales[g + 8]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        s[nt][0] *= s0, s[nt][1] *= s0;
        s[nt][2] *= s1, s[nt][3] *= s1;
      }
    }
  }

  // S^T tile from dense window rows in global memory (row stride `stride` elements).
  __device__ void scores_dense(float s[NT][4], const uint16_t* rows, long long stride, int valid) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[nt][c] = 0.f;
    const uint16_t* r0 = rows + g * stride + kCPTK * t;
    const uint16_t* r1 = rows + (g + 8) * stride + kCPTK * t;
    const bool ok0 = g < valid, ok1 = g + 8 < valid;
#pragma unroll
    for (int kb = 0; kb < kKB; ++kb) {
      const int c = 4 * kb;
      const uint32_t a[4] = {ok0 ? r0[c] | (uint32_t(r0[c + 1]) << 16) : 0u,
                             ok1 ? r1[c] | (uint32_t(r1[c + 1]) << 16) : 0u,
                             ok0 ? r0[c + 2] | (uint32_t(r0[c + 3]) << 16) : 0u,
                             ok1 ? r1[c + 2] | (uint32_t(r1[c + 3]) << 16) : 0u};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma16816<T>(s[nt], a, qb[nt][kb][0], qb[nt][kb][1]);
    }
  }

  // Online softmax over the tile (log2 units); rescales O^T and returns P^T's B fragments. SCALED (FP8 V):
  // P^T's entries of tokens g and g + 8 are multiplied by vscale[0] and vscale[1] (O = sum p * scale * q); the
  // running sums l are not.
  template <bool SCALED = false>
  __device__ void softmax(float s[NT][4], int first_pos, int valid, uint32_t pb[NT][2],
                          const float* vscale = nullptr) {
    const bool all_visible = valid == kTile && first_pos + kTile - 1 <= min_last_vis;
    bool rescale = false;
    float alpha[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float x = s[nt][c] * p.scale_log2e;
        if (MASKED || !all_visible) {
          const int tok = g + 8 * (c >> 1), pos = first_pos + tok;
          bool keep = tok < valid && pos <= last_vis[nt][c & 1];
          if (MASKED && keep) keep = p.mask[mask_off[nt][c & 1] + pos] != 0;
          x = keep ? x : -INFINITY;
        }
        s[nt][c] = x;
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float mx = fmaxf(s[nt][j], s[nt][2 + j]);
        mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 16));
        const float m_new = fmaxf(m[nt][j], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        alpha[nt][j] = fast_exp2(m[nt][j] - m_use);
        rescale |= alpha[nt][j] != 1.f;
        m[nt][j] = m_new;
        s[nt][j] = fast_exp2(s[nt][j] - m_use);
        s[nt][2 + j] = fast_exp2(s[nt][2 + j] - m_use);
        l[nt][j] = l[nt][j] * alpha[nt][j] + s[nt][j] + s[nt][2 + j];
      }
    }
    if (__any_sync(kFull, rescale)) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < kMT; ++i)
#pragma unroll
          for (int c = 0; c < 4; ++c) o[nt][i][c] *= alpha[nt][c & 1];
    }
    // P^T B fragment: (tokens 2t, 2t+1 | 2t+8, 2t+9; row g) from the C layout (tokens g, g+8; rows 2t, 2t+1).
    const int src1 = 8 * t + (g >> 1), src2 = src1 + 4;
    const uint32_t sel = (g & 1) ? 0x7632u : 0x5410u;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (SCALED) {
        s[nt][0] *= vscale[0], s[nt][1] *= vscale[0];
        s[nt][2] *= vscale[1], s[nt][3] *= vscale[1];
      }
      const uint32_t lo = pack2<T>(s[nt][0], s[nt][1]), hi = pack2<T>(s[nt][2], s[nt][3]);
      pb[nt][0] = __byte_perm(__shfl_sync(kFull, lo, src1), __shfl_sync(kFull, lo, src2), sel);
      pb[nt][1] = __byte_perm(__shfl_sync(kFull, hi, src1), __shfl_sync(kFull, hi, src2), sel);
    }
  }

  // O^T += V^T P^T for compressed V rows in shared memory (tokens 2t, 2t+1, 2t+8, 2t+9).
  __device__ void accumulate_sparse(const uint32_t pb[NT][2], const void* vals, const uint32_t* bits,
                                    const uint32_t* prefix, int valid, int stride) {
    uint32_t mine[4], src[4];
    const uint32_t base = smem_addr(vals);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int row = 2 * t + (k & 1) + 8 * (k >> 1);
      int x;
      mine[k] = run_of<kCPTV>(bits + row * kWords, prefix[row], kCPTV * g, x);
      if (row >= valid) mine[k] = 0;
      src[k] = base + row * stride + KeptT::kBytes * x;
    }
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
      uint32_t v[4][2] = {{0u, 0u}, {0u, 0u}, {0u, 0u}, {0u, 0u}};
#pragma unroll
      for (int k = 0; k < 4; ++k)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (mine[k] & (1u << (2 * i + j))) {
            v[k][j] = KeptT::load(src[k]);
            src[k] += KeptT::kBytes;
          }
        }
      const uint32_t a[4] = {KeptT::template pair<T>(v[0][0], v[1][0]), KeptT::template pair<T>(v[0][1], v[1][1]),
                             KeptT::template pair<T>(v[2][0], v[3][0]), KeptT::template pair<T>(v[2][1], v[3][1])};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma16816<T>(o[nt][i], a, pb[nt][0], pb[nt][1]);
    }
  }

  // O^T += V^T P^T for dense window rows in global memory.
  __device__ void accumulate_dense(const uint32_t pb[NT][2], const uint16_t* rows, long long stride, int valid) {
    const uint16_t* rv[4];
    bool ok[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int row = 2 * t + (k & 1) + 8 * (k >> 1);
      ok[k] = row < valid;
      rv[k] = rows + row * stride + kCPTV * g;
    }
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
      uint32_t v[4][2];
#pragma unroll
      for (int k = 0; k < 4; ++k)
#pragma unroll
        for (int j = 0; j < 2; ++j) v[k][j] = ok[k] ? rv[k][2 * i + j] : 0u;
      const uint32_t a[4] = {__byte_perm(v[0][0], v[1][0], 0x5410), __byte_perm(v[0][1], v[1][1], 0x5410),
                             __byte_perm(v[2][0], v[3][0], 0x5410), __byte_perm(v[2][1], v[3][1], 0x5410)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma16816<T>(o[nt][i], a, pb[nt][0], pb[nt][1]);
    }
  }
};

// Stage the K and V tiles starting at token `tile` (always 16 whole rows: cap is a multiple of 16).
// FP8: also the tile's K scales (lanes 0-1) and V scales (lanes 2-3), 32 bytes each (`ks`, `vs`: the (b, h) rows).
template <int D, bool F8>
__device__ __forceinline__ void issue_tile(char* st, const Stage<D>& stage, const char* kv, const char* vv,
                                           const char* kb, const char* vb, const char* ks, const char* vs, int tile,
                                           int lane) {
  constexpr int kBits = Stage<D>::kBitsBytes;
  const long long bit_off = (long long)tile * (kBits / kTile);
  stage_rows(st, kv + (long long)tile * stage.k_row, stage.k_tile(), stage.k_row, stage.k_stride, lane);
  stage_rows(st + stage.k_bytes(), vv + (long long)tile * stage.v_row, stage.v_tile(), stage.v_row, stage.v_stride,
             lane);
  if (lane < kBits / 16) {
    cp_async16(st + stage.bits_offset() + lane * 16, kb + bit_off + lane * 16);
    cp_async16(st + stage.bits_offset() + kBits + lane * 16, vb + bit_off + lane * 16);
  }
  if (F8 && lane < 4) {
    const char* src = (lane < 2 ? ks : vs) + (long long)tile * 2 + (lane & 1) * 16;
    cp_async16(st + stage.scale_offset() + lane * 16, src);
  }
  cp_async_commit();
}

#if MUSTAFAR_BULK_PATH
// The bulk-copy form of issue_tile: every lane fences its earlier reads of the stage, lane 0 announces the bytes
// on the stage's mbarrier `bar`, then single lanes copy the pieces (padded rows: one copy per row, 16 lanes each).
template <int D, bool F8>
__device__ __forceinline__ void issue_tile_bulk(char* st, const Stage<D>& stage, const char* kv, const char* vv,
                                                const char* kb, const char* vb, const char* ks, const char* vs,
                                                int tile, int lane, uint32_t bar) {
  constexpr int kBits = Stage<D>::kBitsBytes;
  const long long bit_off = (long long)tile * (kBits / kTile);
  if (MUSTAFAR_DECODE_BULK != 2) fence_proxy_async();  // 2: without the fence (a timing probe only)
  __syncwarp();
  if (lane == 0) mbar_expect(bar, stage.k_tile() + stage.v_tile() + 2 * kBits + (F8 ? 4 * kTile : 0));
  __syncwarp();
  const uint32_t dst = smem_addr(st);
  const char* ksrc = kv + (long long)tile * stage.k_row;
  const char* vsrc = vv + (long long)tile * stage.v_row;
  if (stage.k_stride == stage.k_row) {
    if (lane == 0) bulk_copy(dst, ksrc, stage.k_tile(), bar);
  } else if (lane < kTile) {
    bulk_copy(dst + lane * stage.k_stride, ksrc + lane * stage.k_row, stage.k_row, bar);
  }
  const uint32_t vdst = dst + stage.k_bytes();
  if (stage.v_stride == stage.v_row) {
    if (lane == 1) bulk_copy(vdst, vsrc, stage.v_tile(), bar);
  } else if (lane >= kTile) {
    bulk_copy(vdst + (lane - kTile) * stage.v_stride, vsrc + (lane - kTile) * stage.v_row, stage.v_row, bar);
  }
  if (lane == 2) bulk_copy(dst + stage.bits_offset(), kb + bit_off, kBits, bar);
  if (lane == 3) bulk_copy(dst + stage.bits_offset() + kBits, vb + bit_off, kBits, bar);
  if (F8 && (lane == 4 || lane == 5))
    bulk_copy(dst + stage.scale_offset() + (lane - 4) * 2 * kTile, (lane == 4 ? ks : vs) + (long long)tile * 2,
              2 * kTile, bar);
}
#endif

template <typename T, int D, bool MASKED, int NT, bool F8>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) sparse_decode_kernel(const __grid_constant__ DecodeParams p) {
  extern __shared__ __align__(16) char smem[];
  using Dec = Decoder<T, D, MASKED, NT, F8>;
  const int split = blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.kv_heads, h = bh % p.kv_heads;
  const int warp = threadIdx.x >> 5;
  Dec dec(p, b, h);
  const Stage<D> stage(p.k_keep, p.v_keep, F8);
  char* my_stages = smem + warp * kStages * stage.size();

  if (split < p.n_splits) {
    const int lo = split * p.tokens_per_split;
    const int hi = min(lo + p.tokens_per_split, dec.n_comp);
    // strides in elements of the kept dtype: bytes for FP8, 16-bit words otherwise
    const char* kv = reinterpret_cast<const char*>(p.kv) + (b * p.kv_sb + h * p.kv_sh) * Dec::KeptT::kBytes;
    const char* vv = reinterpret_cast<const char*>(p.vv) + (b * p.vv_sb + h * p.vv_sh) * Dec::KeptT::kBytes;
    const char* kb = reinterpret_cast<const char*>(p.kb + b * p.kb_sb + h * p.kb_sh);
    const char* vb = reinterpret_cast<const char*>(p.vb + b * p.vb_sb + h * p.vb_sh);
    const char* ks = F8 ? reinterpret_cast<const char*>(p.ks + b * p.ks_sb + h * p.ks_sh) : nullptr;
    const char* vs = F8 ? reinterpret_cast<const char*>(p.vs + b * p.vs_sb + h * p.vs_sh) : nullptr;
    // A pipeline of kStages tiles per warp: kStages - 1 tiles in flight while one is computed. Every step commits
    // one cp.async group (empty past the end), so waiting for kStages - 1 pending groups frees the oldest stage.
    constexpr int kStep = kWarps * kTile;
    int tile = lo + warp * kTile;
#if MUSTAFAR_BULK_PATH
    // One mbarrier per stage, after all warps' stages; phase u of stage s completes the u-th tile staged there.
    const uint32_t bars = smem_addr(smem + kWarps * kStages * stage.size()) + warp * kStages * 8;
    if (dec.lane == 0) {
#pragma unroll
      for (int s = 0; s < kStages; ++s) mbar_init(bars + 8 * s);
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncwarp();
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      const int ahead = tile + s * kStep;
      if (ahead < hi)
        issue_tile_bulk<D, F8>(my_stages + s * stage.size(), stage, kv, vv, kb, vb, ks, vs, ahead, dec.lane,
                               bars + 8 * s);
    }
#else
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      const int ahead = tile + s * kStep;
      if (ahead < hi)
        issue_tile<D, F8>(my_stages + s * stage.size(), stage, kv, vv, kb, vb, ks, vs, ahead, dec.lane);
      else cp_async_commit();
    }
#endif
    for (int it = 0; tile < hi; ++it, tile += kStep) {
      const int ahead = tile + (kStages - 1) * kStep;
#if MUSTAFAR_BULK_PATH
      if (ahead < hi) {
        const int next = (it + kStages - 1) % kStages;
        issue_tile_bulk<D, F8>(my_stages + next * stage.size(), stage, kv, vv, kb, vb, ks, vs, ahead, dec.lane,
                               bars + 8 * next);
      }
      mbar_wait(bars + 8 * (it % kStages), (it / kStages) & 1);
#else
      if (ahead < hi) {
        issue_tile<D, F8>(my_stages + ((it + kStages - 1) % kStages) * stage.size(), stage, kv, vv, kb, vb, ks, vs,
                          ahead, dec.lane);
      } else {
        cp_async_commit();
      }
      cp_async_wait<kStages - 1>();
      __syncwarp();
#endif
      char* st = my_stages + (it % kStages) * stage.size();
      const char* kvals = st;
      const char* vvals = st + stage.k_bytes();
      const uint32_t* kbits = reinterpret_cast<const uint32_t*>(st + stage.bits_offset());
      const uint32_t* vbits = kbits + kTile * Stage<D>::kWords;
      uint32_t* prefix = reinterpret_cast<uint32_t*>(st + stage.prefix_offset());
      const uint16_t* kscales = reinterpret_cast<const uint16_t*>(st + stage.scale_offset());
      // Lanes 0-15 count the K rows' words, lanes 16-31 the V rows'.
      prefix[dec.lane] = prefix_bytes<Stage<D>::kWords>(kbits + dec.lane * Stage<D>::kWords);
      __syncwarp();
      const int valid = min(kTile, hi - tile);
      float s[NT][4];
      uint32_t pb[NT][2];
      dec.scores_sparse(s, kvals, kbits, prefix, valid, stage.k_stride, kscales);
      if (F8) {  // V scales of tokens g and g + 8; 0 past the count (rows there are not data: no NaN from them)
        const uint16_t* vscales = kscales + kTile;
        const float vscale[2] = {dec.g < valid ? to_float<T>(vscales[dec.g]) : 0.f,
                                 dec.g + 8 < valid ? to_float<T>(vscales[dec.g + 8]) : 0.f};
        dec.template softmax<true>(s, tile, valid, pb, vscale);
      } else {
        dec.softmax(s, tile, valid, pb);
      }
      dec.accumulate_sparse(pb, vvals, vbits, prefix + kTile, valid, stage.v_stride);
      __syncwarp();
    }
#if MUSTAFAR_BULK_PATH
    if (dec.lane == 0) {  // every staged tile was waited for; the merge below reuses this memory
#pragma unroll
      for (int s = 0; s < kStages; ++s) mbar_inval(bars + 8 * s);
    }
#endif
  } else {
    const uint16_t* kw = p.kw + b * p.kw_sb + h * p.kw_sh;
    const uint16_t* vw = p.vw + b * p.vw_sb + h * p.vw_sh;
    for (int tile = warp * kTile; tile < dec.n_win; tile += kWarps * kTile) {
      const int valid = min(kTile, dec.n_win - tile);
      float s[NT][4];
      uint32_t pb[NT][2];
      dec.scores_dense(s, kw + tile * p.kw_st, p.kw_st, valid);
      dec.softmax(s, dec.n_comp + tile, valid, pb);
      dec.accumulate_dense(pb, vw + tile * p.vw_st, p.vw_st, valid);
    }
  }

  // Merge the warps' states through shared memory, then write this part's unnormalised result.
  __syncthreads();
  float* so = reinterpret_cast<float*>(smem);  // [warps][rows][D]
  float* sm = so + kWarps * kRows * D;         // [warps][rows]
  float* sl = sm + kWarps * kRows;             // [warps][rows]
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float lsum = dec.l[nt][j];
      lsum += __shfl_xor_sync(kFull, lsum, 4);
      lsum += __shfl_xor_sync(kFull, lsum, 8);
      lsum += __shfl_xor_sync(kFull, lsum, 16);
      const int r = 8 * nt + 2 * dec.t + j;
      if (dec.g == 0) {
        sm[warp * kRows + r] = dec.m[nt][j];
        sl[warp * kRows + r] = lsum;
      }
#pragma unroll
      for (int i = 0; i < Dec::kMT; ++i) {
        const int ch = Dec::kCPTV * dec.g + 2 * i;
        so[(warp * kRows + r) * D + ch] = dec.o[nt][i][j];
        so[(warp * kRows + r) * D + ch + 1] = dec.o[nt][i][2 + j];
      }
    }
  __syncthreads();
  const long long part = (long long)split * gridDim.y + bh;
  for (int idx = threadIdx.x; idx < 8 * NT * D; idx += kThreads) {
    const int r = idx / D, ch = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm[w * kRows + r]);
    const float m_use = mx == -INFINITY ? 0.f : mx;
    float acc = 0.f, lsum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float scale = exp2f(sm[w * kRows + r] - m_use);
      acc += scale * so[(w * kRows + r) * D + ch];
      lsum += scale * sl[w * kRows + r];
    }
    p.part_o[(part * kRows + r) * D + ch] = acc;
    if (ch == 0) {
      p.part_m[part * kRows + r] = mx;
      p.part_l[part * kRows + r] = lsum;
    }
  }
}

constexpr int kMergeGroups = 8;  // part groups merged in parallel by one CTA

struct Partial {
  float m = -INFINITY, l = 0.f;
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);

  // Fold in another unnormalised partial (max m2, sum l2, output o2) with the online-softmax rescaling.
  __device__ void add(float m2, float l2, float4 o2) {
    const float m_new = fmaxf(m, m2);
    if (m_new == -INFINITY) return;
    const float a = exp2f(m - m_new), w = exp2f(m2 - m_new);
    l = l * a + l2 * w;
    o = make_float4(o.x * a + o2.x * w, o.y * a + o2.y * w, o.z * a + o2.z * w, o.w * a + o2.w * w);
    m = m_new;
  }
};

// out[b, head, qi, :] = the parts combined and normalised. One CTA per (b * Hkv, query row); thread (group, quad)
// folds parts group, group + 8, ... for channels 4 quad .. 4 quad + 3, then the groups fold through shared memory.
template <typename T, int D>
__global__ void merge_kernel(const float* part_o, const float* part_m, const float* part_l, T* out, long long o_sb,
                             long long o_sh, long long o_sl, int kv_heads, int group, int q_len, int parts) {
  constexpr int kQuads = D / 4;
  __shared__ Partial folded[kMergeGroups][kQuads];
  const int bh = blockIdx.x, r = blockIdx.y, n_bh = gridDim.x;
  const int grp = threadIdx.x / kQuads, quad = threadIdx.x % kQuads;
  Partial acc;
#pragma unroll 2
  for (int s = grp; s < parts; s += kMergeGroups) {
    const long long idx = ((long long)s * n_bh + bh) * kRows + r;
    acc.add(part_m[idx], part_l[idx], reinterpret_cast<const float4*>(part_o + idx * D)[quad]);
  }
  folded[grp][quad] = acc;
  __syncthreads();
  if (grp != 0) return;
#pragma unroll
  for (int k = 1; k < kMergeGroups; ++k) acc.add(folded[k][quad].m, folded[k][quad].l, folded[k][quad].o);
  const int b = bh / kv_heads, h = bh % kv_heads;
  const int head = h * group + r / q_len, qi = r % q_len;
  T* dst = out + b * o_sb + head * o_sh + qi * o_sl + 4 * quad;
  const float inv = acc.l == 0.f ? 0.f : 1.f / acc.l;  // fully masked rows give 0; a NaN input stays NaN
  dst[0] = from_float<T>(acc.o.x * inv);
  dst[1] = from_float<T>(acc.o.y * inv);
  dst[2] = from_float<T>(acc.o.z * inv);
  dst[3] = from_float<T>(acc.o.w * inv);
}

// Dynamic shared memory of a decode CTA: the warps' stages, or the merge buffers if larger.
template <int D>
int decode_smem(int k_keep, int v_keep, bool fp8) {
  const Stage<D> stage(k_keep, v_keep, fp8);
  const int stage_smem = kWarps * kStages * (stage.size() + (kBulkStaging ? 8 : 0));
  const int merge_smem = kWarps * kRows * (D + 2) * 4;
  return stage_smem > merge_smem ? stage_smem : merge_smem;
}

template <typename T, int D, bool MASKED, int NT, bool F8>
cudaError_t launch_variant(const DecodeParams& p, int parts, int batch_heads, cudaStream_t stream) {
  const int smem = decode_smem<D>(p.k_keep, p.v_keep, F8);
  auto kernel = sparse_decode_kernel<T, D, MASKED, NT, F8>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(parts, batch_heads), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D, bool F8>
cudaError_t launch_kept(const DecodeParams& p, int parts, int batch_heads, cudaStream_t stream) {
  const bool rows8 = p.group * p.q_len <= 8;
  if (p.mask) {
    return rows8 ? launch_variant<T, D, true, 1, F8>(p, parts, batch_heads, stream)
                 : launch_variant<T, D, true, 2, F8>(p, parts, batch_heads, stream);
  }
  return rows8 ? launch_variant<T, D, false, 1, F8>(p, parts, batch_heads, stream)
               : launch_variant<T, D, false, 2, F8>(p, parts, batch_heads, stream);
}

template <typename T, int D>
cudaError_t launch_decode(const DecodeParams& p, int parts, int batch_heads, cudaStream_t stream) {
  return p.fp8 ? launch_kept<T, D, true>(p, parts, batch_heads, stream)
               : launch_kept<T, D, false>(p, parts, batch_heads, stream);
}

}  // namespace

extern "C" int mustafar_decode_launch(const DecodeParams* p, int dtype_bf16, int head_dim, int parts, int batch_heads,
                                      void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p->group * p->q_len > kRows) return static_cast<int>(cudaErrorInvalidValue);
  cudaError_t err = cudaErrorInvalidValue;
  if (head_dim == 128) {
    err = dtype_bf16 ? launch_decode<__nv_bfloat16, 128>(*p, parts, batch_heads, s)
                     : launch_decode<__half, 128>(*p, parts, batch_heads, s);
  } else if (head_dim == 64) {
    err = dtype_bf16 ? launch_decode<__nv_bfloat16, 64>(*p, parts, batch_heads, s)
                     : launch_decode<__half, 64>(*p, parts, batch_heads, s);
  }
  return static_cast<int>(err);
}

// CTAs of the decode kernel that fit on one multiprocessor at once (for the split heuristic), or -1.
extern "C" int mustafar_decode_occupancy(int dtype_bf16, int head_dim, int rows, int masked, int k_keep,
                                         int v_keep, int fp8) {
  int blocks = -1;
  const int nt = rows <= 8 ? 1 : 2;
  auto query = [&](auto kernel, int smem) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem);
  };
#define MUSTAFAR_OCC_NT(TT, DD, MM, FF)                                                          \
  nt == 1 ? query(sparse_decode_kernel<TT, DD, MM, 1, FF>, decode_smem<DD>(k_keep, v_keep, FF)) \
          : query(sparse_decode_kernel<TT, DD, MM, 2, FF>, decode_smem<DD>(k_keep, v_keep, FF))
#define MUSTAFAR_OCC(TT, DD)                                                                     \
  if (fp8) {                                                                                     \
    if (masked) { MUSTAFAR_OCC_NT(TT, DD, true, true); } else { MUSTAFAR_OCC_NT(TT, DD, false, true); }  \
  } else {                                                                                       \
    if (masked) { MUSTAFAR_OCC_NT(TT, DD, true, false); } else { MUSTAFAR_OCC_NT(TT, DD, false, false); } \
  }
  if (head_dim == 128) {
    if (dtype_bf16) { MUSTAFAR_OCC(__nv_bfloat16, 128) } else { MUSTAFAR_OCC(__half, 128) }
  } else if (head_dim == 64) {
    if (dtype_bf16) { MUSTAFAR_OCC(__nv_bfloat16, 64) } else { MUSTAFAR_OCC(__half, 64) }
  }
#undef MUSTAFAR_OCC
#undef MUSTAFAR_OCC_NT
  return blocks;
}

extern "C" int mustafar_merge_launch(const float* part_o, const float* part_m, const float* part_l, void* out,
                                     int dtype_bf16, long long o_sb, long long o_sh, long long o_sl, int kv_heads,
                                     int group, int q_len, int parts, int head_dim, int batch_heads, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(batch_heads, group * q_len);
  const int threads = kMergeGroups * head_dim / 4;
#define MUSTAFAR_MERGE(TT, DD)                                                                                   \
  merge_kernel<TT, DD><<<grid, threads, 0, s>>>(part_o, part_m, part_l, static_cast<TT*>(out), o_sb, o_sh, o_sl, \
                                                kv_heads, group, q_len, parts)
  if (head_dim == 128) {
    if (dtype_bf16) MUSTAFAR_MERGE(__nv_bfloat16, 128); else MUSTAFAR_MERGE(__half, 128);
  } else if (head_dim == 64) {
    if (dtype_bf16) MUSTAFAR_MERGE(__nv_bfloat16, 64); else MUSTAFAR_MERGE(__half, 64);
  } else {
    return static_cast<int>(cudaErrorInvalidValue);
  }
#undef MUSTAFAR_MERGE
  return static_cast<int>(cudaGetLastError());
}
