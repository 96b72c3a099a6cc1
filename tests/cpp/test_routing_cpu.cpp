// The CPU kernel's forward against a naive loop written from DESIGN.md §1, in C++ alone.
// Run by ctest (CMakeLists.txt). Exit status 0 when every case agrees.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "cpu/routing_cpu.h"

namespace {

// v (B, J, D) by the literal algorithm: u_hat, zero logits, softmax over j, squash, agreement.
std::vector<double> naive_routing(const at::Tensor& u_in, const at::Tensor& W_in, int64_t R) {
  const auto u = u_in.to(at::kDouble).contiguous();
  const auto W = W_in.to(at::kDouble).contiguous();
  const int64_t B = u.size(0), I = u.size(1), K = u.size(2), J = W.size(1), D = W.size(2);
  const double* pu = u.data_ptr<double>();
  const double* pW = W.data_ptr<double>();
  std::vector<double> v(B * J * D);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> u_hat(I * J * D, 0.0), logits(I * J, 0.0), s(J * D), out(J * D);
    for (int64_t i = 0; i < I; ++i)
      for (int64_t j = 0; j < J; ++j)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t k = 0; k < K; ++k)
            u_hat[(i * J + j) * D + d] += pW[((i * J + j) * D + d) * K + k] * pu[(b * I + i) * K + k];
    for (int64_t r = 0; r < R; ++r) {
      std::fill(s.begin(), s.end(), 0.0);
      for (int64_t i = 0; i < I; ++i) {
        double max = logits[i * J], sum = 0.0;
        for (int64_t j = 1; j < J; ++j) max = std::max(max, logits[i * J + j]);
        for (int64_t j = 0; j < J; ++j) sum += std::exp(logits[i * J + j] - max);
        for (int64_t j = 0; j < J; ++j) {
          const double c = std::exp(logits[i * J + j] - max) / sum;
          for (int64_t d = 0; d < D; ++d) s[j * D + d] += c * u_hat[(i * J + j) * D + d];
        }
      }
      for (int64_t j = 0; j < J; ++j) {
        double n2 = 0.0;
        for (int64_t d = 0; d < D; ++d) n2 += s[j * D + d] * s[j * D + d];
        for (int64_t d = 0; d < D; ++d) out[j * D + d] = n2 / (1.0 + n2) * s[j * D + d] / std::sqrt(n2 + 1e-8);
      }
      if (r < R - 1)
        for (int64_t i = 0; i < I; ++i)
          for (int64_t j = 0; j < J; ++j)
            for (int64_t d = 0; d < D; ++d) logits[i * J + j] += u_hat[(i * J + j) * D + d] * out[j * D + d];
    }
    std::copy(out.begin(), out.end(), v.begin() + b * J * D);
  }
  return v;
}

double max_error(const at::Tensor& got, const std::vector<double>& want) {
  const auto g = got.to(at::kDouble).contiguous();
  double err = 0.0;
  for (size_t e = 0; e < want.size(); ++e) err = std::max(err, std::abs(g.data_ptr<double>()[e] - want[e]));
  return err;
}

struct Case {
  int64_t B, I, K, J, D, R;
  at::ScalarType dtype;
  double tolerance;
};

}  // namespace

int main() {
  torch::manual_seed(0);
  const std::vector<Case> cases = {
      {2, 1152, 8, 10, 16, 3, at::kDouble, 1e-12},  // the paper's layer
      {35, 37, 5, 7, 3, 5, at::kDouble, 1e-12},     // padded chunk of batch elements, Din not a multiple of 4
      {1, 13, 3, 1, 4, 1, at::kDouble, 1e-12},      // J = 1, one iteration
      {35, 37, 8, 10, 16, 3, at::kFloat, 1e-5},
  };
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("capsrouting::capsule_routing_ext", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, bool, bool, bool, int64_t)>();
  int failures = 0;
  for (const auto& c : cases) {
    const auto u = torch::randn({c.B, c.I, c.K}, torch::dtype(c.dtype));
    const auto W = torch::randn({c.I, c.J, c.D, c.K}, torch::dtype(c.dtype)) / std::sqrt(double(c.K));
    const auto want = naive_routing(u, W, c.R);
    const double direct = max_error(std::get<0>(capsrouting::cpu::forward(u, W, {}, c.R)), want);
    const double dispatched = max_error(std::get<0>(op.call(u, W, std::nullopt, std::nullopt, false, false, false, c.R)), want);
    const bool ok = direct <= c.tolerance && dispatched <= c.tolerance;
    failures += !ok;
    std::printf("%s B=%ld I=%ld Din=%ld J=%ld Dout=%ld R=%ld %s: max |error| %.2e (kernel) %.2e (dispatcher), tolerance %.0e\n",
                ok ? "ok  " : "FAIL", long(c.B), long(c.I), long(c.K), long(c.J), long(c.D), long(c.R),
                c10::toString(c.dtype), direct, dispatched, c.tolerance);
  }
  return failures == 0 ? 0 : 1;
}
