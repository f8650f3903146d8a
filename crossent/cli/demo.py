"""`crossent demo`: the seeds' classifier trained with and without the softmax mistake.

The seeds' DNN (784 -> 256 -> 128 -> 10 on Fashion-MNIST) adapted to scikit-learn's digits
(64 -> 256 -> 128 -> 10, shipped with the package, no download). The "good" model ends in plain
logits; the "bad" one ends in ``F.softmax``, so cross-entropy sees probabilities: its loss can
never go below ``log(e + C - 1) - 1`` (1.46 for C = 10) and its gradients shrink. Both use
``crossent.CrossEntropyLoss``; the bad one triggers ``ProbabilitiesAsLogitsWarning``.
CPU only, seeded and deterministic, well under a minute.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import crossent
from .._core.diagnostics import ProbabilitiesAsLogitsWarning, diagnostics_enabled


class DNN(nn.Module):
    """The seeds' three-layer classifier; ``softmax_output=True`` is their "bad example"."""

    def __init__(self, n_in: int, n_classes: int, softmax_output: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, n_classes)
        self.softmax_output = softmax_output

    def forward(self, x: Tensor) -> Tensor:  # (B, 64) -> (B, 10)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return F.softmax(x, dim=1) if self.softmax_output else x


@dataclass
class Run:
    """Per-epoch history of one training run."""

    name: str
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    model: DNN | None = None


def load_digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits scaled to [0, 1]: a seeded 80/20 split, ``(B, 64)`` and ``(B,)``."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(data.target, dtype=torch.long)  # (1797,)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    train, test = order[:n_train], order[n_train:]
    return x[train], y[train], x[test], y[test]


