// The CUDA kernels' own source (csrc/cuda/routing_kernels.cuh), run on the CPU through
// csrc/emulation/cuda_emulation.h, with the launch plan of the real launchers.
//
// Every case runs forward and backward of capsule_routing (u, W) or route (u_hat), in float32
// and float64, with or without the routing options of DESIGN.md §6, and checks:
//   * v (and the last iteration's couplings) against a naive double-precision loop of §1/§6;
//   * every gradient element (du and dW, or du_hat; dbias, dprior) against a naive reverse-mode
//     adjoint of that loop (written from the loop itself, not from the V identity of §2);
//   * the gradients against central finite differences of the naive loop along random directions
//     (float64; with detach_inner the inner iterations read a frozen copy of the inputs), and the
//     float32 results against float64's;
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

// The routing options of a run (DESIGN.md §6). All false: the plain op.
struct Flags {
  bool bias = false, prior = false, leaky = false, detach_inner = false;
  bool couplings = false;     // return_couplings
  bool option_grads = true;   // backward: dbias and dprior wanted
  bool full_backward() const { return !detach_inner || (option_grads && (bias || prior)); }
  bool wants_dbias() const { return bias && option_grads; }
  bool wants_dprior() const { return prior && option_grads; }
  std::string describe() const {
    std::string out;
    for (auto [on, name] : {std::pair{bias, " bias"}, {prior, " logit_prior"}, {leaky, " leaky"},
                            {detach_inner, " detach_inner"}, {couplings, " return_couplings"}})
      if (on) out += name;
    if (!option_grads) out += " (option_grads off)";
    return out.empty() ? "" : " options:" + out;
  }
};

// The op's inputs; bias (J*D) and prior (I*J) are empty when the option is off.
struct Inputs {
  std::vector<double> x, W, bias, prior;
};

// What a run gives; couplings, dbias and dprior are empty when not asked for.
struct Outputs {
  std::vector<double> v, couplings, dx, dW, dbias, dprior;
  std::vector<double> gs;  // the emulated kernels' g_s scratch (B, R, J, D)
};

// u_hat[b] (I, J, D) from u and W, or read from the given predictions.
std::vector<double> naive_predictions(const Case& c, const Inputs& in, int64_t b) {
  const int64_t I = c.I, JD = c.J * c.D, K = c.K;
  std::vector<double> u_hat(I * JD, 0.0);
  for (int64_t i = 0; i < I; ++i)
    for (int64_t e = 0; e < JD; ++e) {
      if (K == 0) {
        u_hat[i * JD + e] = in.x[(b * I + i) * JD + e];
        continue;
      }
      for (int64_t k = 0; k < K; ++k) u_hat[i * JD + e] += in.W[(i * JD + e) * K + k] * in.x[(b * I + i) * K + k];
    }
  return u_hat;
}

// One literal routing step's couplings: exp(b_j) / (sum_k exp(b_k)), plus 1 in the sum when leaky.
void naive_couplings(const Flags& f, int64_t I, int64_t J, const std::vector<double>& logits, std::vector<double>& c) {
  for (int64_t i = 0; i < I; ++i) {
    double sum = f.leaky ? 1.0 : 0.0;
    for (int64_t j = 0; j < J; ++j) sum += std::exp(logits[i * J + j]);
    for (int64_t j = 0; j < J; ++j) c[i * J + j] = std::exp(logits[i * J + j]) / sum;
  }
}

double naive_squash_factor(double n2) { return n2 / (1.0 + n2) / std::sqrt(n2 + 1e-8); }

// Everything the naive loop computes for one batch element: per iteration r the couplings,
// s (bias included) and v.
struct NaiveTrace {
  std::vector<std::vector<double>> c, s, v;
};

