// csrc/cuda/topk.cu, compiled for the host under host_emulation.h (see there).
#include "host_emulation.h"

#pragma GCC diagnostic ignored "-Wsubobject-linkage"
#include "../topk.cu"
