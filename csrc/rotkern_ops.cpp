// torch.ops.rotkern.rotated_adamw_unit_: one rotated AdamW step over one rotation unit, CPU path.
//
// The same math as rotkern.kernels.reference.rotated_adamw_ref (paper Alg. 4, App. A.1), per block of n
// coordinates of each of the unit's vectors:
//   g~ = R (pi g)[block]          gather through pi, rotate (a BLAS GEMM over a tile of blocks)
//   m  = lerp(m, g~, 1 - b1);  v = b2 v + (1 - b2) g~^2;  v' = max(v_max, v) with amsgrad
//   u  = m / (sqrt(v') / sqrt(1 - b2^t) + eps)
//   p[pi[block]] = p (1 - lr wd mask) - lr / (1 - b1^t) (R^T u)
//
// Where the time goes, and how each part is kept near its floor (benchmarks/bench_cpu_step.py measures them):
// - GEMMs: each tile is one BLAS call of a few hundred rows (kTileElems), enough to amortise the packing of R
//   and reach the large-GEMM rate; rows and flat units multiply X R^T on (rows, n) tiles, column units R X on
//   (n, columns) tiles, so a column's coordinates (strided in memory) are read as whole contiguous rows.
// - Flat units' permutation (global and layer scopes): a random gather of d elements misses the caches and
//   the TLB on every element. It is applied instead through precomputed tables (FlatPermTables,
//   flat_perm_tables): one pass over the gradient in memory order writes each element to its bucket of the
//   permuted vector in a workspace (a few hundred sequential write streams, which the caches absorb), each
//   tile reorders its own buckets in cache, and the update goes back the same way. No search, no random
//   access to memory outside the cache.
// - Element-wise Adam: vectorised kernels chosen at run time (adam_simd.h).
// - Threads: tiles (and the streaming passes' chunks) run over torch's intra-op threads with at::parallel_for,
//   each thread in its own 64-byte-aligned scratch buffers. Tile shapes do not depend on the thread count and
//   tiles write disjoint memory, so the result is the same for any number of threads.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "adam_simd.h"
#include "rotated_adamw.h"