// The loop of DESIGN.md §6 for batch element b. frozen: with detach_inner, the inputs the inner
// iterations (r < R) read instead of `in` (the finite differences move `in` alone); null: `in`.
NaiveTrace naive_trace(const Case& c, const Flags& f, const Inputs& in, const Inputs* frozen, int64_t b) {
  const int64_t I = c.I, J = c.J, D = c.D;
  const auto u_hat = naive_predictions(c, in, b);
  const auto u_hat_inner = frozen != nullptr && f.detach_inner ? naive_predictions(c, *frozen, b) : u_hat;
  std::vector<double> logits(I * J, 0.0);
  if (f.prior) logits = in.prior;
  NaiveTrace t;
  for (int64_t r = 0; r < c.R; ++r) {
    const auto& x = r == c.R - 1 ? u_hat : u_hat_inner;
    std::vector<double> cr(I * J), s(J * D, 0.0), v(J * D);
    naive_couplings(f, I, J, logits, cr);
    for (int64_t i = 0; i < I; ++i)
      for (int64_t e = 0; e < J * D; ++e) s[e] += cr[i * J + e / D] * x[i * J * D + e];
    if (f.bias)
      for (int64_t e = 0; e < J * D; ++e) s[e] += in.bias[e];
    for (int64_t j = 0; j < J; ++j) {
      double n2 = 0.0;
      for (int64_t d = 0; d < D; ++d) n2 += s[j * D + d] * s[j * D + d];
      for (int64_t d = 0; d < D; ++d) v[j * D + d] = naive_squash_factor(n2) * s[j * D + d];
    }
    for (int64_t i = 0; i < I; ++i)
      for (int64_t e = 0; e < J * D; ++e) logits[i * J + e / D] += x[i * J * D + e] * v[e];
    t.c.push_back(cr);
    t.s.push_back(s);
    t.v.push_back(v);
  }
  return t;
}

// v (B, J, D) and, when asked for, the last iteration's couplings (B, I, J), in double.
Outputs naive_forward(const Case& c, const Flags& f, const Inputs& in, const Inputs* frozen = nullptr) {
  Outputs out;
  for (int64_t b = 0; b < c.B; ++b) {
    const auto t = naive_trace(c, f, in, frozen, b);
    out.v.insert(out.v.end(), t.v.back().begin(), t.v.back().end());
    if (f.couplings) out.couplings.insert(out.couplings.end(), t.c.back().begin(), t.c.back().end());
  }
  return out;
}

