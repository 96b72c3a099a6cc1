// The CUDA kernels' own source (csrc/cuda/routing_kernels.cuh), run on the CPU through
// csrc/emulation/cuda_emulation.h, with the launch plan of the real launchers.
//
// Every case runs forward and backward of capsule_routing (u, W) or route (u_hat), in float32
// and float64, and checks:
//   * v against a naive double-precision loop of DESIGN.md §1;
//   * the gradients (du and dW, or du_hat) against central finite differences of that naive
//     loop along random directions (float64), and the float32 gradients against float64's;
//   * with CAPSROUTING_TEST_WITH_TORCH, every output element against the CPU kernel.
// Outputs start as NaN and shared memory is refilled with NaN before every block, so an
// element no thread wrote, or a shared value read before any thread wrote it, fails.
//
// Run by ctest twice: linked with libtorch, and built with -fsanitize=thread on the quick
// cases (`--quick`), where ThreadSanitizer turns any race between barriers into a failure.
#ifdef CAPSROUTING_TEST_WITH_TORCH
#include <torch/torch.h>

#include "cpu/routing_cpu.h"
#endif

// After any torch header: the emulation defines CUDA's names as macros.
#include "emulation/cuda_emulation.h"
#include "cuda/routing_kernels.cuh"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using capsrouting::cuda::Sizes;

struct EmulatedLauncher {
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, dim3 grid, size_t bytes, Args... args) const {
    cuda_emulation::launch(capsrouting::cuda::kThreads, kernel, grid, bytes, args...);
  }
};

struct Case {
  const char* what;
  int64_t B, I, J, D, K, R;  // K = 0: route, the predictions u_hat given
  bool quick;                // also run under ThreadSanitizer
  int64_t x_size() const { return K ? B * I * K : B * I * J * D; }
  int64_t W_size() const { return K ? I * J * D * K : 0; }
};

struct Outputs {
  std::vector<double> v, dx, dW;
};

// v (B, J, D) by the literal algorithm, in double.
std::vector<double> naive_forward(const Case& c, const std::vector<double>& x, const std::vector<double>& W) {
  const int64_t I = c.I, J = c.J, D = c.D, K = c.K;
  std::vector<double> v(c.B * J * D);
  for (int64_t b = 0; b < c.B; ++b) {
    std::vector<double> u_hat(I * J * D, 0.0), logits(I * J, 0.0), s(J * D), out(J * D);
    for (int64_t i = 0; i < I; ++i)
      for (int64_t e = 0; e < J * D; ++e) {
        if (K == 0) {
          u_hat[i * J * D + e] = x[(b * I + i) * J * D + e];
          continue;
        }
        for (int64_t k = 0; k < K; ++k) u_hat[i * J * D + e] += W[(i * J * D + e) * K + k] * x[(b * I + i) * K + k];
      }
    for (int64_t r = 0; r < c.R; ++r) {
      std::fill(s.begin(), s.end(), 0.0);
      for (int64_t i = 0; i < I; ++i) {
        double max = logits[i * J], sum = 0.0;
        for (int64_t j = 1; j < J; ++j) max = std::max(max, logits[i * J + j]);
        for (int64_t j = 0; j < J; ++j) sum += std::exp(logits[i * J + j] - max);
        for (int64_t j = 0; j < J; ++j)
          for (int64_t d = 0; d < D; ++d)
            s[j * D + d] += std::exp(logits[i * J + j] - max) / sum * u_hat[(i * J + j) * D + d];
      }
      for (int64_t j = 0; j < J; ++j) {
        double n2 = 0.0;
        for (int64_t d = 0; d < D; ++d) n2 += s[j * D + d] * s[j * D + d];
        for (int64_t d = 0; d < D; ++d) out[j * D + d] = n2 / (1.0 + n2) * s[j * D + d] / std::sqrt(n2 + 1e-8);
      }
      for (int64_t i = 0; i < I; ++i)
        for (int64_t j = 0; j < J; ++j)
          for (int64_t d = 0; d < D; ++d) logits[i * J + j] += u_hat[(i * J + j) * D + d] * out[j * D + d];
    }
    std::copy(out.begin(), out.end(), v.begin() + b * J * D);
  }
  return v;
}

// Forward and backward through the emulated kernels in precision T (accumulating in T).
template <typename T>
Outputs run_emulated(const Case& c, const std::vector<double>& x64, const std::vector<double>& W64,
                     const std::vector<double>& g64) {
  const Sizes sz{c.B, c.I, c.J, c.D, c.K, c.R};
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const std::vector<T> x(x64.begin(), x64.end()), W(W64.begin(), W64.end()), g(g64.begin(), g64.end());
  std::vector<T> v(c.B * c.J * c.D, nan), s_saved(c.B * c.R * c.J * c.D, nan), Vprev(s_saved.size(), nan),
      gs(s_saved.size(), nan), dx(x.size(), nan), dW(W.size(), nan);
  const T* W_ptr = c.K ? W.data() : nullptr;
  capsrouting::cuda::run_forward<T, T>(sz, EmulatedLauncher{}, x.data(), W_ptr, v.data(), s_saved.data(), Vprev.data());
  capsrouting::cuda::run_backward<T, T>(sz, EmulatedLauncher{}, x.data(), W_ptr, g.data(), s_saved.data(), Vprev.data(),
                                        gs.data(), dx.data(), c.K ? dW.data() : nullptr);
  return {std::vector<double>(v.begin(), v.end()), std::vector<double>(dx.begin(), dx.end()),
          std::vector<double>(dW.begin(), dW.end())};
}