namespace rotkern {
namespace {

// Elements per tile buffer: 1 MiB of fp32, about 340 rows of n = 768. From about 128 rows on, the BLAS runs
// near its large-GEMM rate (21-row GEMMs ran at ~74% of it: R is re-packed for too little work); tiles of 2^17
// to 2^19 elements measured within noise of each other on whole steps, and smaller ones balance better over
// threads.
constexpr int64_t kTileElems = 1 << 18;
// Work item of element-wise and streaming passes.
constexpr int64_t kChunk = 1 << 16;
// Staging chunk for params or grads that are not fp32 (on the stack).
constexpr int64_t kStage = 512;
// Largest bucket of a flat permutation: positions inside a bucket are uint16.
constexpr int64_t kMaxBucket = 1 << 16;

FlatSplit flat_split(int64_t length, int64_t block) {
  return FlatSplit(length, block, std::max<int64_t>(1, kTileElems / block), kMaxBucket);
}

// Per-thread scratch buffers, grown on demand and kept: allocating a tile's buffers on every call would map and
// fault fresh pages each step. 64-byte aligned, so two threads never share a cache line.
float* scratch(int which, int64_t elems) {
  struct Buffer {
    float* data = nullptr;
    int64_t capacity = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[2];
  Buffer& b = buffers[which];
  if (b.capacity < elems) {
    std::free(b.data);
    b.data = nullptr;
    b.capacity = 0;
    const size_t bytes = (static_cast<size_t>(elems) * sizeof(float) + 63) / 64 * 64;
    b.data = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(b.data, "rotated_adamw_unit_: out of memory for a ", bytes, "-byte tile buffer");
    b.capacity = elems;
  }
  return b.data;
}

// A split of `items` work items into tiles of about `target` items: an even number of tiles above one, sizes
// differing by at most one item, so that two threads get equal shares. It never depends on the thread count,
// since the result would (a row's GEMM may round differently in a call of another shape).
struct Tiling {
  int64_t items, tiles;
  Tiling(int64_t items_, int64_t target) : items(items_), tiles((items_ + target - 1) / target) {
    if (tiles > 1) tiles += tiles & 1;
  }
  int64_t begin(int64_t t) const { return t * items / tiles; }
  int64_t end(int64_t t) const { return (t + 1) * items / tiles; }
  int64_t most() const { return (items + tiles - 1) / tiles; }
};

// Runs f(tile) for tile in [0, tiles) over torch's threads, handing tiles out one at a time (tiles of a unit
// differ in size, and a unit may have few): a static split would leave a thread idle behind a barrier.
template <typename F>
void parallel_tiles(int64_t tiles, const F& f) {
  if (tiles <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tiles, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < tiles; t = next.fetch_add(1)) f(t);
  });
}

template <typename param_t, typename grad_t>
struct Tensors {
  std::vector<param_t*> p;
  std::vector<const grad_t*> g;
  std::vector<float*> m, v, vmax;  // vmax: empty without amsgrad
  float* max_sq(int64_t t, int64_t off) const { return vmax.empty() ? nullptr : vmax[t] + off; }
};

// dst = sign * src in fp32 (multiplying by +-1 is exact).
template <typename T>
inline void load_signed(float* __restrict__ dst, const T* __restrict__ src, int64_t n, float sign) {
  for (int64_t k = 0; k < n; ++k) dst[k] = sign * static_cast<float>(src[k]);
}

// p = p * decay + step * z, rounded once to the param dtype.
template <typename param_t>
inline void apply(const simd::Kernels& K, param_t* p, const float* z, int64_t n, float decay, float step) {
  if constexpr (std::is_same_v<param_t, float>) {
    K.apply_update(decay, step, p, z, n);
  } else {
    float buf[kStage];
    for (int64_t a = 0; a < n; a += kStage) {
      const int64_t c = std::min(kStage, n - a);
      load_signed(buf, p + a, c, 1.0f);
      K.apply_update(decay, step, buf, z + a, c);
      for (int64_t k = 0; k < c; ++k) p[a + k] = static_cast<param_t>(buf[k]);
    }
  }
}

// Calls fn(k0, k1, seg, offset) for the pieces of positions [q, q + count) of a flat unit: position q + k
// (k0 <= k < k1) sits at offset + (k - k0) of tensor seg.tensor. One search per call, none per element.
template <typename Fn>
inline void for_each_piece(const UnitParams& u, int64_t q, int64_t count, Fn&& fn) {
  auto it = std::upper_bound(u.segs.begin(), u.segs.end(), q,
                             [](int64_t pos, const Segment& s) { return pos < s.vstart; }) - 1;
  for (int64_t k = 0; k < count; ++it) {
    const int64_t stop = std::min(count, it->vstart + it->numel - q);
    if (stop > k) fn(k, stop, *it, it->start + (q + k - it->vstart));
    k = stop;
  }
}

// out (rows x nb) = in (rows x nb) R^T (transpose) or in R; row-major, one BLAS call.
void gemm_right(float* out, const float* in, int64_t rows, int64_t nb, const float* rot, bool transpose) {
  auto x = at::from_blob(const_cast<float*>(in), {rows, nb}, at::kFloat);
  auto y = at::from_blob(out, {rows, nb}, at::kFloat);
  auto r = at::from_blob(const_cast<float*>(rot), {nb, nb}, at::kFloat);
  at::mm_out(y, x, transpose ? r.t() : r);
}

// out (nb x cols) = R in (or R^T in with transpose); row-major, one BLAS call.
void gemm_left(float* out, const float* in, int64_t nb, int64_t cols, const float* rot, bool transpose) {
  auto x = at::from_blob(const_cast<float*>(in), {nb, cols}, at::kFloat);
  auto y = at::from_blob(out, {nb, cols}, at::kFloat);
  auto r = at::from_blob(const_cast<float*>(rot), {nb, nb}, at::kFloat);
  at::mm_out(y, transpose ? r.t() : r, x);
}

// ---------------------------------------------------------------------------------------------------------
// Unrotated units (scope none, and 1-D params the neuron scopes leave alone): Adam element-wise in place, over
// every segment of the call (the launcher batches all such units of a step into one call).
template <typename param_t, typename grad_t>
void run_identity(const UnitParams& u, const Tensors<param_t, grad_t>& t) {
  const simd::Kernels& K = simd::kernels();
  struct Item {
    const Segment* seg;
    int64_t offset, count;
  };
  std::vector<Item> items;
  for (const auto& s : u.segs) {
    for (int64_t a = 0; a < s.numel; a += kChunk) items.push_back({&s, s.start + a, std::min(kChunk, s.numel - a)});
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      const int64_t ti = it.seg->tensor, off = it.offset;
      float* m = t.m[ti] + off;
      float* v = t.v[ti] + off;
      float* vmax = t.max_sq(ti, off);
      param_t* p = t.p[ti] + off;
      const grad_t* g = t.g[ti] + off;
      if constexpr (std::is_same_v<param_t, float> && std::is_same_v<grad_t, float>) {
        K.adam_identity(u.s, it.seg->decay, p, g, m, v, vmax, it.count);
      } else {
        float pb[kStage], gb[kStage];
        for (int64_t a = 0; a < it.count; a += kStage) {
          const int64_t c = std::min(kStage, it.count - a);
          load_signed(pb, p + a, c, 1.0f);
          load_signed(gb, g + a, c, 1.0f);
          K.adam_identity(u.s, it.seg->decay, pb, gb, m + a, v + a, vmax ? vmax + a : nullptr, c);
          for (int64_t k = 0; k < c; ++k) p[a + k] = static_cast<param_t>(pb[k]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Flat units (global and layer scopes): one vector of length L over the segments, cut into tiles of whole blocks
// (FlatSplit: evenly, the residual block last), each of whole buckets.
//   pass 1   workspace[slot[j]] = sign g[j]            streaming over g; appends to every bucket
//   tiles    x = the tile's buckets reordered by local   in cache
//            y = x R^T;  x = adam(y);  y = x R           BLAS
//            workspace[tile] = y reordered back          in cache
//   pass 3   p[j] = p[j] decay + step workspace[slot[j]] streaming over p
// Without a permutation the tiles read g and write p directly.
template <typename param_t, typename grad_t>
void run_flat(const UnitParams& u, const Tensors<param_t, grad_t>& t) {
  const simd::Kernels& K = simd::kernels();
  const int64_t L = u.length, n = u.block, full = u.num_blocks * u.block;
  const FlatPermTables& fp = u.flat_perm;
  const bool permuted = fp.slot != nullptr;
  const FlatSplit sp = permuted ? fp.split : flat_split(L, n);
  const float sign = u.s.sign, step = u.s.step;
  float* const ws = fp.workspace;

  if (permuted) {
    // Tables come from the caller: check every index this step uses before anything is written but the
    // workspace (a malformed table must not write outside it, nor leave params half-updated).
    std::atomic<bool> bad{false};
    at::parallel_for(0, L, kChunk, [&](int64_t j0, int64_t j1) {
      bool ok = true;
      for (int64_t c0 = j0; c0 < j1 && ok; c0 += kStage * 8) {
        // Check a cached chunk of slot (a vectorised min / max), then scatter it unchecked.
        const int64_t c1 = std::min(j1, c0 + kStage * 8);
        int32_t lo_s = 0, hi_s = 0;
        for (int64_t k = c0; k < c1; ++k) {
          lo_s = std::min(lo_s, fp.slot[k]);
          hi_s = std::max(hi_s, fp.slot[k]);
        }
        ok = lo_s >= 0 && hi_s < L;
        if (!ok) break;
        for_each_piece(u, c0, c1 - c0, [&](int64_t k0, int64_t k1, const Segment& seg, int64_t off) {
          const grad_t* g = t.g[seg.tensor] + off;
          const int32_t* slot = fp.slot + c0 + k0;
          for (int64_t k = 0; k < k1 - k0; ++k) ws[slot[k]] = sign * static_cast<float>(g[k]);
        });
      }
      // local[s] must land inside the bucket of slot s.
      for (int64_t s = j0; s < j1 && ok;) {
        const int64_t b = sp.bucket_of(s), stop = std::min(j1, sp.bucket_end(b));
        const int64_t size = sp.bucket_end(b) - sp.bucket_begin(b);
        uint16_t worst = 0;
        for (int64_t k = s; k < stop; ++k) worst = std::max(worst, fp.local[k]);
        ok &= worst < size;
        s = stop;
      }
      if (!ok) bad.store(true, std::memory_order_relaxed);
    });
    TORCH_CHECK(!bad.load(), "rotated_adamw_unit_: perm_slot / perm_local hold out-of-range entries (build them "
                "with torch.ops.rotkern.flat_perm_tables)");
  }

  const int64_t most = (sp.items + sp.tiles - 1) / sp.tiles * n;
  parallel_tiles(sp.tiles, [&](int64_t tile) {
    float* x = scratch(0, most);
    float* y = scratch(1, most);
    const int64_t b0 = tile * sp.per_tile, b1 = b0 + sp.per_tile;
    const int64_t a = sp.bucket_begin(b0), e = sp.bucket_begin(b1), count = e - a;
    if (count == 0) return;
    if (permuted) {
      // Each bucket's values, in source order, to their positions: in cache (a bucket spans at most 256 KiB).
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t base = sp.bucket_begin(b), size = sp.bucket_end(b) - base;
        const uint16_t* loc = fp.local + base;
        const float* src = ws + base;
        float* dst = x + (base - a);
        for (int64_t s = 0; s < size; ++s) dst[loc[s]] = src[s];
      }
    } else {
      for_each_piece(u, a, count, [&](int64_t k0, int64_t k1, const Segment& seg, int64_t off) {
        load_signed(x + k0, t.g[seg.tensor] + off, k1 - k0, sign);
      });
    }
    // Full blocks: positions [a, min(e, full)); the residual block [full, L) when this tile holds it.
    const int64_t rows = std::max<int64_t>(0, std::min(e, full) - a) / n;
    const int64_t res_at = full - a;
    if (rows) gemm_right(y, x, rows, n, u.rot_n, true);
    if (e > full) gemm_right(y + res_at, x + res_at, 1, L - full, u.rot_p, true);
    for_each_piece(u, a, count, [&](int64_t k0, int64_t k1, const Segment& seg, int64_t off) {
      K.adam_update(u.s, y + k0, t.m[seg.tensor] + off, t.v[seg.tensor] + off, t.max_sq(seg.tensor, off), x + k0,
                    k1 - k0);
    });
    if (rows) gemm_right(y, x, rows, n, u.rot_n, false);
    if (e > full) gemm_right(y + res_at, x + res_at, 1, L - full, u.rot_p, false);
    if (permuted) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t base = sp.bucket_begin(b), size = sp.bucket_end(b) - base;
        const uint16_t* loc = fp.local + base;
        const float* src = y + (base - a);
        float* dst = ws + base;
        for (int64_t s = 0; s < size; ++s) dst[s] = src[loc[s]];
      }
    } else {
      for_each_piece(u, a, count, [&](int64_t k0, int64_t k1, const Segment& seg, int64_t off) {
        apply(K, t.p[seg.tensor] + off, y + k0, k1 - k0, seg.decay, step);
      });
    }
  });

  if (permuted) {
    at::parallel_for(0, L, kChunk, [&](int64_t j0, int64_t j1) {
      float z[kStage];
      for_each_piece(u, j0, j1 - j0, [&](int64_t k0, int64_t k1, const Segment& seg, int64_t off) {
        param_t* p = t.p[seg.tensor] + off;
        const int32_t* slot = fp.slot + j0 + k0;
        for (int64_t a = 0; a < k1 - k0; a += kStage) {
          const int64_t c = std::min(kStage, k1 - k0 - a);
          for (int64_t k = 0; k < c; ++k) z[k] = ws[slot[a + k]];
          apply(K, p + a, z, c, seg.decay, step);
        }
      });
    });
  }
}

// ---------------------------------------------------------------------------------------------------------
// Rows units (output scope): vector r is row r of a (k, width) view, contiguous. A tile is up to kTileElems / nb
// (vector, block) items, gathered as rows of an (items, nb) matrix; a permutation (rows longer than n) is
// local to a row, so it is applied while copying the row.
template <typename param_t, typename grad_t>
void run_rows(const UnitParams& u, const Tensors<param_t, grad_t>& t) {
  const simd::Kernels& K = simd::kernels();
  const Segment& seg = u.segs[0];
  const int64_t W = u.width, n = u.block, full = u.num_blocks * u.block;
  const grad_t* g = t.g[seg.tensor] + seg.start;
  param_t* p = t.p[seg.tensor] + seg.start;
  float* m = t.m[seg.tensor] + seg.start;
  float* v = t.v[seg.tensor] + seg.start;
  float* vmax = t.max_sq(seg.tensor, seg.start);
  const float sign = u.s.sign, step = u.s.step, decay = seg.decay;
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t nb = pass == 0 ? n : u.residual;
    const int64_t per_vector = pass == 0 ? u.num_blocks : (u.residual > 0 ? 1 : 0);
    const float* rot = pass == 0 ? u.rot_n : u.rot_p;
    const int64_t items = u.num_vectors * per_vector;
    if (items == 0 || nb == 0) continue;
    const Tiling tiling(items, std::max<int64_t>(1, kTileElems / nb));
    parallel_tiles(tiling.tiles, [&](int64_t tile) {
      float* x = scratch(0, tiling.most() * nb);
      float* y = scratch(1, tiling.most() * nb);
      const int64_t first = tiling.begin(tile), rows = tiling.end(tile) - first;
      // Item i: vector r, first coordinate q; its block sits at r * W + q, unpermuted (moments) or in pi order.
      auto at_ = [&](int64_t i) {
        const int64_t item = first + i, r = item / per_vector;
        return std::pair<int64_t, int64_t>{r, pass == 0 ? (item % per_vector) * n : full};
      };
      for (int64_t i = 0; i < rows; ++i) {
        const auto [r, q] = at_(i);
        float* xr = x + i * nb;
        if (u.perm) {
          const int64_t* pi = u.perm + q;
          const grad_t* row = g + r * W;
          for (int64_t k = 0; k < nb; ++k) xr[k] = sign * static_cast<float>(row[pi[k]]);
        } else {
          load_signed(xr, g + r * W + q, nb, sign);
        }
      }
      gemm_right(y, x, rows, nb, rot, true);
      for (int64_t i = 0; i < rows; ++i) {
        const auto [r, q] = at_(i);
        const int64_t off = r * W + q;
        K.adam_update(u.s, y + i * nb, m + off, v + off, vmax ? vmax + off : nullptr, x + i * nb, nb);
      }
      gemm_right(y, x, rows, nb, rot, false);
      for (int64_t i = 0; i < rows; ++i) {
        const auto [r, q] = at_(i);
        const float* zr = y + i * nb;
        if (u.perm) {
          const int64_t* pi = u.perm + q;
          param_t* row = p + r * W;
          for (int64_t k = 0; k < nb; ++k) {
            row[pi[k]] = static_cast<param_t>(static_cast<float>(row[pi[k]]) * decay + step * zr[k]);
          }
        } else {
          apply(K, p + r * W + q, zr, nb, decay, step);
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------------
// Cols units (input scope): vector r is column r of an (L, width) view. A tile is one block of nb coordinates
// of up to kTileElems / nb consecutive columns: the block's nb (permuted) rows of the view, each a contiguous
// run of columns, form X (nb x cols), rotated from the left (Y = R X), so no column is ever read strided. The
// moments of rotated coordinate i of column r sit at (i, r): contiguous runs too.
template <typename param_t, typename grad_t>
void run_cols(const UnitParams& u, const Tensors<param_t, grad_t>& t) {
  const simd::Kernels& K = simd::kernels();
  const Segment& seg = u.segs[0];
  const int64_t W = u.width, n = u.block, full = u.num_blocks * u.block;
  const grad_t* g = t.g[seg.tensor] + seg.start;
  param_t* p = t.p[seg.tensor] + seg.start;
  float* m = t.m[seg.tensor] + seg.start;
  float* v = t.v[seg.tensor] + seg.start;
  float* vmax = t.max_sq(seg.tensor, seg.start);
  const float sign = u.s.sign, step = u.s.step, decay = seg.decay;
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t nb = pass == 0 ? n : u.residual;
    const int64_t blocks = pass == 0 ? u.num_blocks : (u.residual > 0 ? 1 : 0);
    const float* rot = pass == 0 ? u.rot_n : u.rot_p;
    if (blocks == 0 || nb == 0) continue;
    // Column chunks of each block (an even number above one: one block's columns balance over two threads).
    const Tiling cols(W, std::max<int64_t>(1, kTileElems / nb));
    const int64_t chunks = cols.tiles;
    parallel_tiles(blocks * chunks, [&](int64_t item) {
      float* x = scratch(0, nb * cols.most());
      float* y = scratch(1, nb * cols.most());
      const int64_t q = pass == 0 ? (item / chunks) * n : full;
      const int64_t c0 = cols.begin(item % chunks), cw = cols.end(item % chunks) - c0;
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t src = u.perm ? u.perm[q + k] : q + k;
        load_signed(x + k * cw, g + src * W + c0, cw, sign);
      }
      gemm_left(y, x, nb, cw, rot, false);
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t off = (q + k) * W + c0;
        K.adam_update(u.s, y + k * cw, m + off, v + off, vmax ? vmax + off : nullptr, x + k * cw, cw);
      }
      gemm_left(y, x, nb, cw, rot, true);
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t dst = u.perm ? u.perm[q + k] : q + k;
        apply(K, p + dst * W + c0, y + k * cw, cw, decay, step);
      }
    });
  }
}

template <typename param_t, typename grad_t>
void run_unit(const UnitParams& u, const Tensors<param_t, grad_t>& t) {
  if (!u.rot_n && !u.rot_p) return run_identity(u, t);
  if (u.layout == kRows) return run_rows(u, t);
  if (u.layout == kCols) return run_cols(u, t);
  return run_flat(u, t);
}

// ---------------------------------------------------------------------------------------------------------
// The tables of FlatPermTables from pi (see rotated_adamw.h): O(L), done once per unit by the launcher. Also
// returns the buckets' first positions (buckets + 1 of them), which the kernel recomputes from (L, n).
std::tuple<at::Tensor, at::Tensor, at::Tensor> build_flat_perm_tables(const at::Tensor& perm, int64_t block_size) {
  TORCH_CHECK(perm.device().is_cpu() && perm.scalar_type() == at::kLong && perm.dim() == 1,
              "flat_perm_tables: perm must be a 1-D int64 CPU tensor");
  TORCH_CHECK(block_size >= 1 && block_size <= 4096, "flat_perm_tables: block_size must be in [1, 4096], got ",
              block_size);
  const int64_t L = perm.numel();
  TORCH_CHECK(L < (int64_t(1) << 31), "flat_perm_tables: ", L, " coordinates; the tables index with int32");
  const auto pc = perm.contiguous();
  const int64_t* pi = pc.data_ptr<int64_t>();
  const FlatSplit sp = flat_split(L, block_size);
  std::vector<int32_t> inv(L, -1);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t j = pi[i];
    TORCH_CHECK(j >= 0 && j < L && inv[j] < 0, "flat_perm_tables: perm is not a permutation of range(", L, ")");
    inv[j] = static_cast<int32_t>(i);
  }
  auto slot = at::empty({L}, at::kInt);
  auto local = at::empty({L}, at::kShort);
  int32_t* sl = slot.data_ptr<int32_t>();
  auto* lo = reinterpret_cast<uint16_t*>(local.data_ptr<int16_t>());
  std::vector<int64_t> fill(sp.buckets, 0);
  for (int64_t j = 0; j < L; ++j) {  // sources in increasing order: each bucket's slots fill in memory order
    const int64_t i = inv[j], k = sp.bucket_of(i), base = sp.bucket_begin(k), s = base + fill[k]++;
    sl[j] = static_cast<int32_t>(s);
    lo[s] = static_cast<uint16_t>(i - base);
  }
  auto starts = at::empty({sp.buckets + 1}, at::kLong);  // for tests and inspection; the kernel recomputes them
  for (int64_t b = 0; b <= sp.buckets; ++b) starts.data_ptr<int64_t>()[b] = sp.bucket_begin(b);
  return {slot, local, starts};
}

void check_list(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& params, const char* name,
                bool fp32) {
  TORCH_CHECK(ts.size() == params.size(), "rotated_adamw_unit_: ", name, " has ", ts.size(), " tensors, params ",
              params.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    TORCH_CHECK(t.device().is_cpu(), "rotated_adamw_unit_: ", name, "[", i, "] is on ", t.device(),
                "; this is the CPU implementation");
    TORCH_CHECK(t.is_contiguous(), "rotated_adamw_unit_: ", name, "[", i, "] is not contiguous");
    TORCH_CHECK(!fp32 || t.scalar_type() == at::kFloat, "rotated_adamw_unit_: ", name, "[", i,
                "] must be float32 (moments are fp32), got ", t.scalar_type());
    TORCH_CHECK(t.numel() == params[i].numel(), "rotated_adamw_unit_: ", name, "[", i, "] has ", t.numel(),
                " elements, params[", i, "] ", params[i].numel());
  }
}

void rotated_adamw_unit_cpu(at::TensorList params_in, at::TensorList grads_in, at::TensorList exp_avgs_in,
                            at::TensorList exp_avg_sqs_in, at::TensorList max_exp_avg_sqs_in, const at::Tensor& step,
                            const at::Tensor& lr, at::IntArrayRef seg_tensor, at::IntArrayRef seg_start,
                            at::IntArrayRef seg_numel, at::IntArrayRef seg_decay, int64_t layout, int64_t width,
                            int64_t num_vectors, int64_t length, int64_t block_size,
                            const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& rot_n,
                            const c10::optional<at::Tensor>& rot_p, double beta1, double beta2, double eps,
                            double weight_decay, bool amsgrad, bool maximize,
                            const c10::optional<at::Tensor>& perm_slot, const c10::optional<at::Tensor>& perm_local,
                            const c10::optional<at::Tensor>& workspace,
                            const c10::optional<at::Tensor>& grad_scale,
                            const c10::optional<at::Tensor>& found_inf,
                            const c10::optional<at::Tensor>& beta1_tensor,
                            const c10::optional<at::Tensor>& beta2_tensor) {
  const std::vector<at::Tensor> params = params_in.vec();
  std::vector<at::Tensor> grads = grads_in.vec();
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "rotated_adamw_unit_: no params");
  check_list(params, params, "params", false);
  check_list(grads, params, "grads", false);
  check_list(exp_avgs_in.vec(), params, "exp_avgs", true);
  check_list(exp_avg_sqs_in.vec(), params, "exp_avg_sqs", true);
  if (amsgrad) check_list(max_exp_avg_sqs_in.vec(), params, "max_exp_avg_sqs", true);
  for (size_t i = 1; i < n; ++i) {
    TORCH_CHECK(params[i].scalar_type() == params[0].scalar_type() && grads[i].scalar_type() == grads[0].scalar_type(),
                "rotated_adamw_unit_: the tensors of one unit must share param and grad dtypes (got ",
                params[i].scalar_type(), " and ", params[0].scalar_type(), "); use backend='eager'");
  }
  TORCH_CHECK(layout == kFlat || layout == kRows || layout == kCols, "rotated_adamw_unit_: bad layout ", layout);
  TORCH_CHECK(num_vectors >= 1 && length >= 1, "rotated_adamw_unit_: empty unit");
  const size_t nseg = seg_tensor.size();
  TORCH_CHECK(nseg >= 1 && seg_start.size() == nseg && seg_numel.size() == nseg && seg_decay.size() == nseg,
              "rotated_adamw_unit_: segment lists must be non-empty and of equal length");
  TORCH_CHECK(layout == kFlat || (nseg == 1 && width >= 1), "rotated_adamw_unit_: a rows/cols unit has one segment");
  TORCH_CHECK(step.numel() == 1 && step.device().is_cpu(), "rotated_adamw_unit_: step must be a CPU scalar");
  TORCH_CHECK(lr.numel() == 1 && lr.device().is_cpu(), "rotated_adamw_unit_: lr must be a CPU scalar");

  for (const auto* x : {&grad_scale, &found_inf, &beta1_tensor, &beta2_tensor}) {
    TORCH_CHECK(!x->has_value() || ((*x)->numel() == 1 && (*x)->device().is_cpu() && (*x)->is_floating_point()),
                "rotated_adamw_unit_: grad_scale, found_inf and tensor betas must be one-element floating-point CPU "
                "tensors");
  }
  // Tensor betas (torch.compile passes them as tensors: a float argument would be read on the host at trace time).
  if (beta1_tensor.has_value()) beta1 = beta1_tensor->item<double>();
  if (beta2_tensor.has_value()) beta2 = beta2_tensor->item<double>();

  const double t = step.item<double>();
  const double lr_v = lr.item<double>();
  UnitParams u;
  u.layout = layout;
  u.width = width;
  u.num_vectors = num_vectors;
  u.length = length;
  int64_t vstart = 0;
  for (size_t s = 0; s < nseg; ++s) {
    const int64_t ti = seg_tensor[s];
    TORCH_CHECK(ti >= 0 && ti < static_cast<int64_t>(n), "rotated_adamw_unit_: segment tensor index out of range");
    TORCH_CHECK(seg_start[s] >= 0 && seg_numel[s] >= 0 && seg_start[s] + seg_numel[s] <= params[ti].numel(),
                "rotated_adamw_unit_: segment ", s, " [", seg_start[s], ", ", seg_start[s] + seg_numel[s],
                ") is outside params[", ti, "] of ", params[ti].numel(), " elements");
    // Rounded to fp32 as the reference's p.mul_(python float) rounds its scalar.
    const float decay = static_cast<float>(1.0 - lr_v * weight_decay * (seg_decay[s] ? 1.0 : 0.0));
    u.segs.push_back({ti, seg_start[s], seg_numel[s], vstart, decay});
    vstart += seg_numel[s];
  }
  const int64_t covered = layout == kFlat ? vstart : seg_numel[0];
  TORCH_CHECK(covered == num_vectors * length, "rotated_adamw_unit_: segments cover ", covered,
              " elements, the unit ", num_vectors, " x ", length);
  TORCH_CHECK(layout != kFlat || num_vectors == 1, "rotated_adamw_unit_: a flat unit has one vector");
  TORCH_CHECK(layout == kFlat || seg_numel[0] % width == 0, "rotated_adamw_unit_: segment is not whole rows");
  TORCH_CHECK(layout != kRows || width == length, "rotated_adamw_unit_: rows of width ", width, " but L = ", length);
  TORCH_CHECK(layout != kCols || seg_numel[0] / width == length, "rotated_adamw_unit_: columns of the wrong length");

  const bool rotated = rot_n.has_value() || rot_p.has_value();
  const bool permuted = perm.has_value() || perm_slot.has_value();
  TORCH_CHECK(rotated || !permuted, "rotated_adamw_unit_: a permutation needs a rotation (an unrotated unit is "
              "element-wise)");
  TORCH_CHECK(!rotated || (block_size >= 1 && block_size <= 4096), "rotated_adamw_unit_: block_size must be in "
              "[1, 4096], got ", block_size);
  u.block = rotated ? block_size : 1;
  u.num_blocks = length / u.block;
  u.residual = length - u.num_blocks * u.block;
  auto check_rot = [](const c10::optional<at::Tensor>& r, int64_t size, const char* name) -> const float* {
    if (size == 0) return nullptr;
    TORCH_CHECK(r.has_value(), "rotated_adamw_unit_: ", name, " is missing for a block of ", size);
    const auto& m = *r;
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kFloat && m.is_contiguous() && m.dim() == 2 &&
                    m.size(0) == size && m.size(1) == size,
                "rotated_adamw_unit_: ", name, " must be a contiguous (row-major) float32 CPU matrix of ", size,
                " x ", size, ", got ", m.sizes(), " ", m.scalar_type(), m.is_contiguous() ? "" : " (non-contiguous)");
    return m.data_ptr<float>();
  };
  u.rot_n = rotated ? check_rot(rot_n, u.num_blocks > 0 ? u.block : 0, "rot_n") : nullptr;
  u.rot_p = rotated ? check_rot(rot_p, u.residual, "rot_p") : nullptr;

  // Flat units take pi as streaming tables (FlatPermTables); given pi alone, the tables and workspace are
  // built for this call only (O(L) more work and memory: the launcher caches them instead).
  at::Tensor slot_t, local_t, ws_t;
  if (layout == kFlat && permuted) {
    if (perm_slot.has_value() || perm_local.has_value()) {
      TORCH_CHECK(perm_slot.has_value() && perm_local.has_value(), "rotated_adamw_unit_: perm_slot and perm_local "
                  "come together");
      slot_t = *perm_slot;
      local_t = *perm_local;
    } else {
      std::tie(slot_t, local_t, std::ignore) = build_flat_perm_tables(*perm, u.block);
    }
    TORCH_CHECK(slot_t.device().is_cpu() && slot_t.scalar_type() == at::kInt && slot_t.is_contiguous() &&
                    slot_t.numel() == length,
                "rotated_adamw_unit_: perm_slot must be a contiguous int32 CPU tensor of length ", length);
    TORCH_CHECK(local_t.device().is_cpu() && local_t.scalar_type() == at::kShort && local_t.is_contiguous() &&
                    local_t.numel() == length,
                "rotated_adamw_unit_: perm_local must be a contiguous int16 CPU tensor of length ", length);
    if (workspace.has_value()) {
      ws_t = *workspace;
      TORCH_CHECK(ws_t.device().is_cpu() && ws_t.scalar_type() == at::kFloat && ws_t.is_contiguous() &&
                      ws_t.numel() >= length,
                  "rotated_adamw_unit_: workspace must be a contiguous float32 CPU tensor of at least ", length,
                  " elements");
    } else {
      ws_t = at::empty({length}, at::kFloat);
    }
    u.flat_perm.slot = slot_t.data_ptr<int32_t>();
    u.flat_perm.local = reinterpret_cast<const uint16_t*>(local_t.data_ptr<int16_t>());
    u.flat_perm.split = flat_split(length, u.block);
    u.flat_perm.workspace = ws_t.data_ptr<float>();
  } else if (permuted) {
    TORCH_CHECK(perm.has_value() && !perm_slot.has_value() && !perm_local.has_value(),
                "rotated_adamw_unit_: rows/cols units take perm (int64), not perm_slot / perm_local");
    const auto& pm = *perm;
    TORCH_CHECK(pm.device().is_cpu() && pm.scalar_type() == at::kLong && pm.is_contiguous() && pm.numel() == length,
                "rotated_adamw_unit_: perm must be a contiguous int64 CPU tensor of length ", length);
    u.perm = pm.data_ptr<int64_t>();
    // Short (a row's length): checked on every call, so that a bad index cannot address memory.
    TORCH_CHECK(std::all_of(u.perm, u.perm + length, [&](int64_t j) { return j >= 0 && j < length; }),
                "rotated_adamw_unit_: perm holds indices outside [0, ", length, ")");
  }

  u.s.lerp_weight = static_cast<float>(1.0 - beta1);
  u.s.beta2 = static_cast<float>(beta2);
  u.s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  u.s.eps = static_cast<float>(eps);
  u.s.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
  u.s.step = -static_cast<float>(lr_v / (1.0 - std::pow(beta1, t)));
  u.s.sign = maximize ? -1.0f : 1.0f;
  u.amsgrad = amsgrad;

  // torch.amp.GradScaler, as torch's fused AdamW: a step that found inf/NaN writes nothing (every check above
  // has run, so a bad call still raises), and the gradient is divided by grad_scale where it is read.
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;
  if (grad_scale.has_value()) {
    const float scale = grad_scale->item<float>();
    int e = 0;
    if (std::isfinite(scale) && std::frexp(scale, &e) == 0.5f) {
      // scale = 2^(e-1): g * 2^(1-e) is g / scale exactly (both round the same real number), and free.
      u.s.sign *= std::ldexp(1.0f, 1 - e);
    } else {
      // Any other scale: an IEEE division per element, into fp32 copies (as the eager path unscales).
      for (auto& g : grads) {
        at::Tensor x = g.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
        float* d = x.data_ptr<float>();
        const int64_t n = x.numel();
        at::parallel_for(0, n, 1 << 16, [&](int64_t a, int64_t b) {
          for (int64_t k = a; k < b; ++k) d[k] = d[k] / scale;
        });
        g = x;
      }
    }
  }

  auto ptrs = [](at::TensorList ts) {
    std::vector<float*> out;
    for (const auto& x : ts) out.push_back(x.data_ptr<float>());
    return out;
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "rotated_adamw_unit_", [&] {
    using param_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "rotated_adamw_unit_grad", [&] {
      Tensors<param_t, scalar_t> ts;
      for (const auto& p : params) ts.p.push_back(p.data_ptr<param_t>());
      for (const auto& g : grads) ts.g.push_back(g.data_ptr<scalar_t>());
      ts.m = ptrs(exp_avgs_in);
      ts.v = ptrs(exp_avg_sqs_in);
      if (amsgrad) ts.vmax = ptrs(max_exp_avg_sqs_in);
      run_unit<param_t, scalar_t>(u, ts);
    });
  });
}

}  // namespace

