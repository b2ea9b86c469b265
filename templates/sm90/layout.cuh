// The wgmma prefill kernel's CTA shape, stage layout, shared memory and parameters, from the variant's
// constants: kD (head_dim), kGroup, kStages, kDenseK (balanced: dense K rows by TMA, 2:4 V), kTable (the cache's
// block tables of dense and 2:4 blocks); neither flag: all-2:4 K and V. Included inside the variant's namespace.

static_assert(!(kDenseK && kTable), "one tier mix: all-2:4, balanced (kDenseK) or block tables (kTable)");
// Where the math needs head_dim 128: O^T is two m64 accumulator tiles (o[2][32], the V fragments va[2][2], the
// metadata word layout of load_v), and the epilogue stages O through the WG's two P tiles as its two 64-channel
// halves; the stage offsets below and Q's halves follow kD.
static_assert(kD == 128, "the wgmma prefill kernel is written for head_dim 128");
constexpr int kN = 64, kConsumers = 2;
constexpr int kThreads = kConsumers * 128 + 128;  // two consumer WGs and the producer WG
constexpr int kCtaQ = kConsumers * kN;
constexpr int kHalves = kD / 64;  // 64-channel halves of a [row][channel] tile (128-byte swizzled rows)

// Bytes of one 64-token block (16-bit elements): dense rows (kHalves swizzled halves of kN rows x 128 B), 2:4
// values (half the elements) and metadata (one 16-bit word per 16 dense elements).
constexpr int kDenseBytes = kHalves * kHalfBytes, kSpVals = kN * kD / 2 * 2, kSpMeta = kN * kD / 16 * 2;
// Stage layout (bytes): K, then V. 2:4 K: the cache's values and metadata; dense K: its rows (TMA's 128-byte
// swizzle, 1024-byte aligned). Block tables: each of K and V has room for dense rows, a 2:4 block's values at the
// same offset and its metadata after the dense rows.
constexpr int kKRows = 0, kKVals = 0;
constexpr int kKMeta = kTable ? kDenseBytes : kSpVals;  // 2:4 K's metadata (not used with dense K)
constexpr int kVRows = kDenseK ? kDenseBytes : kKMeta + kSpMeta;
constexpr int kVVals = kVRows;
constexpr int kVMeta = kVVals + (kTable ? kDenseBytes : kSpVals);
constexpr int kStageBytes = kVMeta + kSpMeta;
constexpr int kKBytes = kDenseK ? kDenseBytes : 0;  // per stage, whole TMA boxes (zero-filled past the tensor too);
                                                    // 2:4 K comes in the cache's chunks, counted in kChunkBytes
// per 32-token chunk of the cache: V (+ 2:4 K) values + metadata
constexpr int kChunkBytes = (kDenseK ? 1 : 2) * (kSpVals + kSpMeta) / 2;
constexpr int kKSteps = kD / 32;  // k32 steps of the sparse S^T wgmma
static_assert(kStageBytes % 1024 == 0, "stages hold 128-byte-swizzled tiles: 1024-byte aligned");
static_assert(!kTable || (kKVals == kKRows && kKMeta == kKRows + kDenseBytes && kVVals == kVRows &&
                             kVMeta == kVRows + kDenseBytes),
              "block tables: a block's values where its dense rows go, its metadata after them (the producer)");
// Lazy softmax bound: P = exp2(x - m) may reach 2^8 before m must move (f16 and bf16 hold it with room)
constexpr float kLazyP = 256.f;

struct Smem {
  alignas(1024) unsigned char q[kConsumers][kHalves][kN * 128];  // per WG: Q's 64-channel halves, [query][ch]
  alignas(1024) unsigned char p[kConsumers][2][kN * 128];  // per WG: P_j, [query][key], double-buffered
  alignas(1024) unsigned char stage[kStages][kStageBytes];
  float red[kConsumers][4][kN];
  int flag[kConsumers][2];
  int tier[kStages];  // block tables: bit 0 = the stage's K block is dense, bit 1 = its V block
  int head_row;  // b * heads + h of the CTA, for the epilogue (held in a register it cost spills)
  uint64_t full[kStages], empty[kStages];
};
constexpr int kSmemBytes = sizeof(Smem) + 1024;  // + room to align the base to the 1024-byte swizzle atom

struct PrefillParams {
  const Element* q;
  long long q_sb, q_sh, q_st;                      // q strides (elements)
  const unsigned char *k_vals, *k_meta, *v_vals, *v_meta;  // k_*: unused with dense K (the tensor map)
  long long vals_head_bytes, meta_head_bytes;      // per (batch, KV head) of the packed tensors
  int num_kv_heads, num_queries, capacity;
  float scale_log2;
  Element* out;
  float* lse;
  int light;  // query blocks run last, across heads (light_blocks)
  const int *k_table, *v_table;  // block tables [B, Hkv, max_blocks] (the table kernel; k_/v_ pointers: its pools)
  int max_blocks, k_n_sparse, v_n_sparse, k_n_dense, v_n_dense;
  bool k_rows;  // K from the prompt's dense rows (slab j: row 64 j of k_map), not from K's table
  const int *seqlens, *qlens;  // the table kernel: [B] keys and queries per sequence (queries the last of the keys)
};
