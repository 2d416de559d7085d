// Emulated cuda_fp16.h: __half as IEEE binary16 (_Float16, g++ >= 12), with
// round-to-nearest-even conversions, like the CUDA intrinsics of the same names.
#pragma once

struct __half {
    _Float16 x;
};

inline float __half2float(__half h) { return (float)h.x; }

inline __half __float2half_rn(float f) {
    __half h;
    h.x = (_Float16)f;
    return h;
}
