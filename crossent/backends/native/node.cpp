// softmax / log_softmax as a compiled autograd node around crossent's numba kernels.
//
// A Python autograd.Function costs more than torch's whole (64, 10) log_softmax: its apply and
// its backward each run Python frames and take the GIL (measured, BENCHMARKS.md). This node is
// the same Function in C++: forward allocates the output and calls the kernel's C entry (a
// numba cfunc, ``kernels.py``); backward calls the backward entry, or, under create_graph,
// computes the same gradient in differentiable torch ops. The caller (``_core.softmax``'s
// lane) passes contiguous CPU input of the kernels' dtype and its (O, C, I) view about dim.
#include <torch/extension.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using Forward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, bool, int64_t);
using Backward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int64_t);

int64_t address(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

struct SoftmaxNode : public torch::autograd::Function<SoftmaxNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t forward_entry,
                            int64_t backward_entry, int64_t n_out, int64_t n_cls, int64_t n_in,
                            bool log, int64_t threads) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.numel() == n_out * n_cls * n_in,
                "crossent native softmax: contiguous CPU input of the given dims expected");
    at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
    if (x.numel() > 0) {
      reinterpret_cast<Forward>(forward_entry)(address(x), address(out), n_out, n_cls, n_in,
                                               log, threads);
    }
    ctx->save_for_backward({out});
    ctx->saved_data["entry"] = backward_entry;
    ctx->saved_data["dims"] = std::vector<int64_t>{n_out, n_cls, n_in};
    ctx->saved_data["log"] = log;
    ctx->saved_data["threads"] = threads;
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    at::Tensor out = ctx->get_saved_variables()[0];
    at::Tensor g = grads[0];
    std::vector<int64_t> dims = ctx->saved_data["dims"].toIntVector();
    bool log = ctx->saved_data["log"].toBool();
    at::Tensor grad;
    if (at::GradMode::is_enabled()) {
      // create_graph (a gradient penalty, a Hessian-vector product): differentiable torch ops
      // through the saved output, whose graph is this node; half precision in float32.
      bool half = out.scalar_type() != at::kFloat;
      at::Tensor ga = g.reshape(dims), oa = out.reshape(dims);
      if (half) {
        ga = ga.to(at::kFloat);
        oa = oa.to(at::kFloat);
      }
      at::Tensor r = log ? ga - oa.exp() * ga.sum(1, true) : oa * (ga - (ga * oa).sum(1, true));
      grad = r.to(out.scalar_type()).reshape(out.sizes());
    } else {
      at::Tensor gc = g.to(out.scalar_type()).contiguous();
      grad = at::empty_like(out, at::MemoryFormat::Contiguous);
      if (out.numel() > 0) {
        reinterpret_cast<Backward>(ctx->saved_data["entry"].toInt())(
            address(gc), address(out), address(grad), dims[0], dims[1], dims[2], log,
            ctx->saved_data["threads"].toInt());
      }
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor softmax(const at::Tensor& x, int64_t forward_entry, int64_t backward_entry,
                   int64_t n_out, int64_t n_cls, int64_t n_in, bool log, int64_t threads) {
  return SoftmaxNode::apply(x, forward_entry, backward_entry, n_out, n_cls, n_in, log, threads);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax", &softmax, "log_softmax (log=True) or softmax of contiguous CPU input");
}
