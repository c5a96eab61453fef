// C++ twin of the view executor (terrafm/data/views.py: render_view_numpy): for each sample of a
// batch, crop a box from a (C_all, T, T) uint16 / float16 tile, bilinear-resize it to (s, s) with
// PyTorch's align_corners=False arithmetic, normalise per band and flip, writing into a preallocated
// (B, C, s, s) float32 array. Work items are (sample, band) planes spread over std::threads with the
// GIL released. Reads per plane: h * w source values; writes s * s floats. Every argument is checked first
// (ValueError): a bad dtype, stride, box or statistic would otherwise read out of bounds or give garbage.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "ops.h"

namespace py = pybind11;

namespace {

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | ((exp + 112u) << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

struct Axis {  // source indices and weights of one output axis (PyTorch upsample_bilinear2d, align_corners=False)
  std::vector<int64_t> i0, i1;
  std::vector<float> w0, w1;
  Axis(int64_t in, int64_t out) : i0(out), i1(out), w0(out), w1(out) {
    if (in == out) {  // PyTorch's copy case: both taps on the same pixel (an inf pixel stays one NaN, not a cross)
      for (int64_t d = 0; d < out; ++d) i0[d] = i1[d] = d, w0[d] = 1.f, w1[d] = 0.f;
      return;
    }
    const float scale = static_cast<float>(in) / static_cast<float>(out);
    for (int64_t d = 0; d < out; ++d) {
      // one rounding, as PyTorch's vectorised (FMA) kernel: rounded twice, the weight of a pixel next to a large
      // step differed by half an ulp of the coordinate (0.31 vs 0.17 on a 534 px float16 tile), and a weight of
      // 1.5e-8 became 0 (an inf pixel then spread as NaN where PyTorch spreads inf)
      float real = std::fma(scale, static_cast<float>(d) + 0.5f, -0.5f);
      if (real < 0.f) real = 0.f;
      const int64_t j = static_cast<int64_t>(real);
      const float l1 = std::min(std::max(real - static_cast<float>(j), 0.f), 1.f);
      i0[d] = j;
      i1[d] = j + (j < in - 1 ? 1 : 0);
      w0[d] = 1.f - l1;
      w1[d] = l1;
    }
  }
};

template <bool kHalf>
inline float load(const uint16_t* p) {
  if constexpr (kHalf) return half_to_float(*p);
  return static_cast<float>(*p);
}

// Separable: a horizontal pass over each source row the output needs (t = x[i0] * w0 + x[i1] * w1),
// then a vertical pass t0 * wy0 + t1 * wy1 over contiguous rows; the same operation order as PyTorch's
// upsample_bilinear2d, so values agree to float rounding (PyTorch's AVX2 kernel fuses some multiply-adds: up to
// ~1e-6 relative, so a uint16 value on x.5 may round the other way). Flips reverse the index/weight tables.
template <bool kHalf>
void render_plane(const uint16_t* plane, int64_t tile, const int32_t* box, const uint8_t* flip, int64_t s,
                  float mean, float inv_std, float* out, std::vector<float>& rows, std::vector<uint8_t>& done) {
  const int64_t top = box[0], left = box[1], h = box[2], w = box[3];
  Axis ay(h, s), ax(w, s);
  if (flip[0]) {
    std::reverse(ax.i0.begin(), ax.i0.end());
    std::reverse(ax.i1.begin(), ax.i1.end());
    std::reverse(ax.w0.begin(), ax.w0.end());
    std::reverse(ax.w1.begin(), ax.w1.end());
  }
  rows.resize(static_cast<size_t>(h * s));
  done.assign(static_cast<size_t>(h), 0);
  auto row = [&](int64_t r) -> const float* {
    float* dst = rows.data() + r * s;
    if (!done[r]) {
      const uint16_t* src = plane + (top + r) * tile + left;
      for (int64_t x = 0; x < s; ++x)
        dst[x] = load<kHalf>(src + ax.i0[x]) * ax.w0[x] + load<kHalf>(src + ax.i1[x]) * ax.w1[x];
      done[r] = 1;
    }
    return dst;
  };
  for (int64_t y = 0; y < s; ++y) {
    const float* t0 = row(ay.i0[y]);
    const float* t1 = row(ay.i1[y]);
    const float wy0 = ay.w0[y], wy1 = ay.w1[y];
    float* orow = out + (flip[1] ? s - 1 - y : y) * s;
    for (int64_t x = 0; x < s; ++x) orow[x] = (t0[x] * wy0 + t1[x] * wy1 - mean) * inv_std;
  }
}

template <typename T>
bool is_c_array(const py::handle& a) {  // numpy array of exactly T (native byte order), C-contiguous
  return py::isinstance<py::array_t<T, py::array::c_style>>(a);
}

bool aligned(const py::array& a) {  // a view at an odd byte offset is C-contiguous but not aligned for its type
  return a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_;
}

bool is_c_half(const py::array& a) {  // the same for float16, which has no C++ type: NPY_HALF is type number 23
  return a.dtype().num() == 23 && a.dtype().byteorder() != '>' && (a.flags() & py::array::c_style);
}

void render_view(const std::vector<py::array>& tiles, bool is_half, py::array_t<int64_t, py::array::c_style> band_index,
                 py::array_t<float, py::array::c_style> mean, py::array_t<float, py::array::c_style> std,
                 py::array_t<int32_t, py::array::c_style> boxes, py::array_t<uint8_t, py::array::c_style> flips,
                 py::array out, int threads) {
  const int64_t B = static_cast<int64_t>(tiles.size());
  const int64_t C = band_index.size();
  // out is taken as is: a converted copy (another dtype, a strided view) would take the result and be dropped
  if (!is_c_array<float>(out) || !out.writeable() || !aligned(out))
    throw std::invalid_argument("render_view: out must be a writeable, aligned, C-contiguous float32 array");
  for (const auto& [name, a] : {std::pair<const char*, const py::array*>{"band_index", &band_index}, {"mean", &mean},
                                {"std", &std}, {"boxes", &boxes}})
    if (!aligned(*a))
      throw std::invalid_argument(std::string("render_view: ") + name + " is not aligned for its dtype (a view at an "
                                  "odd byte offset); pass a copy");
  if (out.ndim() != 4 || out.shape(0) != B || out.shape(1) != C || out.shape(2) != out.shape(3))
    throw std::invalid_argument("render_view: out must be (B, C, s, s) float32 with B = len(tiles), C = len(band_index)");
  if (mean.size() != C || std.size() != C) throw std::invalid_argument("render_view: mean/std need one value per band");
  if (boxes.ndim() != 2 || boxes.shape(0) != B || boxes.shape(1) != 4 || flips.ndim() != 2 || flips.shape(0) != B ||
      flips.shape(1) != 2)
    throw std::invalid_argument("render_view: boxes must be (B, 4) int32 and flips (B, 2) uint8");
  const float* mu = mean.data();
  const float* sd = std.data();
  for (int64_t c = 0; c < C; ++c)
    if (!std::isfinite(mu[c]) || !std::isnormal(sd[c]) || !(sd[c] > 0.f))  // normal: finite, not 0, not subnormal
      throw std::invalid_argument("render_view: mean must be finite and std finite, > 0 and not subnormal (band " +
                                  std::to_string(c) + ")");
  if (B == 0) return;
  const int64_t s = out.shape(2);
  std::vector<const uint16_t*> src(B);
  int64_t tile = -1, channels = -1;
  bool first_half = false;
  for (int64_t b = 0; b < B; ++b) {
    const py::array& t = tiles[b];
    const bool f16 = is_c_half(t);
    if (t.ndim() != 3 || !(f16 || is_c_array<uint16_t>(t)))
      throw std::invalid_argument("render_view: tile " + std::to_string(b) +
                                  " must be a C-contiguous (C, T, T) uint16 or float16 array of native byte order, got " +
                                  std::string(py::str(t.dtype())) + " with ndim " + std::to_string(t.ndim()));
    if (!aligned(t))
      throw std::invalid_argument("render_view: tile " + std::to_string(b) +
                                  " is not aligned for its dtype (a view at an odd byte offset); pass a copy");
    if (f16 && !is_half) throw std::invalid_argument("render_view: float16 tiles need is_half=True");
    if (b == 0) first_half = f16;
    if (f16 != first_half) throw std::invalid_argument("render_view: all tiles of a view must share one dtype");
    if (b == 0) tile = t.shape(1), channels = t.shape(0);
    if (t.shape(1) != tile || t.shape(2) != tile || t.shape(0) != channels)
      throw std::invalid_argument("render_view: all tiles of a view must share one (C, T, T) shape");
    src[b] = static_cast<const uint16_t*>(t.data());
  }
  const int64_t* bi = band_index.data();
  const int32_t* bx = boxes.data();
  for (int64_t c = 0; c < C; ++c)
    if (bi[c] < 0 || bi[c] >= channels) throw std::invalid_argument("render_view: band_index out of range");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t top = bx[4 * b], left = bx[4 * b + 1], h = bx[4 * b + 2], w = bx[4 * b + 3];  // no int32 overflow
    if (top < 0 || left < 0 || h <= 0 || w <= 0 || top + h > tile || left + w > tile)
      throw std::invalid_argument("render_view: box " + std::to_string(b) + " (top, left, h, w) = (" +
                                  std::to_string(top) + ", " + std::to_string(left) + ", " + std::to_string(h) + ", " +
                                  std::to_string(w) + ") lies outside the " + std::to_string(tile) + " px tile");
  }
  const uint8_t* fl = flips.data();
  float* o = static_cast<float*>(out.mutable_data());
  const int64_t items = B * C;
  int n = threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  n = static_cast<int>(std::min<int64_t>(n, items));
  std::exception_ptr error;
  {
    py::gil_scoped_release release;
    std::atomic<int64_t> next{0};
    std::mutex error_lock;
    auto work = [&]() {  // an exception (bad_alloc) stops every worker and is rethrown with the GIL held
      try {
        std::vector<float> rows;
        std::vector<uint8_t> done;
        for (int64_t k = next.fetch_add(1); k < items; k = next.fetch_add(1)) {
          const int64_t b = k / C, c = k % C;
          const uint16_t* plane = src[b] + bi[c] * tile * tile;
          float* dst = o + k * s * s;
          if (is_half)
            render_plane<true>(plane, tile, bx + 4 * b, fl + 2 * b, s, mu[c], 1.f / sd[c], dst, rows, done);
          else
            render_plane<false>(plane, tile, bx + 4 * b, fl + 2 * b, s, mu[c], 1.f / sd[c], dst, rows, done);
        }
      } catch (...) {
        std::lock_guard<std::mutex> guard(error_lock);
        if (!error) error = std::current_exception();
        next = items;
      }
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < n; ++t) {
      try {
        pool.emplace_back(work);
      } catch (const std::system_error&) {  // no more threads to be had: the started ones and this one do the rest
        break;
      }
    }
    work();
    for (auto& t : pool) t.join();
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

void register_views(py::module_& m) {
  m.def("render_view", &render_view, py::arg("tiles"), py::arg("is_half"), py::arg("band_index"), py::arg("mean"),
        py::arg("std"), py::arg("boxes"), py::arg("flips"), py::arg("out"), py::arg("threads") = 0,
        "Crop + bilinear resize + per-band normalise + flip a batch of 16-bit tiles into out (B, C, s, s) "
        "float32, threaded with the GIL released (see terrafm/data/views.py for the semantics).");
}
