// Input checks of the extension's ops, worded like capsrouting/_validation.py, so that
// C++ callers get the same errors as Python callers (who are checked before reaching here).
#pragma once

#include <torch/library.h>

namespace capsrouting {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == at::kDouble || t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
          t.scalar_type() == at::kBFloat16,
      name, " must have dtype float64, float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_num_iterations(int64_t num_iterations) {
  TORCH_CHECK_VALUE(num_iterations >= 1, "num_iterations must be >= 1, got ", num_iterations);
}

// u (B, I, Din) and W (I, J, Dout, Din).
inline void check_capsule_routing_args(const at::Tensor& u, const at::Tensor& W, int64_t num_iterations) {
  TORCH_CHECK_VALUE(u.dim() == 3, "u must have shape (B, I, Din) (3 dims), got shape ", u.sizes());
  TORCH_CHECK_VALUE(W.dim() == 4, "W must have shape (I, J, Dout, Din) (4 dims), got shape ", W.sizes());
  check_floating(u, "u");
  check_floating(W, "W");
  TORCH_CHECK_VALUE(u.size(1) >= 1 && u.size(2) >= 1,
                    "u must have shape (B, I, Din) with every dimension but the batch >= 1, got shape ", u.sizes());
  TORCH_CHECK_VALUE(W.size(0) >= 1 && W.size(1) >= 1 && W.size(2) >= 1 && W.size(3) >= 1,
                    "W must have shape (I, J, Dout, Din) with every dimension but the batch >= 1, got shape ",
                    W.sizes());
  TORCH_CHECK_VALUE(u.size(1) == W.size(0), "W must have shape (I, J, Dout, Din) with I = u.shape[1] = ", u.size(1),
                    ", got W of shape ", W.sizes());
  TORCH_CHECK_VALUE(u.size(2) == W.size(3), "W must have shape (I, J, Dout, Din) with Din = u.shape[2] = ",
                    u.size(2), ", got W of shape ", W.sizes());
  TORCH_CHECK_TYPE(u.scalar_type() == W.scalar_type(), "u and W must have the same dtype, got u ", u.scalar_type(),
                   " and W ", W.scalar_type());
  TORCH_CHECK_VALUE(u.device() == W.device(), "u and W must be on the same device, got u on ", u.device(),
                    " and W on ", W.device());
  check_num_iterations(num_iterations);
}

// u_hat (B, I, J, D).
inline void check_route_args(const at::Tensor& u_hat, int64_t num_iterations) {
  TORCH_CHECK_VALUE(u_hat.dim() == 4, "u_hat must have shape (B, I, J, D) (4 dims), got shape ", u_hat.sizes());
  check_floating(u_hat, "u_hat");
  TORCH_CHECK_VALUE(u_hat.size(1) >= 1 && u_hat.size(2) >= 1 && u_hat.size(3) >= 1,
                    "u_hat must have shape (B, I, J, D) with every dimension but the batch >= 1, got shape ",
                    u_hat.sizes());
  check_num_iterations(num_iterations);
}

// What the forward saved for the backward: s(r) and V(r-1), (B, R, J, D) each, plus grad_v (B, J, D).
inline void check_backward_args(const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& s_saved,
                                const at::Tensor& Vprev_saved, int64_t B, int64_t J, int64_t D,
                                int64_t num_iterations) {
  check_num_iterations(num_iterations);
  TORCH_CHECK_VALUE(grad_v.dim() == 3 && grad_v.size(0) == B && grad_v.size(1) == J && grad_v.size(2) == D,
                    "grad_v must have shape (B, J, D) = (", B, ", ", J, ", ", D, "), got shape ", grad_v.sizes());
  TORCH_CHECK_TYPE(grad_v.scalar_type() == x.scalar_type(), "grad_v must have dtype ", x.scalar_type(), ", got ",
                   grad_v.scalar_type());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* saved : {&s_saved, &Vprev_saved}) {
    const char* name = saved == &s_saved ? "s_saved" : "Vprev_saved";
    TORCH_CHECK_VALUE(saved->dim() == 4 && saved->size(0) == B && saved->size(1) == num_iterations &&
                          saved->size(2) == J && saved->size(3) == D,
                      name, " must have shape (B, R, J, D) = (", B, ", ", num_iterations, ", ", J, ", ", D,
                      "), got shape ", saved->sizes());
    TORCH_CHECK_TYPE(saved->scalar_type() == acc, name, " must have dtype ", acc, ", got ", saved->scalar_type());
  }
  for (const auto* t : {&grad_v, &s_saved, &Vprev_saved}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), "every argument must be on ", x.device(), ", got one on ",
                      t->device());
  }
}

// The routing options of DESIGN.md §6: bias (J, D) and logit_prior (I, J), undefined or of x's dtype and device.
inline void check_routing_options(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& logit_prior, int64_t I, int64_t J, int64_t D) {
  struct Option {
    const char* name;
    const c10::optional<at::Tensor>& t;
    int64_t rows, cols;
    const char* layout;
  };
  for (const Option& o : {Option{"bias", bias, J, D, "(J, Dout)"}, Option{"logit_prior", logit_prior, I, J, "(I, J)"}}) {
    if (!o.t.has_value() || !o.t->defined()) continue;
    const at::Tensor& t = *o.t;
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == o.rows && t.size(1) == o.cols, o.name, " must have shape ",
                      o.layout, " = (", o.rows, ", ", o.cols, "), got shape ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), o.name, " must have the dtype of the routed input, ",
                     x.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), o.name, " must be on the device of the routed input, ", x.device(),
                      ", got ", t.device());
  }
}

}  // namespace capsrouting
