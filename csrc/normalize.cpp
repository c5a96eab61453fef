// Per-band normalisation of uint16 reflectance: out[c] = (float(x[c]) - mean[c]) / std[c].
#include <pybind11/numpy.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace py = pybind11;

namespace {

void normalize_u16(py::array_t<uint16_t, py::array::c_style> src,
                   py::array_t<float, py::array::c_style> mean,
                   py::array_t<float, py::array::c_style> std,
                   py::array_t<float, py::array::c_style> out) {
  if (src.ndim() != 3) throw std::invalid_argument("normalize_u16: src must be (C, H, W), got ndim=" + std::to_string(src.ndim()));
  const auto C = src.shape(0), HW = src.shape(1) * src.shape(2);
  if (mean.size() != C || std.size() != C)
    throw std::invalid_argument("normalize_u16: mean and std need one value per band (" + std::to_string(C) + ")");
  if (out.ndim() != 3 || out.shape(0) != C || out.shape(1) != src.shape(1) || out.shape(2) != src.shape(2))
    throw std::invalid_argument("normalize_u16: out must have the shape of src");
  const uint16_t* s = src.data();
  const float* mu = mean.data();
  const float* sd = std.data();
  float* o = out.mutable_data();
  py::gil_scoped_release release;
  for (py::ssize_t c = 0; c < C; ++c) {
    const float inv = 1.0f / sd[c];
    const float m = mu[c];
    for (py::ssize_t i = 0; i < HW; ++i) o[c * HW + i] = (static_cast<float>(s[c * HW + i]) - m) * inv;
  }
}

}  // namespace

void register_normalize(py::module_& m) {
  m.def("normalize_u16", &normalize_u16, py::arg("src"), py::arg("mean"), py::arg("std"), py::arg("out"),
        "Normalise a (C, H, W) uint16 tile per band into a preallocated float32 array (GIL released).");
}