// The gradients of <g, v> by reverse mode through the naive loop, one step at a time.
Outputs naive_backward(const Case& c, const Flags& f, const Inputs& in, const std::vector<double>& g) {
  const int64_t I = c.I, J = c.J, D = c.D, JD = J * D, K = c.K, R = c.R;
  Outputs out;
  out.dx.assign(in.x.size(), 0.0);
  out.dW.assign(in.W.size(), 0.0);
  std::vector<double> dbias(JD, 0.0), dprior(I * J, 0.0);
  for (int64_t b = 0; b < c.B; ++b) {
    const auto u_hat = naive_predictions(c, in, b);
    const auto t = naive_trace(c, f, in, nullptr, b);
    std::vector<double> du_hat(I * JD, 0.0), g_logits(I * J, 0.0);  // g_logits: d/d logits(r+1)
    for (int64_t r = R - 1; r >= 0; --r) {
      const bool live = r == R - 1 || !f.detach_inner;  // whether this iteration's u_hat takes gradients
      // logits(r+1) = logits(r) + dot(u_hat, v(r)): into v(r), and into u_hat.
      std::vector<double> gv(JD, 0.0), gs(JD);
      if (r == R - 1)
        for (int64_t e = 0; e < JD; ++e) gv[e] = g[b * JD + e];
      for (int64_t i = 0; i < I; ++i)
        for (int64_t e = 0; e < JD; ++e) {
          gv[e] += g_logits[i * J + e / D] * u_hat[i * JD + e];
          if (live) du_hat[i * JD + e] += g_logits[i * J + e / D] * t.v[r][e];
        }
      // v = f(n2) s: g_s = f g_v + 2 f'(n2) dot(s, g_v) s, with f'/f = 1/n2 - 1/(1+n2) - 1/(2 (n2+eps)).
      for (int64_t j = 0; j < J; ++j) {
        const double* s = t.s[r].data() + j * D;
        double n2 = 0.0, sg = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          n2 += s[d] * s[d];
          sg += s[d] * gv[j * D + d];
        }
        const double fac = naive_squash_factor(n2);
        const double dfac = fac * (1.0 / n2 - 1.0 / (1.0 + n2) - 0.5 / (n2 + 1e-8));
        for (int64_t d = 0; d < D; ++d) gs[j * D + d] = fac * gv[j * D + d] + 2.0 * dfac * sg * s[d];
      }
      for (int64_t e = 0; e < JD; ++e) dbias[e] += gs[e];
      // s = sum_i c u_hat + bias: into u_hat and the couplings; then the softmax's Jacobian
      // (c_j delta_jk - c_j c_k, with or without the leak) into logits(r) = logits(r+1)'s path.
      const auto& cr = t.c[r];
      for (int64_t i = 0; i < I; ++i) {
        std::vector<double> gc(J, 0.0);
        for (int64_t e = 0; e < JD; ++e) {
          gc[e / D] += gs[e] * u_hat[i * JD + e];
          if (live) du_hat[i * JD + e] += cr[i * J + e / D] * gs[e];
        }
        double weighted = 0.0;
        for (int64_t j = 0; j < J; ++j) weighted += cr[i * J + j] * gc[j];
        for (int64_t j = 0; j < J; ++j) g_logits[i * J + j] += cr[i * J + j] * (gc[j] - weighted);
      }
    }
    for (int64_t e = 0; e < I * J; ++e) dprior[e] += g_logits[e];  // logits(1) = prior
    for (int64_t i = 0; i < I; ++i)
      for (int64_t e = 0; e < JD; ++e) {
        if (K == 0) {
          out.dx[(b * I + i) * JD + e] = du_hat[i * JD + e];
          continue;
        }
        for (int64_t k = 0; k < K; ++k) {
          out.dx[(b * I + i) * K + k] += in.W[(i * JD + e) * K + k] * du_hat[i * JD + e];
          out.dW[(i * JD + e) * K + k] += du_hat[i * JD + e] * in.x[(b * I + i) * K + k];
        }
      }
  }
  if (f.wants_dbias()) out.dbias = dbias;
  if (f.wants_dprior()) out.dprior = dprior;
  return out;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& x) {
  return std::vector<T>(x.begin(), x.end());
}
template <typename T>
std::vector<double> widen(const std::vector<T>& x) {
  return std::vector<double>(x.begin(), x.end());
}

