// One rotated AdamW step over one rotation unit: the plain-old-data description the kernels read.
//
// A unit is num_vectors vectors of length L rotated by the same block rotation B(pi x) (rotkern.scopes.Unit,
// rotkern.rotations.BlockRotation). Vector r's coordinate j lives in member tensor `tensor` at flat offset
//   rows:  start + r * width + j        (rows of a (k, width) view)
//   cols:  start + j * width + r        (columns of a (k, width) view)
//   flat:  start + (j - vstart)         (one vector; several segments for a multi-tensor global unit)
// Moments are stored in the rotated layout at the *unrotated* position of the rotated coordinate, as the
// eager reference does; the gradient is gathered through pi and the update scattered through pi.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace rotkern {

enum Layout : int64_t { kFlat = 0, kRows = 1, kCols = 2 };

struct Segment {
  int64_t tensor;  // index into the op's tensor lists
  int64_t start;   // first flat offset in that tensor
  int64_t numel;
  int64_t vstart;  // first position in the unit's vector (0 unless the unit spans several tensors)
  float decay;     // 1 - lr * weight_decay * mask: the decoupled weight-decay factor of this segment
};

// How a flat unit of L coordinates (blocks of n, the residual block last) is cut: `items` blocks split evenly into
// `tiles` tiles (an even number above one, so that two threads get equal shares; never dependent on the thread
// count, since the result would be), each tile into `per_tile` buckets of whole blocks, at most 2^16 coordinates
// each. Bucket b covers blocks [b items / buckets, (b + 1) items / buckets): sizes differ by at most one block.
struct FlatSplit {
  int64_t length = 0, block = 1, items = 0, tiles = 0, per_tile = 0, buckets = 0;
  FlatSplit() = default;
  FlatSplit(int64_t L, int64_t n, int64_t tile_target, int64_t max_bucket) : length(L), block(n) {
    items = L / n + (L % n > 0 ? 1 : 0);
    tiles = (items + tile_target - 1) / tile_target;
    if (tiles > 1) tiles += tiles & 1;
    const int64_t most = (items + tiles - 1) / tiles, per_bucket = std::max<int64_t>(1, max_bucket / n);
    per_tile = (most + per_bucket - 1) / per_bucket;
    buckets = tiles * per_tile;
  }
  int64_t position(int64_t item) const { return std::min(length, item * block); }
  int64_t bucket_begin(int64_t b) const { return position(b * items / buckets); }
  int64_t bucket_end(int64_t b) const { return position((b + 1) * items / buckets); }
  // The bucket holding position i: the last b whose first block is at most i's block.
  int64_t bucket_of(int64_t i) const {
    const int64_t x = std::min(i / block, items - 1);
    return ((x + 1) * buckets - 1) / items;
  }
};

// A flat unit's permutation, laid out so that applying it streams (rotkern_ops.cpp, "flat units"). Bucket b's
// slots [bucket_begin(b), bucket_end(b)) hold its coordinates' source positions j in increasing order: slot[j]
// is the slot of source j, and local[s] the position (within its bucket) of the coordinate whose value sits in
// slot s. Gathering is then a pass over the gradient in memory order that appends to every bucket at once (a few
// hundred sequential write streams), plus a reorder inside one cached bucket.
struct FlatPermTables {
  const int32_t* slot = nullptr;    // (L,)
  const uint16_t* local = nullptr;  // (L,)
  FlatSplit split;
  float* workspace = nullptr;  // (L,) fp32: the gradient in slot order, then the update in slot order
};

// The element-wise scalars of one step, rounded to fp32 as the reference's tensor ops round them.
struct AdamScalars {
  float lerp_weight;  // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float eps;
  float bc2_sqrt;  // sqrt(1 - beta2^t)
  float step;      // -lr / (1 - beta1^t): the multiplier of the update
  float sign;      // -1 with maximize (the gradient's sign; applied where the gradient is read)
};

struct UnitParams {
  int64_t layout;
  int64_t width;        // row width of the (k, width) view (rows/cols layouts)
  int64_t num_vectors;  // V
  int64_t length;       // L
  int64_t block;        // n (rotated units)
  int64_t num_blocks;   // L / n
  int64_t residual;     // L - num_blocks * n
  std::vector<Segment> segs;
  const int64_t* perm = nullptr;  // rows/cols: (L,) with (pi x)[i] = x[perm[i]], or nullptr
  FlatPermTables flat_perm;       // flat: the permutation as streaming tables (slot == nullptr: none)
  const float* rot_n = nullptr;   // (n, n) row-major R_n, or nullptr (unrotated unit)
  const float* rot_p = nullptr;   // (p, p) row-major R_p, or nullptr
  AdamScalars s;
  bool amsgrad;
};

}  // namespace rotkern