def train(
    run: Run, data: tuple[Tensor, Tensor, Tensor, Tensor], *, softmax_output: bool, epochs: int,
    seed: int, lr: float = 1e-3, batch_size: int = 64, on_step=lambda: None,
) -> Run:
    """Adam on crossent.CrossEntropyLoss; records loss/accuracy per epoch and any warning."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)  # same initial weights for both runs
    model = DNN(x_train.shape[1], 10, softmax_output)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = crossent.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ProbabilitiesAsLogitsWarning)
        for _ in range(epochs):
            model.train()
            total, count = 0.0, 0
            for idx in torch.randperm(len(y_train), generator=shuffle).split(batch_size):
                optimizer.zero_grad()
                loss = loss_fn(model(x_train[idx]), y_train[idx])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                count += len(idx)
                on_step()
            model.eval()
            with torch.no_grad():
                out = model(x_test)
                run.test_loss.append(loss_fn(out, y_test).item())
                run.test_acc.append((out.argmax(1) == y_test).float().mean().item())
            run.train_loss.append(total / count)
    run.warnings = [f"{w.category.__name__}: {w.message}" for w in caught
                    if issubclass(w.category, ProbabilitiesAsLogitsWarning)]
    run.model = model
    return run


def identities(model: DNN, x: Tensor, y: Tensor) -> dict[str, float]:
    """The seeds' identities on the trained model's logits, as max absolute differences."""
    with torch.no_grad():
        z = model(x)  # (B, 10) logits
        ce = crossent.cross_entropy(z, y)
        nll = crossent.nll_loss(crossent.log_softmax(z, dim=1), y)
        log_of_softmax = torch.log(crossent.softmax(z, dim=1))
        return {
            "cross_entropy(z, y)": ce.item(),
            "nll_loss(log_softmax(z, 1), y)": nll.item(),
            "|nll(log_softmax) - cross_entropy|": (nll - ce).abs().item(),
            "max |log(softmax(z)) - log_softmax(z)|":
                (log_of_softmax - crossent.log_softmax(z, dim=1)).abs().max().item(),
        }


def softmax_loss_floor(n_classes: int) -> float:
    """Smallest cross-entropy of a softmax output: p_y = 1, others 0 -> log(e + C - 1) - 1."""
    return math.log(math.e + n_classes - 1) - 1


def plot(runs: list[Run], out: Path) -> None:
    """Two panels: training loss and test accuracy per epoch, good vs bad (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        epochs = range(1, len(run.train_loss) + 1)
        ax_loss.plot(epochs, run.train_loss, marker="o", label=run.name)
        ax_acc.plot(epochs, run.test_acc, marker="o", label=run.name)
    ax_loss.axhline(softmax_loss_floor(10), color="gray", linestyle="--", linewidth=1,
                    label="floor of softmax -> CE")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="cross-entropy loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="accuracy (digits, held-out 20%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(epochs: int = 10, out: str = "crossent-demo.png", seed: int = 0, plain: bool = False) -> int:
    """Run both trainings, print the table, the warning and the identities, write the PNG."""
    from .console import Console

    console = Console(plain=plain)
    try:
        data = load_digits(seed)
    except ImportError:
        console.line("crossent demo needs scikit-learn for its dataset: pip install 'crossent[cli]'")
        return 2
    n_steps = epochs * math.ceil(len(data[1]) / 64)
    console.heading("crossent demo: the seeds' DNN on scikit-learn digits (64 -> 256 -> 128 -> 10)")
    console.line(f"{len(data[1])} training and {len(data[3])} test images, {epochs} epochs, Adam, "
                 f"crossent.CrossEntropyLoss, seed {seed}")
    runs = []
    # The model is tiny (64 x 256 matmuls): thread hand-offs cost more than they save, and one
    # thread gives the same numbers on every machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, softmax_output in (("good: plain logits", False), ("bad: softmax in forward", True)):
            with console.progress(name, n_steps) as step:
                runs.append(train(Run(name), data, softmax_output=softmax_output, epochs=epochs,
                                  seed=seed, on_step=step))
    finally:
        torch.set_num_threads(threads)
    good, bad = runs
    rows = [(e + 1, f"{good.train_loss[e]:.4f}", f"{good.test_loss[e]:.4f}", f"{good.test_acc[e]:.1%}",
             f"{bad.train_loss[e]:.4f}", f"{bad.test_loss[e]:.4f}", f"{bad.test_acc[e]:.1%}")
            for e in range(epochs)]
    console.table("loss and accuracy per epoch",
                  ["epoch", "good train loss", "good test loss", "good test acc",
                   "bad train loss", "bad test loss", "bad test acc"], rows)
    floor = softmax_loss_floor(10)
    console.line(f"With softmax before the loss, cross-entropy cannot go below log(e + C - 1) - 1 = "
                 f"{floor:.4f} for C = 10, and its gradients shrink: the bad model ends at loss "
                 f"{bad.train_loss[-1]:.4f}, the good one at {good.train_loss[-1]:.4f}.")

    console.heading("the warning crossent raised for the bad example")
    none = ("(none: diagnostics are switched off)" if not diagnostics_enabled()
            else "(none: this call site already warned earlier in this process)")
    for message in bad.warnings or [none]:
        console.line(message, style="yellow")
    if good.warnings:
        console.line(f"unexpected warnings for the good example: {good.warnings}", style="red")

    console.heading("identities on the trained (good) model's logits")
    ids = identities(good.model, data[2], data[3])
    console.table("seed 002: CrossEntropyLoss = LogSoftmax + NLLLoss", ["quantity", "value"],
                  [(k, f"{v:.8g}") for k, v in ids.items()])
    holds = ids["|nll(log_softmax) - cross_entropy|"] <= 1e-6 and \
        ids["max |log(softmax(z)) - log_softmax(z)|"] <= 1e-5
    console.line("nll_loss(log_softmax(z, 1), y) == cross_entropy(z, y) and log(softmax(z)) == "
                 f"log_softmax(z): {'yes' if holds else 'NO'} (float32, up to rounding)")

    console.heading("loss curves")
    try:
        plot(runs, Path(out))
        console.line(f"wrote {out}")
    except ImportError:
        console.line(f"matplotlib is not installed, so {out} was not written: pip install 'crossent[cli]'")
    return 0 if holds and not good.warnings else 1
