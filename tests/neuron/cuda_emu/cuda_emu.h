// Minimal CUDA emulation for compiling snnkit's generated kernel sources, unchanged,
// as C++ with g++ (see harness.py). Threads of the grid run one after another, so
// only kernels without shared memory, barriers or atomics are supported, which is
// all snnkit's kernels use. Float arithmetic is IEEE single precision with no
// contraction (-ffp-contract=off), like nvcc --fmad=false; expf/atanf come from
// libm and may differ from CUDA's by a few ulps.
#pragma once
#include <math.h>
#include <stddef.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)

struct dim3 {
    unsigned int x, y, z;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// Run kernel(args...) for every thread of a 1-D grid, sequentially.
template <class Kernel, class... Args>
inline void snnkit_emu_launch(unsigned int grid, unsigned int block, Kernel kernel, Args... args) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned int b = 0; b < grid; b++) {
        blockIdx = {b, 0, 0};
        for (unsigned int t = 0; t < block; t++) {
            threadIdx = {t, 0, 0};
            kernel(args...);
        }
    }
}
