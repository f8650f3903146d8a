// softmax / log_softmax, cross-entropy and nll_loss as compiled autograd nodes around
// crossent's numba kernels.
//
// A Python autograd.Function costs more than torch's whole (64, 10) log_softmax: its apply and
// its backward each run Python frames and take the GIL (measured, BENCHMARKS.md). These nodes
// are the lanes' Functions in C++, calling the kernels' C entries (numba cfuncs, kernels.py).
// The nodes are reached through their lanes (``softmax_lane``, ``nll_lane``, ``ce_lane``: the
// common call's checks, below).
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/extension.h>

#include <optional>

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

// The cross-entropy launch: logits, rows, classes, target, ignore_index, eps, z_loss, mean,
// probe tolerance, whether to make the gradient, its address, the loss's, the verdicts',
// threads.
using CrossEntropyEntry = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, double, double,
                                   bool, double, bool, int64_t, int64_t, int64_t, int64_t);

thread_local bool probe_seen = false;  // the last forward's misuse-probe verdict (this thread)

// The reduced loss of (R, C) logits and (R,) int64 indices, its gradient made (and scaled) in
// forward, as ``_core.autograd.CrossEntropyLane``.
struct CrossEntropyNode : public torch::autograd::Function<CrossEntropyNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& target, int64_t entry, int64_t ignore_index,
                            double eps, double z_loss, bool mean, double probe_tol,
                            int64_t threads, bool want_grad) {
    at::Tensor grad = want_grad ? at::empty_like(logits, at::MemoryFormat::Contiguous)
                                : at::Tensor();
    at::Tensor loss = at::empty({}, logits.options());
    int64_t verdicts[2] = {-1, 0};  // first bad row (-1: none), probe
    reinterpret_cast<CrossEntropyEntry>(entry)(
        address(logits), logits.size(0), logits.size(1), address(target), ignore_index, eps,
        z_loss, mean, probe_tol, want_grad, want_grad ? address(grad) : address(logits),
        address(loss), reinterpret_cast<int64_t>(verdicts), threads);
    // (nothing was written: the caller names the offending target, as the Python lane does)
    TORCH_CHECK_INDEX(verdicts[0] < 0, "crossent: target out of bounds at row ", verdicts[0]);
    probe_seen = verdicts[1] != 0;
    if (want_grad) {
      ctx->save_for_backward({grad});  // freed after backward
    }
    return loss;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    // create_graph: the gradient was made in forward as a constant, so a second derivative
    // would be silently wrong (_core.autograd.refuse_double_backward, the same message)
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "crossent.cross_entropy does not support double backward (create_graph=True, "
                "e.g. torch.autograd.grad(..., create_graph=True) for MAML or a gradient "
                "penalty): its gradient is computed in forward by a fused kernel and is not "
                "differentiable. Use torch.nn.functional.cross_entropy for higher-order "
                "gradients.");
    at::Tensor grad = ctx->get_saved_variables()[0];
    const at::Tensor& upstream = grads[0];  // a CPU scalar of grad's dtype
    if (upstream.item<double>() != 1.0) {
      grad = grad * upstream;
    } else if (torch::autograd::get_current_graph_task_keep_graph()) {
      grad = grad.clone();  // retain_graph: the next backward reads the saved one
    }
    return {grad,         at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// nll_loss's launches. Forward: input, rows, classes, element strides, target, ignore_index,
// mean, the loss's address, the verdicts' (first bad position or -1, kept rows). Backward:
// target, ignore_index, upstream, kept rows, mean, the gradient's address, rows, classes,
// threads.
using NllForward = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool,
                            int64_t, int64_t);
using NllBackward = void (*)(int64_t, int64_t, double, double, bool, int64_t, int64_t, int64_t,
                             int64_t);

