// torch.ops.rotkern.rotated_adamw_unit_: one rotated AdamW step over one rotation unit, CPU path.
//
// The same math as rotkern.kernels.reference.rotated_adamw_ref (paper Alg 4, SPEC section 1), per block of n
// coordinates of each of the unit's vectors:
//   g~ = R (pi g)[block]          gather through pi, rotate (row form: X R^T over a tile of blocks)
//   m  = lerp(m, g~, 1 - b1);  v = b2 v + (1 - b2) g~^2;  v' = max(v_max, v) with amsgrad
//   u  = m / (sqrt(v') / sqrt(1 - b2^t) + eps)
//   p[pi[block]] = p (1 - lr wd mask) - lr / (1 - b1^t) (R^T u)
// Work items are tiles of equal-size blocks; tiles run in parallel (at::parallel_for), each through gather,
// one GEMM, the element-wise Adam, a second GEMM and the scatter, in two per-thread buffers of one tile. No
// d-sized temporary is allocated. Blocks are disjoint in the param (pi is a bijection), so tiles never race.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "rotated_adamw.h"

namespace rotkern {
namespace {

// Elements per tile: two fp32 buffers of 64 KiB each stay in a core's L2 next to R.
constexpr int64_t kTileElems = 16384;
// Work-item size of an unrotated (identity) unit, which needs no GEMM.
constexpr int64_t kIdentityChunk = 4096;

template <typename scalar_t>
inline float load(const scalar_t* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Where coordinate j of vector r lives: (tensor, flat offset, segment).
struct Loc {
  int64_t tensor;
  int64_t offset;
  const Segment* seg;
};

inline Loc locate(const UnitParams& u, int64_t r, int64_t j) {
  const Segment& s0 = u.segs[0];
  if (u.layout == kRows) return {s0.tensor, s0.start + r * u.width + j, &s0};
  if (u.layout == kCols) return {s0.tensor, s0.start + j * u.width + r, &s0};
  if (u.segs.size() == 1) return {s0.tensor, s0.start + j, &s0};
  // A global unit: the last segment whose first position is <= j (segments are sorted by vstart).
  auto it = std::upper_bound(u.segs.begin(), u.segs.end(), j,
                             [](int64_t pos, const Segment& s) { return pos < s.vstart; });
  const Segment& s = *(it - 1);
  return {s.tensor, s.start + (j - s.vstart), &s};
}

// Calls fn(k0, k1, tensor, offset, stride, segment) for the affine pieces of coordinates [q, q + count) of
// vector r: coordinate q + k sits at offset + (k - k0) * stride in that tensor. One piece except where a
// global unit's range crosses a segment boundary.
template <typename Fn>
inline void for_each_piece(const UnitParams& u, int64_t r, int64_t q, int64_t count, Fn&& fn) {
  const Segment& s0 = u.segs[0];
  if (u.layout == kRows) return fn(0, count, s0.tensor, s0.start + r * u.width + q, int64_t(1), &s0);
  if (u.layout == kCols) return fn(0, count, s0.tensor, s0.start + q * u.width + r, u.width, &s0);
  auto it = std::upper_bound(u.segs.begin(), u.segs.end(), q,
                             [](int64_t pos, const Segment& s) { return pos < s.vstart; }) - 1;
  for (int64_t k = 0; k < count; ++it) {
    const int64_t stop = std::min(count, it->vstart + it->numel - q);
    fn(k, stop, it->tensor, it->start + (q + k - it->vstart), int64_t(1), &*it);
    k = stop;
  }
}

// Adam on `count` rotated coordinates: g (contiguous) -> m, v (and vmax) at stride `stride` -> update `out`.
inline void adam_span(const UnitParams& u, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                      float* __restrict__ vmax, float* __restrict__ out, int64_t count, int64_t stride) {
  const float w = u.lerp_weight, b2 = u.beta2, omb2 = u.one_minus_beta2, eps = u.eps, bc2 = u.bc2_sqrt;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t i = k * stride;
    const float gk = g[k];
    const float mk = m[i];
    // torch.lerp's formula, so that m matches the reference bit for bit.
    const float mn = w < 0.5f ? mk + w * (gk - mk) : gk - (gk - mk) * (1.0f - w);
    float vn = v[i] * b2;
    vn = vn + omb2 * gk * gk;
    m[i] = mn;
    v[i] = vn;
    float vv = vn;
    if (vmax) {
      // NaN-propagating max, as torch.maximum.
      vv = (std::isnan(vmax[i]) || std::isnan(vn)) ? NAN : std::max(vmax[i], vn);
      vmax[i] = vv;
    }
    out[k] = mn / (std::sqrt(vv) / bc2 + eps);
  }
}

template <typename param_t, typename grad_t>
void run_unit(const UnitParams& u, const std::vector<param_t*>& params, const std::vector<const grad_t*>& grads,
              const std::vector<float*>& exp_avgs, const std::vector<float*>& exp_avg_sqs,
              const std::vector<float*>& max_exp_avg_sqs) {
  const float sign = u.maximize ? -1.0f : 1.0f;
  const float step = -u.step_size;
  // Two passes over work items: the full n-blocks of every vector, then every vector's residual block.
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t bs = pass == 0 ? u.block : u.residual;
    const int64_t per_vector = pass == 0 ? u.num_blocks : (u.residual > 0 ? 1 : 0);
    const float* rot = pass == 0 ? u.rot_n : u.rot_p;
    const int64_t items = u.num_vectors * per_vector;
    if (items == 0 || bs == 0) continue;
    const int64_t rows_per_tile = std::max<int64_t>(1, std::min<int64_t>(kTileElems / bs, items));
    const int64_t tiles = (items + rows_per_tile - 1) / rows_per_tile;
    at::parallel_for(0, tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
      std::vector<float> xbuf(rows_per_tile * bs), ybuf(rot ? rows_per_tile * bs : 0);
      auto rot_t = rot ? at::from_blob(const_cast<float*>(rot), {bs, bs}, at::kFloat) : at::Tensor();
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t first = tile * rows_per_tile;
        const int64_t rows = std::min(rows_per_tile, items - first);
        auto vec = [&](int64_t t) { return (first + t) / per_vector; };
        auto q0 = [&](int64_t t) { return pass == 0 ? ((first + t) % per_vector) * bs : u.num_blocks * u.block; };
        float* x = xbuf.data();
        // Gather (pi g)[block] in fp32: element by element through pi, else by affine pieces.
        for (int64_t t = 0; t < rows; ++t) {
          const int64_t r = vec(t), q = q0(t);
          float* xr = x + t * bs;
          if (u.perm) {
            for (int64_t k = 0; k < bs; ++k) {
              const Loc loc = locate(u, r, u.perm[q + k]);
              xr[k] = sign * load(grads[loc.tensor], loc.offset);
            }
          } else {
            for_each_piece(u, r, q, bs, [&](int64_t k0, int64_t k1, int64_t ti, int64_t off, int64_t st, const Segment*) {
              const grad_t* g = grads[ti] + off;
              for (int64_t k = k0; k < k1; ++k) xr[k] = sign * static_cast<float>(g[(k - k0) * st]);
            });
          }
        }
        float* y = x;
        if (rot) {  // y = x R^T
          auto xt = at::from_blob(xbuf.data(), {rows, bs}, at::kFloat);
          auto yt = at::from_blob(ybuf.data(), {rows, bs}, at::kFloat);
          at::mm_out(yt, xt, rot_t.t());
          y = ybuf.data();
        }
        // Adam in the rotated layout (moments sit at the unpermuted positions); the update goes to x.
        for (int64_t t = 0; t < rows; ++t) {
          for_each_piece(u, vec(t), q0(t), bs, [&](int64_t k0, int64_t k1, int64_t ti, int64_t off, int64_t st,
                                                   const Segment*) {
            float* vmax = u.amsgrad ? max_exp_avg_sqs[ti] + off : nullptr;
            adam_span(u, y + t * bs + k0, exp_avgs[ti] + off, exp_avg_sqs[ti] + off, vmax, x + t * bs + k0, k1 - k0,
                      st);
          });
        }
        float* z = x;
        if (rot) {  // z = u R
          auto ut = at::from_blob(xbuf.data(), {rows, bs}, at::kFloat);
          auto zt = at::from_blob(ybuf.data(), {rows, bs}, at::kFloat);
          at::mm_out(zt, ut, rot_t);
          z = ybuf.data();
        }
        // Scatter through pi with the decoupled decay, rounding once to the param dtype.
        for (int64_t t = 0; t < rows; ++t) {
          const int64_t r = vec(t), q = q0(t);
          const float* zr = z + t * bs;
          if (u.perm) {
            for (int64_t k = 0; k < bs; ++k) {
              const Loc loc = locate(u, r, u.perm[q + k]);
              param_t* p = params[loc.tensor] + loc.offset;
              *p = static_cast<param_t>(static_cast<float>(*p) * loc.seg->decay + step * zr[k]);
            }
          } else {
            for_each_piece(u, r, q, bs, [&](int64_t k0, int64_t k1, int64_t ti, int64_t off, int64_t st,
                                            const Segment* seg) {
              param_t* p = params[ti] + off;
              const float decay = seg->decay;
              for (int64_t k = k0; k < k1; ++k) {
                const int64_t i = (k - k0) * st;
                p[i] = static_cast<param_t>(static_cast<float>(p[i]) * decay + step * zr[k]);
              }
            });
          }
        }
      }
    });
  }
}

