// Host side of the wgmma prefill kernel: the light query blocks of the grid, the TMA tensor maps of dense rows,
// the launch, and the three entry points' bodies (all-2:4, balanced, block tables), which check their arguments
// the way HieraCache and the ops pass them. Included inside the variant's namespace after the kernel
// (prefill_kernel<kTail>, declared by prefill_sm90.cu.j2); the extern "C" entry points forward here.

// Query blocks that run last, lightest last, across all heads: the fewest such that when the last head's
// longest CTA starts, the work still queued (the rest of that head and the light blocks of every head, a
// block's work ~ qb + 1) covers that CTA's length on every SM -- then no SM runs dry while it finishes.
// 8K x 32 heads: 20 of 64 (SMs sat idle 5 % at the end of the grid in head order); 32K: 8 of 256.
inline int light_blocks(int n_qb, int heads) {
  static int sms[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 0;
  if (!sms[device] && cudaDeviceGetAttribute(&sms[device], cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 0;  // the launch reports the error
  const long long need = 2LL * sms[device] * n_qb - (long long)n_qb * (n_qb + 1);
  int t = 0;
  while (t < n_qb && (long long)(heads - 1) * t * (t + 1) < need) ++t;
  return t;
}

// cuTensorMapEncodeTiled from the driver through the runtime's entry-point query (kept once found; a failed
// lookup is retried on the next call and leaves no error behind for later calls to report).
inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static std::atomic<void*> fn{nullptr};
  void* f = fn.load(std::memory_order_acquire);
  if (!f) {
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
#else  // the versioned query is CUDA 12.5+
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // clear it: the next launch's status must be its own
      return nullptr;
    }
    fn.store(f, std::memory_order_release);
  }
  return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
}

// Tensor map of K [B, Hkv, k_len, D] (element strides): 64 x 64 boxes, 128-byte swizzle, zeros past k_len.
inline bool k_tensor_map(CUtensorMap* map, const void* k, long long k_sb, long long k_sh, long long k_st, int k_len,
                         int num_kv_heads, int batch) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encode_tiled();
  if (!encode) return false;
  const cuuint64_t dims[4] = {cuuint64_t(kD), cuuint64_t(k_len), cuuint64_t(num_kv_heads), cuuint64_t(batch)};
  const cuuint64_t strides[3] = {cuuint64_t(k_st) * 2, cuuint64_t(k_sh) * 2, cuuint64_t(k_sb) * 2};  // bytes
  const cuuint32_t box[4] = {64, kN, 1, 1}, unit[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type = std::is_same<Element, cutlass::half_t>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                                 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode(map, type, 4,
                const_cast<void*>(k), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The launch with the tensor maps the tier mix's kernel takes (a template: the other forms are not instantiated).
template <bool kTail>
inline void launch_kernel(const PrefillParams& p, dim3 grid, cudaStream_t stream, const CUtensorMap& k_map,
                          const CUtensorMap& v_map) {
  if constexpr (kTable)
    prefill_kernel<kTail><<<grid, kThreads, kSmemBytes, stream>>>(p, k_map, v_map);
  else if constexpr (kDenseK)
    prefill_kernel<kTail><<<grid, kThreads, kSmemBytes, stream>>>(p, k_map);
  else
    prefill_kernel<kTail><<<grid, kThreads, kSmemBytes, stream>>>(p);
}

// The entry points' common end: the instantiation opted in to its shared memory, the grid, the launch.
inline int launch(PrefillParams& p, bool tail, int num_queries, int num_q_heads, int batch, void* stream,
                  const CUtensorMap& k_map, const CUtensorMap& v_map) {
  cudaError_t err = tail ? opt_in_smem<prefill_kernel<true>>(kSmemBytes) : opt_in_smem<prefill_kernel<false>>(kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((num_queries + kCtaQ - 1) / kCtaQ, num_q_heads, batch);
  p.light = light_blocks(grid.x, num_q_heads * batch);
  if (tail)
    launch_kernel<true>(p, grid, static_cast<cudaStream_t>(stream), k_map, v_map);
  else
    launch_kernel<false>(p, grid, static_cast<cudaStream_t>(stream), k_map, v_map);
  return cudaGetLastError();
}

inline PrefillParams params(const void* q, long long q_sb, long long q_sh, long long q_st, const void* k_vals,
                            const void* k_meta, const void* v_vals, const void* v_meta, int capacity,
                            int num_kv_heads, int num_queries, float scale, void* out, float* lse) {
  return PrefillParams{static_cast<const Element*>(q), q_sb, q_sh, q_st, static_cast<const unsigned char*>(k_vals),
                       static_cast<const unsigned char*>(k_meta), static_cast<const unsigned char*>(v_vals),
                       static_cast<const unsigned char*>(v_meta), (long long)capacity * kD,
                       (long long)capacity * kD / 8, num_kv_heads, num_queries, capacity,
                       scale * kLog2e, static_cast<Element*>(out), lse, 0};
}

// All-2:4: q [B, Hq, L, D] (rows of D contiguous), the compress_k / compress_v tensors of length >= L
// (contiguous), out [B, Hq, L, D] and lse [B, Hq, L] contiguous; query i attends to keys 0..i.
inline int prefill_all24(const void* q, long long q_sb, long long q_sh, long long q_st, const void* k_vals,
                         const void* k_meta, const void* v_vals, const void* v_meta, int capacity, int batch,
                         int num_q_heads, int num_kv_heads, int num_queries, float scale, void* out, float* lse,
                         void* stream) {
  if (batch < 1 || batch > 65535 || num_kv_heads < 1 || num_q_heads != num_kv_heads * kGroup ||
      num_q_heads > 65535 || num_queries < 1 || capacity < num_queries || capacity % 32 || q_st < kD)
    return cudaErrorInvalidValue;
  PrefillParams p = params(q, q_sb, q_sh, q_st, k_vals, k_meta, v_vals, v_meta, capacity, num_kv_heads, num_queries,
                           scale, out, lse);
  const CUtensorMap none{};
  return launch(p, num_queries % kCtaQ != 0, num_queries, num_q_heads, batch, stream, none, none);
}

// Balanced: q [B, Hq, L, D] and K [B, Hkv, >= L, D] (rows of D contiguous, strides multiples of 8), the
// compress_v tensors of length >= L (contiguous), out [B, Hq, L, D] and lse [B, Hq, L] contiguous; query i
// attends to keys 0..i.
inline int prefill_balanced(const void* q, long long q_sb, long long q_sh, long long q_st, const void* k,
                            long long k_sb, long long k_sh, long long k_st, int k_len, const void* v_vals,
                            const void* v_meta, int capacity, int batch, int num_q_heads, int num_kv_heads,
                            int num_queries, float scale, void* out, float* lse, void* stream) {
  // TMA: 16-byte aligned base, strides multiples of 16 bytes
  if (batch < 1 || batch > 65535 || num_kv_heads < 1 || num_q_heads != num_kv_heads * kGroup ||
      num_q_heads > 65535 || num_queries < 1 || capacity < num_queries || capacity % 32 || q_st < kD ||
      k_len < num_queries || k_st < kD || k_st % 8 || k_sh % 8 || k_sb % 8 ||
      reinterpret_cast<uintptr_t>(k) % 16)
    return cudaErrorInvalidValue;
  // No driver entry point (a driver older than CUDA 12): "not supported"; the driver refusing the map
  // (arguments the checks above let through): "invalid value".
  if (!encode_tiled()) return cudaErrorNotSupported;
  CUtensorMap map;
  if (!k_tensor_map(&map, k, k_sb, k_sh, k_st, k_len, num_kv_heads, batch)) return cudaErrorInvalidValue;
  PrefillParams p = params(q, q_sb, q_sh, q_st, nullptr, nullptr, v_vals, v_meta, capacity, num_kv_heads,
                           num_queries, scale, out, lse);
  return launch(p, num_queries % kCtaQ != 0, num_queries, num_q_heads, batch, stream, map, map);
}

// Block tables: pools and tables as HieraCache holds them: dense [B, Hkv, n_dense, 64, D], 2:4 values [B, Hkv,
// n_sparse, 64 D / 2] and metadata [B, Hkv, n_sparse, 64 D / 16] (int16), tables [B, Hkv, max_blocks] int32 (entry
// e >= 0: dense slot e, e < 0: 2:4 slot -e-1); sequence b holds seqlens[b] tokens from block 0, its chunk the last
// qlens[b] of them (rows qlens[b].. of q are padding: out 0, lse -inf); both null: every sequence is the
// num_queries-token prompt. out [B, Hq, L, D] and lse [B, Hq, L] contiguous; query i of the chunk attends to keys
// 0..its position.
inline int prefill_table(const void* q, long long q_sb, long long q_sh, long long q_st, const int* k_table,
                         const int* v_table, int max_blocks, const void* k_dense, int k_n_dense, const void* k_vals,
                         const void* k_meta, int k_n_sparse, const void* v_dense, int v_n_dense, const void* v_vals,
                         const void* v_meta, int v_n_sparse, const void* k_rows, long long kr_sb, long long kr_sh,
                         long long kr_st, const int* seqlens, const int* qlens, int batch, int num_q_heads,
                         int num_kv_heads, int num_queries, float scale, void* out, float* lse, void* stream) {
  const long long rows_k = 64LL * k_n_dense, rows_v = 64LL * v_n_dense;  // a pool as rows [B, Hkv, rows, D]
  if (batch < 1 || batch > 65535 || num_kv_heads < 1 || num_q_heads != num_kv_heads * kGroup ||
      num_q_heads > 65535 || num_queries < 1 || q_st < kD || 64LL * max_blocks < num_queries || !seqlens != !qlens ||
      k_n_dense < 1 ||
      v_n_dense < 1 || k_n_sparse < 0 || v_n_sparse < 0 || rows_k > INT32_MAX || rows_v > INT32_MAX ||
      reinterpret_cast<uintptr_t>(k_dense) % 16 || reinterpret_cast<uintptr_t>(v_dense) % 16)
    return cudaErrorInvalidValue;
  // k_rows: the prompt's dense K rows instead of K's table (HieraCache.prefill "balanced" of a whole prompt); TMA
  // wants a 16-byte aligned base and strides of multiples of 16 bytes
  if (k_rows && (seqlens || kr_st < kD || kr_st % 8 || kr_sh % 8 || kr_sb % 8 ||
                 reinterpret_cast<uintptr_t>(k_rows) % 16))
    return cudaErrorInvalidValue;
  if (!encode_tiled()) return cudaErrorNotSupported;
  // a block's TMA tiles at row 64 * slot (k_rows: slab j at row 64 j, rows past the prompt zero-filled)
  CUtensorMap map, v_map;
  if (!(k_rows ? k_tensor_map(&map, k_rows, kr_sb, kr_sh, kr_st, num_queries, num_kv_heads, batch)
               : k_tensor_map(&map, k_dense, num_kv_heads * rows_k * kD, rows_k * kD, kD, int(rows_k), num_kv_heads,
                              batch)) ||
      !k_tensor_map(&v_map, v_dense, num_kv_heads * rows_v * kD, rows_v * kD, kD, int(rows_v), num_kv_heads, batch))
    return cudaErrorInvalidValue;
  const int capacity = 64 * ((num_queries + 63) / 64);
  PrefillParams p = params(q, q_sb, q_sh, q_st, k_vals, k_meta, v_vals, v_meta, capacity, num_kv_heads, num_queries,
                           scale, out, lse);
  p.k_table = k_table, p.v_table = v_table, p.max_blocks = max_blocks, p.seqlens = seqlens, p.qlens = qlens;
  p.k_n_dense = k_n_dense, p.v_n_dense = v_n_dense, p.k_rows = k_rows != nullptr;
  p.k_n_sparse = k_n_sparse, p.v_n_sparse = v_n_sparse;
  return launch(p, num_queries % kCtaQ != 0 || seqlens, num_queries, num_q_heads, batch, stream, map, v_map);
}