// The reduced, unweighted nll_loss of (N, C) log-probabilities at any strides and (N,) int64
// targets, as ``backends.numba_nll.NLLLossLane``.
struct NllNode : public torch::autograd::Function<NllNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& target, int64_t forward_entry,
                            int64_t backward_entry, int64_t ignore_index, bool mean,
                            int64_t threads) {
    at::Tensor loss = at::empty({}, input.options());
    double verdicts[2] = {-1.0, 0.0};
    reinterpret_cast<NllForward>(forward_entry)(
        address(input), input.size(0), input.size(1), input.stride(0), input.stride(1),
        address(target), ignore_index, mean, address(loss),
        reinterpret_cast<int64_t>(verdicts));
    // (nothing was written: the caller names the offending target, as the Python lane does)
    TORCH_CHECK_INDEX(verdicts[0] < 0, "crossent: target out of bounds at position ",
                      static_cast<int64_t>(verdicts[0]));
    ctx->save_for_backward({target, input});  // (input: the create_graph link, as torch's)
    ctx->saved_data["entry"] = backward_entry;
    ctx->saved_data["kept"] = verdicts[1];
    ctx->saved_data["ignore"] = ignore_index;
    ctx->saved_data["mean"] = mean;
    ctx->saved_data["threads"] = threads;
    return loss;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    tensor_list saved = ctx->get_saved_variables();
    const at::Tensor& target = saved[0];
    const at::Tensor& input = saved[1];
    const at::Tensor& g = grads[0];
    int64_t ignore_index = ctx->saved_data["ignore"].toInt();
    double kept = ctx->saved_data["kept"].toDouble();
    bool mean = ctx->saved_data["mean"].toBool();
    int64_t n = input.size(0), n_cls = input.size(1);
    bool graph = at::GradMode::is_enabled();
    at::Tensor grad;
    if (graph && g.requires_grad()) {
      // a double-backward product through an upstream that requires grad: the gradient in
      // differentiable ops of g (nll_loss is linear in its input: the same at every input)
      // (ignored rows: 0, never 0 * scale, which is NaN for an infinite upstream or no kept row)
      at::Tensor keep = target != ignore_index;
      at::Tensor index = target.masked_fill(keep.logical_not(), 0).unsqueeze(1);
      at::Tensor scale = mean ? g / kept : g;
      at::Tensor values = at::where(keep, -scale, at::zeros({}, scale.options()));
      grad = at::zeros({n, n_cls}, input.options())
                 .scatter(1, index, values.to(input.scalar_type()).unsqueeze(1));
    } else {
      grad = at::empty({n, n_cls}, input.options());
      if (n * n_cls > 0) {
        reinterpret_cast<NllBackward>(ctx->saved_data["entry"].toInt())(
            address(target), ignore_index, g.item<double>(), kept, mean, address(grad), n,
            n_cls, ctx->saved_data["threads"].toInt());
      }
    }
    if (graph && input.requires_grad()) {
      // create_graph: the gradient also as a function of the input, whose derivative there is
      // 0 (a second derivative gives zeros, as torch's, not "does not require grad"); where,
      // not + 0 * input: log-probabilities of -inf would make NaN
      grad = at::where(at::zeros({}, at::kBool), input, grad);
    }
    return {grad,         at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---- the lanes: the common calls' checks, here rather than in Python (each tensor attribute
// read from Python costs a (64, 10) call ~0.2 us; the checks were a third of its time) -------

struct Config {
  int64_t softmax[3][2] = {};  // C entries (forward, backward) by slot (float32, bf16, fp16)
  int64_t nll[3][2] = {};
  int64_t ce[3][2] = {};         // cross-entropy launches by slot: row kernel, few-class rows
  double probe_tol[3] = {};      // the misuse probe's tolerance by slot
  int64_t few_classes = 0;       // rows of up to this many classes run side by side
  int64_t one_thread = 0, max_elements = 0;  // see backends.native's ONE_THREAD, MAX_ELEMENTS
  c10::DispatchKeySet plain, inference;  // the keys of a plain CPU tensor, outside and inside
                                         // inference mode
  bool team = false;  // torch's OpenMP team can run a launch (false in a forked child)
  bool ready = false;
};
Config config;

int slot(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: return -1;
  }
}

// A dense CPU tensor with no wrapper, view bit or subclass dispatch: functorch wrappers, negative
// or conjugate views, sparse and Python-dispatch tensors have other keys.
bool plain(const at::Tensor& t) {
  c10::DispatchKeySet keys = t.key_set();
  return keys == config.plain || keys == config.inference;
}

// Threads for a launch of numel elements in units blocks: one below one_thread, else torch's
// count; 0 where the team cannot run (the Python node then splits the work).
int64_t threads_for(int64_t numel, int64_t units) {
  if (numel < config.one_thread) return 1;
  if (!config.team) return 0;
  return std::min<int64_t>(at::get_num_threads(), units);
}

void configure(const std::vector<int64_t>& softmax_entries,
               const std::vector<int64_t>& nll_entries, const std::vector<int64_t>& ce_entries,
               const std::vector<double>& probe_tol, int64_t few_classes, int64_t one_thread,
               int64_t max_elements, bool team) {
  TORCH_CHECK(softmax_entries.size() == 6 && nll_entries.size() == 6 && ce_entries.size() == 6 &&
                  probe_tol.size() == 3,
              "crossent native: six entries each and three tolerances expected");
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 2; ++j) {
      config.softmax[i][j] = softmax_entries[2 * i + j];
      config.nll[i][j] = nll_entries[2 * i + j];
      config.ce[i][j] = ce_entries[2 * i + j];
    }
    config.probe_tol[i] = probe_tol[i];
  }
  config.few_classes = few_classes;
  config.one_thread = one_thread;
  config.max_elements = max_elements;
  config.plain = at::empty({0}).key_set();
  {
    c10::InferenceMode guard;
    config.inference = at::empty({0}).key_set();
  }
  config.team = team;
  config.ready = true;
}

