# cython: language_level=3
# One extension module; each hot unit is a .pyx pulled in with `include` (uvloop's layout), so units
# call each other through C vtables without cross-module cimport (see DESIGN.md, Packaging).

include "tcp_stats.pyx"
include "detect.pyx"
include "balance.pyx"
include "histogram.pyx"
include "route.pyx"
include "http1.pyx"
