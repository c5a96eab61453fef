// C++ twin of the view executor (terrafm/data/views.py: render_view_numpy): for each sample of a
// batch, crop a box from a (C_all, T, T) uint16 / float16 tile, bilinear-resize it to (s, s) with
// PyTorch's align_corners=False arithmetic, normalise per band and flip, writing into a preallocated
// (B, C, s, s) float32 array. Work items are (sample, band) planes spread over std::threads with the
// GIL released. Reads per plane: h * w source values; writes s * s floats.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
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
    const float scale = static_cast<float>(in) / static_cast<float>(out);
    for (int64_t d = 0; d < out; ++d) {
      float real = scale * (static_cast<float>(d) + 0.5f) - 0.5f;
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
// upsample_bilinear2d, so values agree to float rounding. Flips reverse the index/weight tables.
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

void render_view(const std::vector<py::array>& tiles, bool is_half, py::array_t<int64_t, py::array::c_style> band_index,
                 py::array_t<float, py::array::c_style> mean, py::array_t<float, py::array::c_style> std,
                 py::array_t<int32_t, py::array::c_style> boxes, py::array_t<uint8_t, py::array::c_style> flips,
                 py::array_t<float, py::array::c_style> out, int threads) {
  const int64_t B = static_cast<int64_t>(tiles.size());
  const int64_t C = band_index.size();
  if (out.ndim() != 4 || out.shape(0) != B || out.shape(1) != C || out.shape(2) != out.shape(3))
    throw std::invalid_argument("render_view: out must be (B, C, s, s) float32 with B = len(tiles), C = len(band_index)");
  if (mean.size() != C || std.size() != C) throw std::invalid_argument("render_view: mean/std need one value per band");
  if (boxes.ndim() != 2 || boxes.shape(0) != B || boxes.shape(1) != 4 || flips.ndim() != 2 || flips.shape(0) != B ||
      flips.shape(1) != 2)
    throw std::invalid_argument("render_view: boxes must be (B, 4) int32 and flips (B, 2) uint8");
  const int64_t s = out.shape(2);
  std::vector<const uint16_t*> src(B);
  int64_t tile = -1, channels = -1;
  for (int64_t b = 0; b < B; ++b) {
    const py::array& t = tiles[b];
    if (t.ndim() != 3 || t.itemsize() != 2 || !(t.flags() & py::array::c_style))
      throw std::invalid_argument("render_view: tile " + std::to_string(b) + " must be a C-contiguous (C, T, T) 16-bit array");
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
    const int32_t* q = bx + 4 * b;
    if (q[0] < 0 || q[1] < 0 || q[2] <= 0 || q[3] <= 0 || q[0] + q[2] > tile || q[1] + q[3] > tile)
      throw std::invalid_argument("render_view: box " + std::to_string(b) + " lies outside the tile");
  }
  const float* mu = mean.data();
  const float* sd = std.data();
  const uint8_t* fl = flips.data();
  float* o = out.mutable_data();
  const int64_t items = B * C;
  int n = threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  n = static_cast<int>(std::min<int64_t>(n, items));
  {
    py::gil_scoped_release release;
    std::atomic<int64_t> next{0};
    auto work = [&]() {
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
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < n; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
  }
}

}  // namespace

void register_views(py::module_& m) {
  m.def("render_view", &render_view, py::arg("tiles"), py::arg("is_half"), py::arg("band_index"), py::arg("mean"),
        py::arg("std"), py::arg("boxes"), py::arg("flips"), py::arg("out"), py::arg("threads") = 0,
        "Crop + bilinear resize + per-band normalise + flip a batch of 16-bit tiles into out (B, C, s, s) "
        "float32, threaded with the GIL released (see terrafm/data/views.py for the semantics).");
}