void set_team(bool team) { config.team = team; }

// log_softmax (log) or softmax of a contiguous CPU input along dim, or None where the lane does
// not take the call (the caller's general path then checks and dispatches it).
std::optional<at::Tensor> softmax_lane(const at::Tensor& x, int64_t dim, bool log) {
  int s = slot(x.scalar_type());
  int64_t ndim = x.dim();
  if (dim < 0) dim += ndim;
  if (!config.ready || s < 0 || dim < 0 || dim >= ndim || !plain(x) || !x.is_contiguous()) {
    return std::nullopt;
  }
  int64_t numel = x.numel();
  if (numel >= config.max_elements) return std::nullopt;
  int64_t threads = threads_for(numel, numel);  // (the kernels split units themselves)
  if (threads == 0) return std::nullopt;
  at::IntArrayRef sizes = x.sizes();
  int64_t n_out = 1, n_in = 1;
  for (int64_t d = 0; d < dim; ++d) n_out *= sizes[d];
  for (int64_t d = dim + 1; d < ndim; ++d) n_in *= sizes[d];
  return SoftmaxNode::apply(x, config.softmax[s][0], config.softmax[s][1], n_out, sizes[dim],
                            n_in, log, threads);
}

// The reduced (mean, or sum), unweighted nll_loss of (N, C) input at any strides and (N,)
// contiguous int64 targets, or None where the lane does not take the call. An out-of-range
// target raises IndexError (nothing written; the caller names the offender).
std::optional<at::Tensor> nll_lane(const at::Tensor& input, const at::Tensor& target,
                                   int64_t ignore_index, bool mean) {
  int s = slot(input.scalar_type());
  if (!config.ready || s < 0 || input.dim() != 2 || target.dim() != 1 ||
      target.size(0) != input.size(0) || target.scalar_type() != at::kLong || !plain(input) ||
      !plain(target) || !target.is_contiguous()) {
    return std::nullopt;
  }
  if (s > 0 && at::autocast::is_autocast_enabled(at::kCPU)) {
    return std::nullopt;  // autocast: nll_loss in float32 (the general path)
  }
  int64_t numel = input.numel();
  if (numel >= config.max_elements) return std::nullopt;
  int64_t threads = threads_for(numel, input.size(0));
  if (threads == 0) return std::nullopt;
  return NllNode::apply(input, target, config.nll[s][0], config.nll[s][1], ignore_index, mean,
                        threads);
}

// The reduced, unweighted, uncapped cross-entropy of contiguous (R, C) logits and (R,)
// contiguous int64 indices, with the misuse probe's verdict (probe: whether diagnostics are
// on), or None where the lane does not take the call. An out-of-range target raises IndexError
// (nothing written; the caller names the offender).
std::optional<std::tuple<at::Tensor, bool>> ce_lane(const at::Tensor& logits,
                                                    const at::Tensor& target,
                                                    int64_t ignore_index, double eps,
                                                    double z_loss, bool mean, bool probe) {
  int s = slot(logits.scalar_type());
  if (!config.ready || s < 0 || logits.dim() != 2 || target.dim() != 1 ||
      target.size(0) != logits.size(0) || target.scalar_type() != at::kLong ||
      !plain(logits) || !plain(target) || !logits.is_contiguous() || !target.is_contiguous()) {
    return std::nullopt;
  }
  if (s > 0 && at::autocast::is_autocast_enabled(at::kCPU)) {
    return std::nullopt;  // autocast: a float32 loss (the general path)
  }
  int64_t n_rows = logits.size(0), n_cls = logits.size(1), numel = logits.numel();
  if (numel == 0 || numel >= config.max_elements) return std::nullopt;
  int64_t threads = threads_for(numel, n_rows);
  if (threads == 0) return std::nullopt;
  int64_t entry = config.ce[s][n_cls <= config.few_classes ? 1 : 0];
  double probe_tol = probe && n_cls >= 2 ? config.probe_tol[s] : -1.0;  // (-1: no probe)
  // (needs_input_grad is not defined in forward when no input requires grad)
  bool want_grad = at::GradMode::is_enabled() && logits.requires_grad();
  at::Tensor loss = CrossEntropyNode::apply(logits, target, entry, ignore_index, eps, z_loss,
                                            mean, probe_tol, threads, want_grad);
  return std::make_tuple(loss, probe_seen);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("configure", &configure, "the kernels' C entries, the size limits, the team's state");
  m.def("set_team", &set_team, "whether torch's OpenMP team can run a launch");
  m.def("softmax_lane", &softmax_lane, "log_softmax / softmax of contiguous CPU input, or None");
  m.def("nll_lane", &nll_lane, "reduced, unweighted nll_loss of (N, C) input, or None");
  m.def("ce_lane", &ce_lane, "(reduced loss, probe verdict) of (R, C) logits, or None");
}
