// Parameters of the mustafar CUDA kernels, shared by decode.cu, compress.cu and the torch binding.
#pragma once
#include <stdint.h>

// Element strides; pointers to 16-bit data are passed as uint16_t (fp16 or bf16 bits).
struct DecodeParams {
  const uint16_t* q;
  long long q_sb, q_sh, q_sl;
  const uint16_t* kv;
  long long kv_sb, kv_sh;
  const uint32_t* kb;
  long long kb_sb, kb_sh;
  const uint16_t* vv;
  long long vv_sb, vv_sh;
  const uint32_t* vb;
  long long vb_sb, vb_sh;
  const uint16_t* kw;
  long long kw_sb, kw_sh, kw_st;
  const uint16_t* vw;
  long long vw_sb, vw_sh, vw_st;
  const uint8_t* mask;
  long long m_sb, m_sh, m_sl;
  float* part_o;
  float* part_m;
  float* part_l;
  int kv_heads, group, q_len, k_keep, v_keep, n_comp, n_win, tokens_per_split, n_splits;  // k_keep: K rows, v_keep: V rows
  float scale_log2e;
  // Static (graph-captured) decode: when set, tokens held = *length (device), n_comp = max(0, *length - window)
  // (at most the n_comp given: the store's capacity) and n_win = min(*length, window) replace n_comp / n_win
  // (the window is a ring buffer of `window` slots).
  const long long* length;
  int window;
  // FP8 kept values (issue 15): when fp8 is set, kv / vv hold e4m3 bytes (k_keep / v_keep per row; their strides
  // count bytes) and ks / vs the per-token scales [B, Hkv, cap] in the cache dtype (tokens contiguous).
  int fp8;
  const uint16_t* ks;
  long long ks_sb, ks_sh;
  const uint16_t* vs;
  long long vs_sb, vs_sh;
};

// Prune + compress of rows x [B, Hkv, tokens, D] (last dim contiguous, rows 16-byte aligned) into values
// [.., k_keep] and uint32 bitmap words [.., D/32] (rows contiguous).
struct CompressParams {
  const uint16_t* x;
  long long x_sb, x_sh, x_st;
  uint16_t* vals;
  long long v_sb, v_sh;
  uint32_t* bits;
  long long b_sb, b_sh;
  int batch, kv_heads, tokens, k_keep;
  // Static decode eviction: when set, compress the one row in ring slot (*position % window) of x into row
  // (*position - window) of the outputs, or nothing while *position < window or past `capacity` rows.
  const long long* position;
  int window, capacity;
  // FP8 kept values (issue 15): when fp8 is set, vals receives e4m3 bytes (k_keep per row, element strides in bytes)
  // and scales the per-token scales [B, Hkv, tokens] in the cache dtype (tokens contiguous; row out_row in the
  // static form), the rule of mustafar.fp8; otherwise scales is unused.
  int fp8;
  uint16_t* scales;
  long long s_sb, s_sh;
};

extern "C" int mustafar_compress_launch(const CompressParams* p, int dtype_bf16, int head_dim, void* stream);

extern "C" int mustafar_decode_launch(const DecodeParams* p, int dtype_bf16, int head_dim, int parts, int batch_heads,
                                      void* stream);
extern "C" int mustafar_decode_occupancy(int dtype_bf16, int head_dim, int rows, int masked, int k_keep,
                                         int v_keep, int fp8);
extern "C" int mustafar_merge_launch(const float* part_o, const float* part_m, const float* part_l, void* out,
                                     int dtype_bf16, long long o_sb, long long o_sh, long long o_sl, int kv_heads,
                                     int group, int q_len, int parts, int head_dim, int batch_heads, void* stream);
