// csrc/cuda/embedding.cu, compiled for the host under host_emulation.h (see there).
#include "host_emulation.h"

// (the .cu file's anonymous-namespace types inside PendingBags::State are fine in one unit)
#pragma GCC diagnostic ignored "-Wsubobject-linkage"
#include "../embedding.cu"