TORCH_LIBRARY(rotkern, m) {
  m.def(
      "rotated_adamw_unit_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor step, Tensor lr, int[] seg_tensor, int[] seg_start, int[] seg_numel, "
      "int[] seg_decay, int layout, int width, int num_vectors, int length, int block_size, Tensor? perm, "
      "Tensor? rot_n, Tensor? rot_p, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
      "bool maximize, Tensor? perm_slot=None, Tensor? perm_local=None, Tensor(e!)? workspace=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? beta1_tensor=None, Tensor? beta2_tensor=None) -> ()");
  m.def("flat_perm_tables(Tensor perm, int block_size) -> (Tensor slot, Tensor local, Tensor bucket_starts)");
}

TORCH_LIBRARY_IMPL(rotkern, CPU, m) {
  m.impl("rotated_adamw_unit_", &rotated_adamw_unit_cpu);
  m.impl("flat_perm_tables", &build_flat_perm_tables);
}

}  // namespace rotkern

// Importing rotkern._C registers the ops above; the module itself reports how it was built and which
// instruction set the element-wise kernels use.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_cuda", [] {
#ifdef ROTKERN_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("simd_isa", [] { return std::string(rotkern::simd::kernels().name); },
        "The instruction set of the element-wise kernels now in use: avx512, avx2 or scalar.");
  m.def("supported_isas", &rotkern::simd::supported_isas, "Instruction sets this CPU runs, best first.");
  m.def("set_simd_isa", &rotkern::simd::set_isa, "Use another instruction set (testing); returns the previous one.");
}
