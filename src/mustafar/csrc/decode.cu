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
constexpr int kStages = 2;
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

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Copy `bytes` (a multiple of 16, both sides 16-byte aligned) with the 32 lanes of a warp.
__device__ __forceinline__ void stage_copy(char* dst, const char* src, int bytes, int lane) {
#pragma unroll 1
  for (int off = lane * 16; off < bytes; off += 32 * 16) cp_async16(dst + off, src + off);
}

// Shared memory of one warp stage: K values, V values, K bitmaps, V bitmaps, K and V row prefix counts.
template <int D>
struct Stage {
  static constexpr int kWords = D / 32;
  static constexpr int kBitsBytes = kTile * kWords * 4;
  static constexpr int kPrefixBytes = kTile * 4;
  int vals_bytes;  // 16 tokens * k_keep * 2 bytes
  __host__ __device__ int size() const { return 2 * vals_bytes + 2 * kBitsBytes + 2 * kPrefixBytes; }
};

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

template <typename T, int D, bool MASKED, bool ROWS8>
struct Decoder {
  static constexpr int kWords = D / 32;
  static constexpr int kKB = D / 16;   // k-blocks of S = Q K^T
  static constexpr int kCPTK = D / 4;  // channels per thread, K side
  static constexpr int kCPTV = D / 8;  // channels per thread, V side (= n-tiles of O)
  static constexpr int kHalves = ROWS8 ? 1 : 2;

  const DecodeParams& p;
  int lane, g, t;
  uint32_t qa[kKB][4];
  float o[kCPTV][4];
  float m[2], l[2];
  int last_vis[2];
  int min_last_vis;
  long long mask_off[2];

  __device__ Decoder(const DecodeParams& params, int b, int h) : p(params) {
    lane = threadIdx.x & 31;
    g = lane >> 2;
    t = lane & 3;
    const int total = p.n_comp + p.n_win;
    const int rows = p.group * p.q_len;
    min_last_vis = total - p.q_len;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = g + 8 * half;
      const bool ok = r < rows;
      const int head = h * p.group + (ok ? r / p.q_len : 0);
      const int qi = ok ? r % p.q_len : 0;
      last_vis[half] = total - p.q_len + qi;
      mask_off[half] = MASKED ? b * p.m_sb + head * p.m_sh + qi * p.m_sl : 0;
      m[half] = -INFINITY;
      l[half] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < kCPTV; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) o[j][i] = 0.f;
    load_query(b, h, rows);
  }

  // A fragments of Q (rows g and g + 8; k-slots 2t, 2t+1 -> channels tD/4 + 4kb + {0,1}; 2t+8, 2t+9 -> +{2,3}).
  __device__ void load_query(int b, int h, int rows) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = g + 8 * half;
      const uint16_t* row = nullptr;
      if (r < rows) row = p.q + b * p.q_sb + (h * p.group + r / p.q_len) * p.q_sh + (r % p.q_len) * p.q_sl;
#pragma unroll
      for (int kb = 0; kb < kKB; ++kb) {
        const int c = kCPTK * t + 4 * kb;
        uint32_t lo = 0, hi = 0;
        if (row) {
          lo = row[c] | (uint32_t(row[c + 1]) << 16);
          hi = row[c + 2] | (uint32_t(row[c + 3]) << 16);
        }
        qa[kb][half] = lo;
        qa[kb][half + 2] = hi;
      }
    }
  }

  // S tile [16 rows x 16 tokens] (C fragments, two n-tiles) from compressed K rows in shared memory.
  __device__ void scores_sparse(float s[2][4], const uint16_t* vals, const uint32_t* bits, const uint32_t* prefix,
                                int valid, int k_keep) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
      const int row = nt * 8 + g;
      int x;
      uint32_t mine = run_of<kCPTK>(bits + row * kWords, prefix[row], kCPTK * t, x);
      if (row >= valid) mine = 0;
      const uint16_t* src = vals + row * k_keep + x;
#pragma unroll
      for (int kb = 0; kb < kKB; ++kb) {
        uint32_t v[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (mine & (1u << (4 * kb + i))) v[i] = *src++;
        }
        mma16816<T>(s[nt], qa[kb], __byte_perm(v[0], v[1], 0x5410), __byte_perm(v[2], v[3], 0x5410));
      }
    }
  }

  // S tile from dense window rows in global memory (row stride `stride` elements).
  __device__ void scores_dense(float s[2][4], const uint16_t* rows, long long stride, int valid) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
      const int row = nt * 8 + g;
      const uint16_t* rv = rows + row * stride + kCPTK * t;