// The largest |got - want| / (atol + rtol |want|): at most 1 passes; NaN (an element never written) fails.
double worst(const std::vector<double>& got, const std::vector<double>& want, double rtol, double atol) {
  if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
  double ratio = 0.0;
  for (size_t e = 0; e < got.size(); ++e) {
    const double r = std::abs(got[e] - want[e]) / (atol + rtol * std::abs(want[e]));
    if (!(r <= ratio)) ratio = std::isnan(r) ? std::numeric_limits<double>::infinity() : r;
  }
  return ratio;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double sum = 0.0;
  for (size_t e = 0; e < a.size(); ++e) sum += a[e] * b[e];
  return sum;
}

std::vector<double> random_vector(std::mt19937_64& rng, size_t n, double scale) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<double> out(n);
  for (auto& value : out) value = normal(rng);
  return out;
}

// <g, (v(x + h dx, W + h dW) - v(x - h dx, W - h dW)) / 2h>, by the naive loop.
double directional_derivative(const Case& c, const std::vector<double>& x, const std::vector<double>& W,
                              const std::vector<double>& g, const std::vector<double>& dx_dir,
                              const std::vector<double>& dW_dir) {
  const double h = 1e-5;
  auto moved = [&](double sign) {
    std::vector<double> xs(x), Ws(W);
    for (size_t e = 0; e < xs.size(); ++e) xs[e] += sign * h * dx_dir[e];
    for (size_t e = 0; e < Ws.size(); ++e) Ws[e] += sign * h * dW_dir[e];
    return naive_forward(c, xs, Ws);
  };
  const auto plus = moved(1.0), minus = moved(-1.0);
  double sum = 0.0;
  for (size_t e = 0; e < g.size(); ++e) sum += g[e] * (plus[e] - minus[e]) / (2 * h);
  return sum;
}

#ifdef CAPSROUTING_TEST_WITH_TORCH
// The CPU kernel's outputs in float64, as a second reference for every element.
Outputs cpu_kernel(const Case& c, const std::vector<double>& x64, const std::vector<double>& W64,
                   const std::vector<double>& g64) {
  auto tensor = [](const std::vector<double>& data, at::IntArrayRef shape) {
    return torch::from_blob(const_cast<double*>(data.data()), shape, torch::kDouble).clone();
  };
  auto to_vector = [](const at::Tensor& t) {
    const auto flat = t.contiguous().to(torch::kDouble);
    return std::vector<double>(flat.data_ptr<double>(), flat.data_ptr<double>() + flat.numel());
  };
  const auto g = tensor(g64, {c.B, c.J, c.D});
  if (c.K == 0) {
    const auto u_hat = tensor(x64, {c.B, c.I, c.J, c.D});
    const auto [v, s, Vp] = capsrouting::cpu::route_forward(u_hat, c.R);
    return {to_vector(v), to_vector(capsrouting::cpu::route_backward(g, u_hat, s, Vp, c.R)), {}};
  }
  const auto u = tensor(x64, {c.B, c.I, c.K}), W = tensor(W64, {c.I, c.J, c.D, c.K});
  const auto [v, s, Vp] = capsrouting::cpu::capsule_routing_forward(u, W, c.R);
  const auto [du, dW] = capsrouting::cpu::capsule_routing_backward(g, u, W, s, Vp, c.R);
  return {to_vector(v), to_vector(du), to_vector(dW)};
}
#endif

bool report(const char* check, double ratio) {
  const bool ok = ratio <= 1.0;
  std::printf("    %s %-44s worst error / tolerance %.3g\n", ok ? "ok  " : "FAIL", check, ratio);
  return ok;
}

