// Instruction-set levels of the CPU kernels: the kernels are compiled once per level, and the
// dispatcher (routing_cpu.cpp) runs the best level the CPU supports (or the one forced by
// CAPSROUTING_CPU_ISA), chosen once per process.
//
// Levels, lowest first. x86-64: baseline (the architecture's SSE2), avx2 (AVX2 and FMA), avx512
// (AVX-512 F, VL, BW, DQ with AVX2 and FMA). Other architectures: baseline alone (on aarch64 that
// includes NEON, whose 128-bit vectors every such CPU has).
#pragma once

#include <cstdint>

#include "../routing_options.h"

#if defined(__x86_64__) || defined(_M_X64)
#define CAPSROUTING_X86_LEVELS 1
#else
#define CAPSROUTING_X86_LEVELS 0
#endif

namespace capsrouting::cpu {

enum class Isa { baseline, avx2, avx512 };

using ForwardKernel = ForwardResult (*)(const at::Tensor& x, const at::Tensor& W, const RoutingOptions& options,
                                        int64_t num_iterations);
using BackwardKernel = BackwardResult (*)(const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& W,
                                          const RoutingOptions& options, const at::Tensor& s_saved,
                                          const at::Tensor& Vprev_saved, int64_t num_iterations);

// One level's kernels: the batch kernels (vectorized over samples) and the small-batch kernels
// (vectorized over input capsules), same arguments and results.
struct LevelKernels {
  ForwardKernel batch_forward;
  BackwardKernel batch_backward;
  ForwardKernel small_batch_forward;
  BackwardKernel small_batch_backward;
};

// Defined by kernels_<level>.cpp.
namespace baseline {
LevelKernels kernels();
}
#if CAPSROUTING_X86_LEVELS
namespace avx2 {
LevelKernels kernels();
}
namespace avx512 {
LevelKernels kernels();
}
#endif

}  // namespace capsrouting::cpu

// The target pragma of a level's translation unit: every function declared between BEGIN and END
// is compiled for `features` (a GCC/Clang target string such as "avx2,fma").
#define CAPSROUTING_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define CAPSROUTING_TARGET_BEGIN(features) \
  CAPSROUTING_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define CAPSROUTING_TARGET_END CAPSROUTING_PRAGMA(clang attribute pop)
#else
#define CAPSROUTING_TARGET_BEGIN(features) CAPSROUTING_PRAGMA(GCC push_options) CAPSROUTING_PRAGMA(GCC target(features))
#define CAPSROUTING_TARGET_END CAPSROUTING_PRAGMA(GCC pop_options)
#endif