#pragma unroll
      for (int kb = 0; kb < kKB; ++kb) {
        uint32_t b0 = 0, b1 = 0;
        if (row < valid) {
          b0 = rv[4 * kb] | (uint32_t(rv[4 * kb + 1]) << 16);
          b1 = rv[4 * kb + 2] | (uint32_t(rv[4 * kb + 3]) << 16);
        }
        mma16816<T>(s[nt], qa[kb], b0, b1);
      }
    }
  }

  // Online softmax over the tile (log2 units); rescales O and returns the A fragment of P.
  __device__ void softmax(float s[2][4], int first_pos, int valid, uint32_t pa[4]) {
    const bool all_visible = valid == kTile && first_pos + kTile - 1 <= min_last_vis;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 2 * kHalves; ++i) {
        const int half = i >> 1;
        float x = s[nt][i] * p.scale_log2e;
        if (MASKED || !all_visible) {
          const int col = nt * 8 + 2 * t + (i & 1);
          const int pos = first_pos + col;
          bool keep = col < valid && pos <= last_vis[half];
          if (MASKED && keep) keep = p.mask[mask_off[half] + pos] != 0;
          x = keep ? x : -INFINITY;
        }
        s[nt][i] = x;
        tile_max[half] = fmaxf(tile_max[half], x);
      }
    float alpha[2] = {1.f, 1.f};
#pragma unroll
    for (int half = 0; half < kHalves; ++half) {
      tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(kFull, tile_max[half], 1));
      tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(kFull, tile_max[half], 2));
      const float m_new = fmaxf(m[half], tile_max[half]);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[half] = exp2f(m[half] - m_use);
      m[half] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 2 * half; i < 2 * half + 2; ++i) {
          s[nt][i] = exp2f(s[nt][i] - m_use);
          sum += s[nt][i];
        }
      l[half] = l[half] * alpha[half] + sum;
    }
    if (__any_sync(kFull, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int j = 0; j < kCPTV; ++j) {
        o[j][0] *= alpha[0];
        o[j][1] *= alpha[0];
        if (!ROWS8) {
          o[j][2] *= alpha[1];
          o[j][3] *= alpha[1];
        }
      }
    }
    pa[0] = pack2<T>(s[0][0], s[0][1]);
    pa[2] = pack2<T>(s[1][0], s[1][1]);
    pa[1] = ROWS8 ? 0u : pack2<T>(s[0][2], s[0][3]);
    pa[3] = ROWS8 ? 0u : pack2<T>(s[1][2], s[1][3]);
  }

  // O += P V for compressed V rows in shared memory.
  __device__ void accumulate_sparse(const uint32_t pa[4], const uint16_t* vals, const uint32_t* bits,
                                    const uint32_t* prefix, int valid, int k_keep) {
    uint32_t mine[4];
    const uint16_t* src[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int row = 2 * t + (k & 1) + 8 * (k >> 1);
      int x;
      mine[k] = run_of<kCPTV>(bits + row * kWords, prefix[row], kCPTV * g, x);
      if (row >= valid) mine[k] = 0;
      src[k] = vals + row * k_keep + x;
    }
#pragma unroll
    for (int j = 0; j < kCPTV; ++j) {
      uint32_t v[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (mine[k] & (1u << j)) v[k] = *src[k]++;
      }
      mma16816<T>(o[j], pa, __byte_perm(v[0], v[1], 0x5410), __byte_perm(v[2], v[3], 0x5410));
    }
  }

  // O += P V for dense window rows in global memory.
  __device__ void accumulate_dense(const uint32_t pa[4], const uint16_t* rows, long long stride, int valid) {
    const uint16_t* rv[4];
    bool ok[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int row = 2 * t + (k & 1) + 8 * (k >> 1);
      ok[k] = row < valid;
      rv[k] = rows + row * stride + kCPTV * g;
    }
#pragma unroll
    for (int j = 0; j < kCPTV; ++j) {
      uint32_t v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = ok[k] ? rv[k][j] : 0u;
      mma16816<T>(o[j], pa, __byte_perm(v[0], v[1], 0x5410), __byte_perm(v[2], v[3], 0x5410));
    }
  }
};