void check_list(const std::vector<at::Tensor>& ts, size_t n, const char* name, bool fp32) {
  TORCH_CHECK(ts.size() == n, "rotated_adamw_unit_: ", name, " has ", ts.size(), " tensors, params ", n);
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    TORCH_CHECK(t.device().is_cpu(), "rotated_adamw_unit_: ", name, "[", i, "] is on ", t.device(),
                "; this is the CPU implementation");
    TORCH_CHECK(t.is_contiguous(), "rotated_adamw_unit_: ", name, "[", i, "] is not contiguous");
    TORCH_CHECK(!fp32 || t.scalar_type() == at::kFloat, "rotated_adamw_unit_: ", name, "[", i,
                "] must be float32 (moments are fp32), got ", t.scalar_type());
  }
}

void rotated_adamw_unit_cpu(at::TensorList params_in, at::TensorList grads_in, at::TensorList exp_avgs_in,
                            at::TensorList exp_avg_sqs_in, at::TensorList max_exp_avg_sqs_in, const at::Tensor& step,
                            const at::Tensor& lr, at::IntArrayRef seg_tensor, at::IntArrayRef seg_start,
                            at::IntArrayRef seg_numel, at::IntArrayRef seg_decay, int64_t layout, int64_t width,
                            int64_t num_vectors, int64_t length, int64_t block_size,
                            const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& rot_n,
                            const c10::optional<at::Tensor>& rot_p, double beta1, double beta2, double eps,
                            double weight_decay, bool amsgrad, bool maximize) {
  const std::vector<at::Tensor> params = params_in.vec(), grads = grads_in.vec();
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "rotated_adamw_unit_: no params");
  check_list(params, n, "params", false);
  check_list(grads, n, "grads", false);
  check_list(exp_avgs_in.vec(), n, "exp_avgs", true);
  check_list(exp_avg_sqs_in.vec(), n, "exp_avg_sqs", true);
  if (amsgrad) check_list(max_exp_avg_sqs_in.vec(), n, "max_exp_avg_sqs", true);
  for (size_t i = 1; i < n; ++i) {
    TORCH_CHECK(params[i].scalar_type() == params[0].scalar_type() && grads[i].scalar_type() == grads[0].scalar_type(),
                "rotated_adamw_unit_: the tensors of one unit must share param and grad dtypes (got ",
                params[i].scalar_type(), " and ", params[0].scalar_type(), "); use backend='eager'");
  }
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(grads[i].numel() == params[i].numel(), "rotated_adamw_unit_: grads[", i, "] has ", grads[i].numel(),
                " elements, params[", i, "] ", params[i].numel());
  }
  TORCH_CHECK(layout == kFlat || layout == kRows || layout == kCols, "rotated_adamw_unit_: bad layout ", layout);
  TORCH_CHECK(num_vectors >= 1 && length >= 1, "rotated_adamw_unit_: empty unit");
  const size_t nseg = seg_tensor.size();
  TORCH_CHECK(nseg >= 1 && seg_start.size() == nseg && seg_numel.size() == nseg && seg_decay.size() == nseg,
              "rotated_adamw_unit_: segment lists must be non-empty and of equal length");
  TORCH_CHECK(layout == kFlat || (nseg == 1 && width >= 1), "rotated_adamw_unit_: a rows/cols unit has one segment");
  TORCH_CHECK(step.numel() == 1 && step.device().is_cpu(), "rotated_adamw_unit_: step must be a CPU scalar");
  TORCH_CHECK(lr.numel() == 1 && lr.device().is_cpu(), "rotated_adamw_unit_: lr must be a CPU scalar");

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
  u.block = rotated ? block_size : std::min<int64_t>(length, kIdentityChunk);
  TORCH_CHECK(u.block >= 1, "rotated_adamw_unit_: block_size must be >= 1");
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
  u.perm = nullptr;
  if (perm.has_value()) {
    const auto& pm = *perm;
    TORCH_CHECK(pm.device().is_cpu() && pm.scalar_type() == at::kLong && pm.is_contiguous() && pm.numel() == length,
                "rotated_adamw_unit_: perm must be a contiguous int64 CPU tensor of length ", length);
    u.perm = pm.data_ptr<int64_t>();
  }
  u.lerp_weight = static_cast<float>(1.0 - beta1);
  u.beta2 = static_cast<float>(beta2);
  u.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  u.eps = static_cast<float>(eps);
  u.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
  u.step_size = static_cast<float>(lr_v / (1.0 - std::pow(beta1, t)));
  u.amsgrad = amsgrad;
  u.maximize = maximize;

  auto ptrs = [](at::TensorList ts) {
    std::vector<float*> out;
    for (const auto& x : ts) out.push_back(x.data_ptr<float>());
    return out;
  };
  const auto m_ptrs = ptrs(exp_avgs_in), v_ptrs = ptrs(exp_avg_sqs_in);
  const auto vmax_ptrs = amsgrad ? ptrs(max_exp_avg_sqs_in) : std::vector<float*>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "rotated_adamw_unit_", [&] {
    using param_t = scalar_t;
    std::vector<param_t*> p_ptrs;
    for (const auto& p : params) p_ptrs.push_back(p.data_ptr<param_t>());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "rotated_adamw_unit_grad", [&] {
      std::vector<const scalar_t*> g_ptrs;
      for (const auto& g : grads) g_ptrs.push_back(g.data_ptr<scalar_t>());
      run_unit<param_t, scalar_t>(u, p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs);
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
      "bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(rotkern, CPU, m) { m.impl("rotated_adamw_unit_", &rotated_adamw_unit_cpu); }

}  // namespace rotkern

// Importing rotkern._C registers the ops above; the module itself only reports how it was built.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_cuda", [] {
#ifdef ROTKERN_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
