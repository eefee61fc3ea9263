// The core op with its autograd in C++: `moelora::molora_linear_native`, for eager calls on
// plain tensors (moelora/ops/molora_linear/op.py picks it). The Python custom op and a Python
// autograd.Function cost 50-120 us a call in dispatch layers, more than a decode step's whole
// LoRA work; this op costs one dispatcher call. The math is the native forward / backward
// ops' (whichever device kernel the dispatcher picks), so gradients are theirs exactly.
// torch.compile, tensor subclasses and fake tensors keep the Python custom op, whose fake and
// autograd the compiler traces.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "molora_linear.h"

namespace moelora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor> native_fwd(const Tensor& x, const Tensor& weight,
                                      const std::optional<Tensor>& bias, const Tensor& lora_a,
                                      const Tensor& lora_b, const Tensor& idx, const Tensor& gates,
                                      double scaling) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moelora::molora_linear_native_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                         const std::optional<Tensor>&,
                                                         const Tensor&, const Tensor&,
                                                         const Tensor&, const Tensor&, double)>();
  return op.call(x, weight, bias, lora_a, lora_b, idx, gates, scaling);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> native_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
    const Tensor& lora_b, const Tensor& idx, const Tensor& gates, const Tensor& h, double scaling,
    bool need_x, bool need_adapters) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moelora::molora_linear_native_bwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                           bool, bool)>();
  return op.call(dy, x, weight, lora_a, lora_b, idx, gates, h, scaling, need_x, need_adapters);
}

// needs_input_grad counts tensor inputs only: without a bias, those after it move up by one.
class MoLoRALinear : public torch::autograd::Function<MoLoRALinear> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& lora_a,
                        const Tensor& lora_b, const Tensor& idx, const Tensor& gates,
                        double scaling) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, h] = native_fwd(x, weight, bias, lora_a, lora_b, idx, gates, scaling);
    ctx->save_for_backward({x, weight, lora_a, lora_b, idx, gates, h});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &lora_a = saved[2], &lora_b = saved[3];
    const Tensor &idx = saved[4], &gates = saved[5], &h = saved[6];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const Tensor dy = grads[0].contiguous();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t after = has_bias ? 3 : 2;  // tensor-input index of lora_a
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const bool need_a = ctx->needs_input_grad(after), need_bb = ctx->needs_input_grad(after + 1);
    const bool need_g = ctx->needs_input_grad(after + 3);
    auto [gx, ga, gb, gg] =
        native_bwd(dy, x, weight, lora_a, lora_b, idx, gates, h, scaling, need_x, need_a || need_bb);
    // A trained base weight's gradients are plain GEMM work that gains nothing from fusion.
    return {need_x ? gx : Tensor(),
            need_w ? dy.t().mm(x) : Tensor(),
            need_b ? dy.sum(0) : Tensor(),
            need_a ? ga : Tensor(),
            need_bb ? gb : Tensor(),
            Tensor(),
            need_g ? gg : Tensor(),
            Tensor()};
  }
};

Tensor molora_linear_autograd(const Tensor& x, const Tensor& weight,
                              const std::optional<Tensor>& bias, const Tensor& lora_a,
                              const Tensor& lora_b, const Tensor& idx, const Tensor& gates,
                              double scaling) {
  // Nothing to record (no_grad decode, frozen everything): Function::apply would still build
  // its context and save seven tensors, ~10 us a call at decode sizes.
  const bool records = at::GradMode::is_enabled() &&
                       (x.requires_grad() || weight.requires_grad() || lora_a.requires_grad() ||
                        lora_b.requires_grad() || gates.requires_grad() ||
                        (bias.has_value() && bias->defined() && bias->requires_grad()));
  if (!records) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return std::get<0>(native_fwd(x, weight, bias, lora_a, lora_b, idx, gates, scaling));
  }
  return MoLoRALinear::apply(x, weight, bias, lora_a, lora_b, idx, gates, scaling);
}

// Below autograd (inference mode, or no tensor needs a gradient): the forward alone.
Tensor molora_linear_forward_only(const Tensor& x, const Tensor& weight,
                                  const std::optional<Tensor>& bias, const Tensor& lora_a,
                                  const Tensor& lora_b, const Tensor& idx, const Tensor& gates,
                                  double scaling) {
  return std::get<0>(native_fwd(x, weight, bias, lora_a, lora_b, idx, gates, scaling));
}

}  // namespace

TORCH_LIBRARY_IMPL(moelora, Autograd, m) {
  m.impl("molora_linear_native", &molora_linear_autograd);
}

TORCH_LIBRARY_IMPL(moelora, CompositeExplicitAutograd, m) {
  m.impl("molora_linear_native", &molora_linear_forward_only);
}

}  // namespace moelora
