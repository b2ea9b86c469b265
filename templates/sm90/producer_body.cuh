// The producer: statements of prefill_kernel's body (kernel_body.cuh), run by one thread of the producer
// warpgroup. It fills the ring of kStages stages, one 64-key slab a stage, completion counted in bytes on the
// stage's `full` mbarrier; the consumers release a stage on its `empty` one. Uses the kernel's sm, prm, k_tma,
// v_tma, kv_head, h, b, n_slabs and kv_len.
//   all-2:4    per slab four cp.async.bulk copies of the cache's K values, K metadata, V values, V metadata
//              (contiguous in the cache format; the last slabs of a prompt in part: the cache holds whole
//              32-token chunks)
//   balanced   per slab TMA tile loads of the dense K rows (64 keys x 64 channels each, 128-byte swizzled by the
//              copy engine, rows past the tensor zero-filled) and the two bulk copies of V
//   tables     per slab the K and V table entries of its block: a dense slot (entry e >= 0) as TMA tiles of its
//              rows, a 2:4 slot (e < 0: slot -e-1) as its values and metadata; the stage's tiers go to sm.tier
      if constexpr (kTable) {
        // Per slab the K and V table entries of its block, loaded before the stage wait. A slab past the sequence's
        // keys (a chunk's last queries may reach into one; their P there is 0 by the mask, but 0 times stale
        // shared memory can be NaN) is two zero tiles of each: TMA boxes past the pools' rows, filled with zeros.
        const int* kt = prm.k_table + kv_head * prm.max_blocks;
        const int* vt = prm.v_table + kv_head * prm.max_blocks;
        const int blocks = (kv_len + 63) / 64, kvh = h / kGroup;
        // a dense slot as the TMA tiles of its rows, a 2:4 slot as its values and metadata
        auto copy_block = [&](int e, unsigned char* rows, const CUtensorMap* map, const unsigned char* vals,
                              const unsigned char* meta, int n_sparse, uint64_t* bar) {
          if (e >= 0) {  // its two 64-channel halves
            tma_load_k(rows, map, 0, 64 * e, kvh, b, bar);
            tma_load_k(rows + kHalfBytes, map, 64, 64 * e, kvh, b, bar);
          } else {
            const long long slot = kv_head * n_sparse + (-e - 1);
            bulk_copy(rows, vals + slot * kSpVals, kSpVals, bar);
            bulk_copy(rows + kDenseBytes, meta + slot * kSpMeta, kSpMeta, bar);
          }
        };
        for (int j = 0; j < n_slabs; ++j) {
          const int st = j % kStages;
          const int ke = prm.k_rows ? j : j < blocks ? kt[j] : prm.k_n_dense, ve = j < blocks ? vt[j] : prm.v_n_dense;
          if (j >= kStages) mbar_wait(&sm.empty[st], ((j / kStages) - 1) & 1);
          unsigned char* dst = sm.stage[st];
          sm.tier[st] = (ke >= 0 ? 1 : 0) | (ve >= 0 ? 2 : 0);  // published by the arrive (release) below
          mbar_expect_tx(&sm.full[st], (ke >= 0 ? kDenseBytes : kSpVals + kSpMeta) +
                                           (ve >= 0 ? kDenseBytes : kSpVals + kSpMeta));
          copy_block(ke, dst + kKRows, k_tma, prm.k_vals, prm.k_meta, prm.k_n_sparse, &sm.full[st]);
          copy_block(ve, dst + kVRows, v_tma, prm.v_vals, prm.v_meta, prm.v_n_sparse, &sm.full[st]);
        }
      } else {
        const unsigned char* kvh_vals = prm.k_vals + kv_head * prm.vals_head_bytes;  // 2:4 K only
        const unsigned char* kvh_meta = prm.k_meta + kv_head * prm.meta_head_bytes;
        const unsigned char* vvh_vals = prm.v_vals + kv_head * prm.vals_head_bytes;
        const unsigned char* vvh_meta = prm.v_meta + kv_head * prm.meta_head_bytes;
        for (int j = 0; j < n_slabs; ++j) {
          const int st = j % kStages;
          if (j >= kStages) mbar_wait(&sm.empty[st], ((j / kStages) - 1) & 1);
          unsigned char* dst = sm.stage[st];
          // 32-token chunks of this slab inside the cache (2, or 1 or 0 at the end of a prompt)
          const int chunks = kTail ? max(0, min(2, (prm.capacity - 64 * j) / 32)) : 2;
          mbar_expect_tx(&sm.full[st], kKBytes + chunks * kChunkBytes);
          if constexpr (kDenseK) {  // the two 64-channel halves of the K rows
            tma_load_k(dst + kKRows, k_tma, 0, 64 * j, h / kGroup, b, &sm.full[st]);
            tma_load_k(dst + kKRows + kHalfBytes, k_tma, 64, 64 * j, h / kGroup, b, &sm.full[st]);
          }
          if (chunks) {
            if constexpr (!kDenseK) {
              bulk_copy(dst + kKVals, kvh_vals + j * kSpVals, chunks * (kSpVals / 2), &sm.full[st]);
              bulk_copy(dst + kKMeta, kvh_meta + j * kSpMeta, chunks * (kSpMeta / 2), &sm.full[st]);
            }
            bulk_copy(dst + kVVals, vvh_vals + j * kSpVals, chunks * (kSpVals / 2), &sm.full[st]);
            bulk_copy(dst + kVMeta, vvh_meta + j * kSpMeta, chunks * (kSpMeta / 2), &sm.full[st]);
          }
        }
      }
