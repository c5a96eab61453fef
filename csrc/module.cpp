// terrafm._C: CPU hot paths of the data pipeline (see csrc/README.md).
#include "ops.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "terrafm C++ CPU kernels (pybind11)";
  register_views(m);
}