bool run_case(const Case& c, uint64_t seed) {
  std::printf("%s: %s B=%ld I=%ld J=%ld Dout=%ld Din=%ld R=%ld\n", c.what, c.K ? "capsule_routing" : "route",
              long(c.B), long(c.I), long(c.J), long(c.D), long(c.K), long(c.R));
  std::mt19937_64 rng(seed);
  // Predictions of order one, so the routing is not trivially uniform.
  const auto x = random_vector(rng, c.x_size(), c.K ? 1.0 : 0.5);
  const auto W = random_vector(rng, c.W_size(), 1.0 / std::sqrt(double(std::max<int64_t>(c.K, 1))));
  const auto g = random_vector(rng, c.B * c.J * c.D, 1.0);
  const auto want_v = naive_forward(c, x, W);
  const Outputs f64 = run_emulated<double>(c, x, W, g);
  const Outputs f32 = run_emulated<float>(c, x, W, g);

  bool ok = report("float64 v vs naive loop", worst(f64.v, want_v, 1e-10, 1e-10));
  ok &= report("float32 v vs naive loop", worst(f32.v, want_v, 1e-4, 1e-5));
  for (int direction = 0; direction < 2; ++direction) {
    const auto dx_dir = random_vector(rng, x.size(), 1.0), dW_dir = random_vector(rng, W.size(), 1.0);
    const double numeric = directional_derivative(c, x, W, g, dx_dir, dW_dir);
    const double analytic = dot(f64.dx, dx_dir) + dot(f64.dW, dW_dir);
    // Central differences with h = 1e-5: truncation and rounding near 1e-8 relative.
    ok &= report("float64 gradients vs finite differences",
                 std::abs(analytic - numeric) / (1e-6 * (1.0 + std::abs(numeric))));
  }
  ok &= report("float32 du / du_hat vs float64", worst(f32.dx, f64.dx, 1e-4, 1e-5));
  if (c.K) ok &= report("float32 dW vs float64", worst(f32.dW, f64.dW, 1e-4, 1e-5));
#ifdef CAPSROUTING_TEST_WITH_TORCH
  const Outputs cpu = cpu_kernel(c, x, W, g);
  ok &= report("float64 v vs CPU kernel", worst(f64.v, cpu.v, 1e-10, 1e-10));
  ok &= report(c.K ? "float64 du vs CPU kernel" : "float64 du_hat vs CPU kernel", worst(f64.dx, cpu.dx, 1e-10, 1e-10));
  if (c.K) ok &= report("float64 dW vs CPU kernel", worst(f64.dW, cpu.dW, 1e-10, 1e-10));
  ok &= report("float32 v vs CPU kernel (float64)", worst(f32.v, cpu.v, 1e-4, 1e-5));
#endif
  return ok;
}

// Two kernels with the bugs the emulation must catch, each run alone by its own ctest entry
// that expects the program to fail: a shared-memory race (only ThreadSanitizer sees it: each
// thread reads its neighbour's slot with no barrier after the neighbour's write), and a
// barrier that only some threads reach (the emulation stops, where a GPU would hang).
__global__ void planted_race_kernel(float* out) {
  CAPSROUTING_DYNAMIC_SHARED(shared_bytes);
  float* slots = reinterpret_cast<float*>(shared_bytes);
  slots[threadIdx.x] = float(threadIdx.x);
  out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];  // the missing __syncthreads() is the bug
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 32) __syncthreads();  // the bug: threads 32.. never reach it
  out[threadIdx.x] = 1.0f;
}

int run_planted_bug(const char* which) {
  std::vector<float> out(64);
  if (std::strcmp(which, "--planted-race") == 0)
    cuda_emulation::launch(64, planted_race_kernel, dim3(1), 64 * sizeof(float), out.data());
  else
    cuda_emulation::launch(64, divergent_barrier_kernel, dim3(1), 0, out.data());
  std::printf("the planted bug went unnoticed\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && (std::strcmp(argv[1], "--planted-race") == 0 || std::strcmp(argv[1], "--divergent-barrier") == 0))
    return run_planted_bug(argv[1]);
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  // J = 64 with Dout = 32 fills the whole 2048-element tile, and with Din = 16 the input
  // gradient kernel splits Din over 16 blocks (one k each): the K-chunked path.
  const std::vector<Case> cases = {
      {"the paper's layer, small batch", 2, 1152, 10, 16, 8, 3, false},
      {"I not a multiple of any tile", 3, 37, 10, 16, 8, 3, true},
      {"J = 1", 2, 9, 1, 16, 8, 2, true},
      {"J = 64, Dout = 32, Din = 16 (K-chunked dW)", 2, 5, 64, 32, 16, 3, true},
      {"one iteration", 2, 11, 7, 5, 3, 1, false},
      {"five iterations, odd sizes", 3, 13, 5, 7, 3, 5, false},
      {"route, odd sizes", 3, 37, 10, 16, 0, 3, true},
      {"route, J = 1", 2, 9, 1, 5, 0, 2, false},
      {"route, J = 64, Dout = 32", 2, 5, 64, 32, 0, 2, false},
      {"route, four iterations", 2, 7, 3, 4, 0, 4, false},
  };
  int failures = 0;
  uint64_t seed = 0;
  for (const auto& c : cases)
    if (!quick || c.quick) failures += !run_case(c, ++seed);
  std::printf("%s\n", failures ? "FAILED" : "all cases passed");
  return failures == 0 ? 0 : 1;
}
