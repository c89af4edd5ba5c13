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

struct UnitParams {
  int64_t layout;
  int64_t width;        // row width of the (k, width) view (rows/cols layouts)
  int64_t num_vectors;  // V
  int64_t length;       // L
  int64_t block;        // n; for an unrotated unit, the element chunk each work item covers
  int64_t num_blocks;   // L / n
  int64_t residual;     // L - num_blocks * n
  std::vector<Segment> segs;
  const int64_t* perm;  // (L,) with (pi x)[i] = x[perm[i]], or nullptr
  const float* rot_n;   // (n, n) row-major R_n, or nullptr (unrotated unit)
  const float* rot_p;   // (p, p) row-major R_p, or nullptr
  // fp32 scalars, rounded as the reference's tensor ops round them.
  float lerp_weight;  // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float eps;
  float bc2_sqrt;   // sqrt(1 - beta2^t)
  float step_size;  // lr / (1 - beta1^t)
  bool amsgrad;
  bool maximize;
};

}  // namespace rotkern