// Stage the K and V tiles starting at token `tile` (always 16 whole rows: cap is a multiple of 16).
template <int D>
__device__ __forceinline__ void issue_tile(char* st, const Stage<D>& stage, const char* kv, const char* vv,
                                           const char* kb, const char* vb, int tile, int lane) {
  constexpr int kBits = Stage<D>::kBitsBytes;
  const long long val_off = (long long)tile * (stage.vals_bytes / kTile);
  const long long bit_off = (long long)tile * (kBits / kTile);
  stage_copy(st, kv + val_off, stage.vals_bytes, lane);
  stage_copy(st + stage.vals_bytes, vv + val_off, stage.vals_bytes, lane);
  if (lane < kBits / 16) {
    cp_async16(st + 2 * stage.vals_bytes + lane * 16, kb + bit_off + lane * 16);
    cp_async16(st + 2 * stage.vals_bytes + kBits + lane * 16, vb + bit_off + lane * 16);
  }
  cp_async_commit();
}

template <typename T, int D, bool MASKED, bool ROWS8>
__global__ void __launch_bounds__(kThreads) sparse_decode_kernel(const __grid_constant__ DecodeParams p) {
  extern __shared__ __align__(16) char smem[];
  using Dec = Decoder<T, D, MASKED, ROWS8>;
  constexpr int kBits = Stage<D>::kBitsBytes;
  const int split = blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.kv_heads, h = bh % p.kv_heads;
  const int warp = threadIdx.x >> 5;
  Dec dec(p, b, h);
  const int k_keep = p.k_keep;
  const Stage<D> stage{kTile * k_keep * 2};
  char* my_stages = smem + warp * kStages * stage.size();

  if (split < p.n_splits) {
    const int lo = split * p.tokens_per_split;
    const int hi = min(lo + p.tokens_per_split, p.n_comp);
    const char* kv = reinterpret_cast<const char*>(p.kv + b * p.kv_sb + h * p.kv_sh);
    const char* vv = reinterpret_cast<const char*>(p.vv + b * p.vv_sb + h * p.vv_sh);
    const char* kb = reinterpret_cast<const char*>(p.kb + b * p.kb_sb + h * p.kb_sh);
    const char* vb = reinterpret_cast<const char*>(p.vb + b * p.vb_sb + h * p.vb_sh);
    int tile = lo + warp * kTile;
    if (tile < hi) issue_tile<D>(my_stages, stage, kv, vv, kb, vb, tile, dec.lane);
    for (int it = 0; tile < hi; ++it, tile += kWarps * kTile) {
      const int next = tile + kWarps * kTile;
      if (next < hi) {
        issue_tile<D>(my_stages + ((it + 1) & 1) * stage.size(), stage, kv, vv, kb, vb, next, dec.lane);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncwarp();
      char* st = my_stages + (it & 1) * stage.size();
      const uint16_t* kvals = reinterpret_cast<const uint16_t*>(st);
      const uint16_t* vvals = reinterpret_cast<const uint16_t*>(st + stage.vals_bytes);
      const uint32_t* kbits = reinterpret_cast<const uint32_t*>(st + 2 * stage.vals_bytes);
      const uint32_t* vbits = kbits + kTile * Stage<D>::kWords;
      uint32_t* prefix = reinterpret_cast<uint32_t*>(st + 2 * stage.vals_bytes + 2 * kBits);
      // Lanes 0-15 count the K rows' words, lanes 16-31 the V rows'.
      prefix[dec.lane] = prefix_bytes<Stage<D>::kWords>(kbits + dec.lane * Stage<D>::kWords);
      __syncwarp();
      const int valid = min(kTile, hi - tile);
      float s[2][4];
      uint32_t pa[4];
      dec.scores_sparse(s, kvals, kbits, prefix, valid, k_keep);
      dec.softmax(s, tile, valid, pa);
      dec.accumulate_sparse(pa, vvals, vbits, prefix + kTile, valid, k_keep);
      __syncwarp();
    }
  } else {
    const uint16_t* kw = p.kw + b * p.kw_sb + h * p.kw_sh;
    const uint16_t* vw = p.vw + b * p.vw_sb + h * p.vw_sh;
    for (int tile = warp * kTile; tile < p.n_win; tile += kWarps * kTile) {
      const int valid = min(kTile, p.n_win - tile);
      float s[2][4];
      uint32_t pa[4];
      dec.scores_dense(s, kw + tile * p.kw_st, p.kw_st, valid);
      dec.softmax(s, p.n_comp + tile, valid, pa);
      dec.accumulate_dense(pa, vw + tile * p.vw_st, p.vw_st, valid);
    }
  }

  // Merge the warps' states through shared memory, then write this part's unnormalised result.
  __syncthreads();
  float* so = reinterpret_cast<float*>(smem);  // [warps][rows][D]
  float* sm = so + kWarps * kRows * D;         // [warps][rows]
  float* sl = sm + kWarps * kRows;             // [warps][rows]
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float lsum = dec.l[half];
    lsum += __shfl_xor_sync(kFull, lsum, 1);
    lsum += __shfl_xor_sync(kFull, lsum, 2);
    const int r = dec.g + 8 * half;
    if (dec.t == 0) {
      sm[warp * kRows + r] = dec.m[half];
      sl[warp * kRows + r] = lsum;
    }
#pragma unroll
    for (int j = 0; j < Dec::kCPTV; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i) so[(warp * kRows + r) * D + Dec::kCPTV * (2 * dec.t + i) + j] = dec.o[j][2 * half + i];
  }
  __syncthreads();
  const long long part = (long long)split * gridDim.y + bh;
  for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
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

// out[b, head, qi, :] = the parts combined and normalised; one CTA per (b * Hkv, query row), D threads.
template <typename T>
__global__ void merge_kernel(const float* part_o, const float* part_m, const float* part_l, T* out, long long o_sb,
                             long long o_sh, long long o_sl, int kv_heads, int group, int q_len, int parts, int D) {
  const int bh = blockIdx.x, r = blockIdx.y, ch = threadIdx.x;
  const int n_bh = gridDim.x;
  float mx = -INFINITY;
  for (int s = 0; s < parts; ++s) mx = fmaxf(mx, part_m[((long long)s * n_bh + bh) * kRows + r]);
  const float m_use = mx == -INFINITY ? 0.f : mx;
  float acc = 0.f, lsum = 0.f;
  for (int s = 0; s < parts; ++s) {
    const long long idx = ((long long)s * n_bh + bh) * kRows + r;
    const float w = exp2f(part_m[idx] - m_use);
    lsum += w * part_l[idx];
    acc += w * part_o[idx * D + ch];
  }
  const int b = bh / kv_heads, h = bh % kv_heads;
  const int head = h * group + r / q_len, qi = r % q_len;
  out[b * o_sb + head * o_sh + qi * o_sl + ch] = from_float<T>(lsum > 0.f ? acc / lsum : 0.f);
}

template <typename T, int D, bool MASKED, bool ROWS8>
cudaError_t launch_variant(const DecodeParams& p, int parts, int batch_heads, cudaStream_t stream) {
  const Stage<D> stage{kTile * p.k_keep * 2};
  const int stage_smem = kWarps * kStages * stage.size();
  const int merge_smem = kWarps * kRows * (D + 2) * 4;
  const int smem = stage_smem > merge_smem ? stage_smem : merge_smem;
  auto kernel = sparse_decode_kernel<T, D, MASKED, ROWS8>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(parts, batch_heads), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_decode(const DecodeParams& p, int parts, int batch_heads, cudaStream_t stream) {
  const bool rows8 = p.group * p.q_len <= 8;
  if (p.mask) {
    return rows8 ? launch_variant<T, D, true, true>(p, parts, batch_heads, stream)
                 : launch_variant<T, D, true, false>(p, parts, batch_heads, stream);
  }
  return rows8 ? launch_variant<T, D, false, true>(p, parts, batch_heads, stream)
               : launch_variant<T, D, false, false>(p, parts, batch_heads, stream);
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

extern "C" int mustafar_merge_launch(const float* part_o, const float* part_m, const float* part_l, void* out,
                                     int dtype_bf16, long long o_sb, long long o_sh, long long o_sl, int kv_heads,
                                     int group, int q_len, int parts, int head_dim, int batch_heads, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dim3 grid(batch_heads, group * q_len);
  if (dtype_bf16) {
    merge_kernel<__nv_bfloat16><<<grid, head_dim, 0, s>>>(part_o, part_m, part_l, static_cast<__nv_bfloat16*>(out),
                                                          o_sb, o_sh, o_sl, kv_heads, group, q_len, parts, head_dim);
  } else {
    merge_kernel<__half><<<grid, head_dim, 0, s>>>(part_o, part_m, part_l, static_cast<__half*>(out), o_sb, o_sh,
                                                   o_sl, kv_heads, group, q_len, parts, head_dim);
  }
  return static_cast<int>(cudaGetLastError());
}
