// Registration hooks: each csrc/*.cpp file adds its functions to the terrafm._C module.
#pragma once
#include <pybind11/pybind11.h>

void register_views(pybind11::module_& m);