// Forward and backward through the emulated kernels in precision T (accumulating in T), with
// the options as the launcher sets them (routing_cuda.cu).
template <typename T>
Outputs run_emulated(const Case& c, const Flags& f, const Inputs& in, const std::vector<double>& g64) {
  const Sizes sz{c.B, c.I, c.J, c.D, c.K, c.R};
  const int64_t JD = c.J * c.D;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const auto x = cast<T>(in.x), W = cast<T>(in.W), g = cast<T>(g64), bias = cast<T>(in.bias), prior = cast<T>(in.prior);
  std::vector<T> v(c.B * JD, nan), s_saved(c.B * c.R * JD, nan), Vprev(s_saved.size(), nan),
      gs(s_saved.size(), nan), dx(x.size(), nan), dW(W.size(), nan), couplings, dprior;
  capsrouting::cuda::Options<T, T> opt;
  opt.bias = f.bias ? bias.data() : nullptr;
  opt.prior = f.prior ? prior.data() : nullptr;
  opt.leaky = f.leaky;
  opt.detach_inner = f.detach_inner;
  opt.full = f.full_backward();
  if (f.couplings) {
    couplings.assign(c.B * c.I * c.J, nan);
    opt.couplings = couplings.data();
  }
  if (f.wants_dprior()) {
    dprior.assign(c.I * c.J, nan);
    opt.dprior = dprior.data();
  }
  const T* W_ptr = c.K ? W.data() : nullptr;
  capsrouting::cuda::run_forward<T, T>(sz, EmulatedLauncher{}, opt, x.data(), W_ptr, v.data(), s_saved.data(),
                                       Vprev.data());
  capsrouting::cuda::run_backward<T, T>(sz, EmulatedLauncher{}, opt, x.data(), W_ptr, g.data(), s_saved.data(),
                                        Vprev.data(), gs.data(), dx.data(), c.K ? dW.data() : nullptr);
  Outputs out{widen(v), widen(couplings), widen(dx), widen(dW), {}, widen(dprior), widen(gs)};
  if (f.wants_dbias()) {  // as the launcher: the sum of g_s(r) over the batch and the iterations
    out.dbias.assign(JD, 0.0);
    for (size_t n = 0; n < gs.size(); ++n) out.dbias[n % JD] += double(gs[n]);
  }
  return out;
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

// <g, (v(in + h dir) - v(in - h dir)) / 2h>, by the naive loop. detach_inner: the inner
// iterations keep reading the unmoved x and W (u_hat.detach()); bias and prior move throughout.
double directional_derivative(const Case& c, const Flags& f, const Inputs& in, const std::vector<double>& g,
                              const Inputs& dir) {
  const double h = 1e-5;
  auto moved = [&](double sign) {
    Inputs m(in);
    auto move = [&](std::vector<double>& values, const std::vector<double>& d) {
      for (size_t e = 0; e < values.size(); ++e) values[e] += sign * h * d[e];
    };
    move(m.x, dir.x);
    move(m.W, dir.W);
    move(m.bias, dir.bias);
    move(m.prior, dir.prior);
    return naive_forward(c, f, m, &in).v;
  };
  const auto plus = moved(1.0), minus = moved(-1.0);
  double sum = 0.0;
  for (size_t e = 0; e < g.size(); ++e) sum += g[e] * (plus[e] - minus[e]) / (2 * h);
  return sum;
}

#ifdef CAPSROUTING_TEST_WITH_TORCH
// The CPU kernel's outputs in float64, as a second reference for every element.
Outputs cpu_kernel(const Case& c, const Flags& f, const Inputs& in, const std::vector<double>& g64) {
  auto tensor = [](const std::vector<double>& data, at::IntArrayRef shape) {
    return torch::from_blob(const_cast<double*>(data.data()), shape, torch::kDouble).clone();
  };
  auto to_vector = [](const at::Tensor& t) {
    if (!t.defined()) return std::vector<double>();
    const auto flat = t.contiguous().to(torch::kDouble);
    return std::vector<double>(flat.data_ptr<double>(), flat.data_ptr<double>() + flat.numel());
  };
  capsrouting::RoutingOptions options;
  if (f.bias) options.bias = tensor(in.bias, {c.J, c.D});
  if (f.prior) options.logit_prior = tensor(in.prior, {c.I, c.J});
  options.leaky = f.leaky;
  options.detach_inner = f.detach_inner;
  options.return_couplings = f.couplings;
  options.option_grads = f.option_grads;
  const auto g = tensor(g64, {c.B, c.J, c.D});
  const auto x = c.K ? tensor(in.x, {c.B, c.I, c.K}) : tensor(in.x, {c.B, c.I, c.J, c.D});
  const auto W = c.K ? tensor(in.W, {c.I, c.J, c.D, c.K}) : at::Tensor();
  const auto [v, couplings, s, Vp] = capsrouting::cpu::forward(x, W, options, c.R);
  const auto [dx, dW, dbias, dprior] = capsrouting::cpu::backward(g, x, W, options, s, Vp, c.R);
  return {to_vector(v), to_vector(couplings), to_vector(dx), to_vector(dW), to_vector(dbias), to_vector(dprior), {}};
}
#endif

bool report(const char* check, double ratio) {
  const bool ok = ratio <= 1.0;
  std::printf("    %s %-44s worst error / tolerance %.3g\n", ok ? "ok  " : "FAIL", check, ratio);
  return ok;
}

bool run_case(const Case& c, const Flags& f, uint64_t seed) {
  std::printf("%s: %s B=%ld I=%ld J=%ld Dout=%ld Din=%ld R=%ld%s\n", c.what, c.K ? "capsule_routing" : "route",
              long(c.B), long(c.I), long(c.J), long(c.D), long(c.K), long(c.R), f.describe().c_str());
  std::mt19937_64 rng(seed);
  Inputs in;
  // Predictions of order one, so the routing is not trivially uniform.
  in.x = random_vector(rng, c.x_size(), c.K ? 1.0 : 0.5);
  in.W = random_vector(rng, c.W_size(), 1.0 / std::sqrt(double(std::max<int64_t>(c.K, 1))));
  const auto g = random_vector(rng, c.B * c.J * c.D, 1.0);
  if (f.bias) in.bias = random_vector(rng, c.J * c.D, 0.5);
  if (f.prior) in.prior = random_vector(rng, c.I * c.J, 1.0);
  const Outputs want = naive_forward(c, f, in);
  const Outputs want_grads = naive_backward(c, f, in, g);
  const Outputs f64 = run_emulated<double>(c, f, in, g);
  const Outputs f32 = run_emulated<float>(c, f, in, g);
  const char* dx_name = c.K ? "du" : "du_hat";
  auto named = [](const char* a, const char* b, const char* c_) { return std::string(a) + b + c_; };

  bool ok = report("float64 v vs naive loop", worst(f64.v, want.v, 1e-10, 1e-10));
  ok &= report("float32 v vs naive loop", worst(f32.v, want.v, 1e-4, 1e-5));
  if (f.couplings) {
    ok &= report("float64 couplings vs naive loop", worst(f64.couplings, want.couplings, 1e-10, 1e-10));
    ok &= report("float32 couplings vs naive loop", worst(f32.couplings, want.couplings, 1e-4, 1e-5));
  }
  ok &= report(named("float64 ", dx_name, " vs naive adjoint").c_str(), worst(f64.dx, want_grads.dx, 1e-10, 1e-10));
  if (c.K) ok &= report("float64 dW vs naive adjoint", worst(f64.dW, want_grads.dW, 1e-10, 1e-10));
  if (f.wants_dbias()) ok &= report("float64 dbias vs naive adjoint", worst(f64.dbias, want_grads.dbias, 1e-10, 1e-10));
  if (f.wants_dprior())
    ok &= report("float64 dprior vs naive adjoint", worst(f64.dprior, want_grads.dprior, 1e-10, 1e-10));
  if (!f.full_backward()) {  // one pass: phase 1 never formed g_s(r) for r < R
    double written = 0.0;
    for (int64_t n = 0; n < int64_t(f64.gs.size()); ++n)
      written += (n / (c.J * c.D)) % c.R != c.R - 1 && !std::isnan(f64.gs[n]);
    ok &= report("one pass: no inner g_s(r) formed", written);
  }
  for (int direction = 0; direction < 2; ++direction) {
    Inputs dir;
    dir.x = random_vector(rng, in.x.size(), 1.0);
    dir.W = random_vector(rng, in.W.size(), 1.0);
    // Option directions only where the gradient is computed; otherwise they stay still.
    dir.bias = f.wants_dbias() ? random_vector(rng, in.bias.size(), 1.0) : std::vector<double>(in.bias.size(), 0.0);
    dir.prior = f.wants_dprior() ? random_vector(rng, in.prior.size(), 1.0) : std::vector<double>(in.prior.size(), 0.0);
    const double numeric = directional_derivative(c, f, in, g, dir);
    const double analytic = dot(f64.dx, dir.x) + dot(f64.dW, dir.W) + dot(f64.dbias, dir.bias) +
                            dot(f64.dprior, dir.prior);
    // Central differences with h = 1e-5: truncation and rounding near 1e-8 relative.
    ok &= report("float64 gradients vs finite differences",
                 std::abs(analytic - numeric) / (1e-6 * (1.0 + std::abs(numeric))));
  }
  ok &= report(named("float32 ", dx_name, " vs float64").c_str(), worst(f32.dx, f64.dx, 1e-4, 1e-5));
  if (c.K) ok &= report("float32 dW vs float64", worst(f32.dW, f64.dW, 1e-4, 1e-5));
  if (f.wants_dbias()) ok &= report("float32 dbias vs float64", worst(f32.dbias, f64.dbias, 1e-4, 1e-5));
  if (f.wants_dprior()) ok &= report("float32 dprior vs float64", worst(f32.dprior, f64.dprior, 1e-4, 1e-5));
#ifdef CAPSROUTING_TEST_WITH_TORCH
  const Outputs cpu = cpu_kernel(c, f, in, g);
  ok &= report("float64 v vs CPU kernel", worst(f64.v, cpu.v, 1e-10, 1e-10));
  if (f.couplings) ok &= report("float64 couplings vs CPU kernel", worst(f64.couplings, cpu.couplings, 1e-10, 1e-10));
  ok &= report(named("float64 ", dx_name, " vs CPU kernel").c_str(), worst(f64.dx, cpu.dx, 1e-10, 1e-10));
  if (c.K) ok &= report("float64 dW vs CPU kernel", worst(f64.dW, cpu.dW, 1e-10, 1e-10));
  if (f.wants_dbias()) ok &= report("float64 dbias vs CPU kernel", worst(f64.dbias, cpu.dbias, 1e-10, 1e-10));
  if (f.wants_dprior()) ok &= report("float64 dprior vs CPU kernel", worst(f64.dprior, cpu.dprior, 1e-10, 1e-10));
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
    if (!quick || c.quick) failures += !run_case(c, Flags{}, ++seed);

  // DESIGN.md §6: all 16 combinations of (bias, logit_prior, leaky, detach_inner), each returning
  // the couplings, on odd sizes and on a one-iteration route with J = 1 (the options cases pick
  // their --quick runs below).
  const Case options_case = {"options, odd sizes", 3, 7, 4, 5, 3, 3, false};
  const Case options_route = {"options, route, J = 1, one iteration", 3, 6, 1, 3, 0, 1, false};
  const Case k_chunked = {"options, K-chunked dW", 2, 3, 64, 32, 16, 2, false};
  if (!quick)
    for (const Case& c : {options_case, options_route})
      for (int bits = 0; bits < 16; ++bits) {
        Flags f;
        f.bias = bits & 1;
        f.prior = bits & 2;
        f.leaky = bits & 4;
        f.detach_inner = bits & 8;
        f.couplings = true;
        failures += !run_case(c, f, ++seed);
      }
  Flags all;
  all.bias = all.prior = all.leaky = all.detach_inner = all.couplings = true;
  Flags one_pass = all;  // detach_inner, dbias and dprior not wanted: phase 1 skipped
  one_pass.option_grads = false;
  Flags no_option_grads = one_pass;  // the full backward, without dbias and dprior
  no_option_grads.detach_inner = false;
  // Under --quick (ThreadSanitizer) the first three alone: every option on, the one-pass backward.
  failures += !run_case(options_case, all, ++seed);
  failures += !run_case(options_case, one_pass, ++seed);
  failures += !run_case(options_route, all, ++seed);
  if (!quick) {
    failures += !run_case(options_case, no_option_grads, ++seed);
    failures += !run_case(k_chunked, all, ++seed);  // dprior from the K-chunk 0 blocks alone
  }
  std::printf("%s\n", failures ? "FAILED" : "all cases passed");
  return failures == 0 ? 0 : 1;
}
