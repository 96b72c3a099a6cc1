// The CPU kernels' dispatcher: which instruction-set level (isa.h) and which of the two paths run
// a call. Compiled for the architecture's baseline, like everything outside kernels_<level>.cpp.
#include "routing_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "isa.h"

namespace capsrouting::cpu {
namespace {

constexpr Isa kLevels[] = {Isa::baseline, Isa::avx2, Isa::avx512};

const char* name_of(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    default: return "baseline";
  }
}

// Whether this build has the level and this CPU (and its operating system, which must save the
// wider registers: the compiler's CPU check looks at that too) can run it.
bool can_run(Isa isa) {
  if (isa == Isa::baseline) return true;
#if CAPSROUTING_X86_LEVELS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == Isa::avx2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// The levels this build has and this CPU runs, lowest first.
std::vector<Isa> runnable() {
  std::vector<Isa> levels;
  for (Isa isa : kLevels)
    if (can_run(isa)) levels.push_back(isa);
  return levels;
}

std::string runnable_list() {
  std::string list;
  for (Isa isa : runnable()) list += std::string(list.empty() ? "" : ", ") + name_of(isa);
  return list;
}

// CAPSROUTING_CPU_ISA when set (to a level this CPU runs), else the highest level it runs.
Isa choose() {
  const char* forced = std::getenv("CAPSROUTING_CPU_ISA");
  if (forced == nullptr || *forced == '\0' || std::strcmp(forced, "auto") == 0) return runnable().back();
  for (Isa isa : kLevels)
    if (std::strcmp(forced, name_of(isa)) == 0) {
      TORCH_CHECK(can_run(isa), "CAPSROUTING_CPU_ISA=", forced, ": this CPU cannot run that level of the CPU kernels; ",
                  "it runs ", runnable_list());
      return isa;
    }
  TORCH_CHECK(false, "CAPSROUTING_CPU_ISA must be 'auto', 'baseline', 'avx2' or 'avx512', got '", forced, "'");
}

// Chosen on first use, once per process (a bad CAPSROUTING_CPU_ISA raises at every call instead).
Isa active() {
  static const Isa isa = choose();
  return isa;
}

LevelKernels level_kernels() {
#if CAPSROUTING_X86_LEVELS
  switch (active()) {
    case Isa::avx512: return avx512::kernels();
    case Isa::avx2: return avx2::kernels();
    default: break;
  }
#else
  active();  // checks CAPSROUTING_CPU_ISA
#endif
  return baseline::kernels();
}

// The kernels that run a call. A chunk of the batch kernels holds kLanes samples and runs on one thread:
// below a few chunks per thread most lanes idle, or threads do. The small-batch kernels vectorize
// over the input capsules and share them among the threads, and cost in proportion to B.
// Measured (bench/cpu_speedup.py --paths, paper layer, float32; Intel Xeon 2026-11-26 and AMD EPYC
// 2026-11-27, README "Performance"): the forward is faster on the small-batch kernels up to about
// 8 samples per thread (at B = 16 with 1 thread the batch kernels win, 2.5 against 3.0 ms), the
// backward on the small-batch kernels up to B = 32 with 1 or 2 threads (their predictions and kept
// couplings stay in scratch that fits the caches; at B = 128 they lose 2x). A backward's kernels
// need not be its forward's: both save s(r) and V(r-1) in one layout. CAPSROUTING_CPU_PATH forces
// one or the other for both passes (benchmarks, tests).
enum class Pass { forward, backward };

bool use_small_batch_kernels(int64_t B, Pass pass) {
  const char* forced = std::getenv("CAPSROUTING_CPU_PATH");
  if (forced == nullptr || *forced == '\0' || std::strcmp(forced, "auto") == 0)
    return B <= (pass == Pass::forward ? std::min<int64_t>(8 * at::get_num_threads(), 16) : 32);
  if (std::strcmp(forced, "small-batch") == 0) return true;
  if (std::strcmp(forced, "batch") == 0) return false;
  TORCH_CHECK(false, "CAPSROUTING_CPU_PATH must be 'auto', 'small-batch' or 'batch', got '", forced, "'");
}

}  // namespace

std::string isa() { return name_of(active()); }

std::vector<std::string> runnable_isas() {
  std::vector<std::string> names;
  for (Isa level : runnable()) names.emplace_back(name_of(level));
  return names;
}

ForwardResult forward(const at::Tensor& x, const at::Tensor& W, const RoutingOptions& options, int64_t R) {
  const LevelKernels kernels = level_kernels();
  const auto run = use_small_batch_kernels(x.size(0), Pass::forward) ? kernels.small_batch_forward : kernels.batch_forward;
  return run(x, W, options, R);
}

BackwardResult backward(const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& W,
                        const RoutingOptions& options, const at::Tensor& s_saved, const at::Tensor& Vprev_saved,
                        int64_t R) {
  const LevelKernels kernels = level_kernels();
  const auto run =
      use_small_batch_kernels(x.size(0), Pass::backward) ? kernels.small_batch_backward : kernels.batch_backward;
  return run(grad_v, x, W, options, s_saved, Vprev_saved, R);
}

}  // namespace capsrouting::cpu
