"""Figures for report.html: each function returns PNG bytes.

matplotlib is an optional extra (`pip install peftlab[report]`); it is imported inside
`_new_figure` so that importing peftlab, and `peftlab --help`, never pay for it.
"""

from __future__ import annotations

import io

import numpy as np


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(width: float = 5.0, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory only
    from matplotlib.figure import Figure

    # A bare Figure (not pyplot) keeps no global state, so many runs in one process do not leak.
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def training_curves(train_log: list[dict], val_log: list[dict]) -> bytes:
    """Training loss (and validation loss, when recorded) against step, beside the learning rate."""
    fig = _new_figure(9.0, 3.4)
    loss_ax, lr_ax = fig.subplots(1, 2)
    loss_ax.plot([e["step"] for e in train_log], [e["loss"] for e in train_log], label="training loss")
    if val_log:
        loss_ax.plot([e["step"] for e in val_log], [e["val_loss"] for e in val_log], "o-", label="validation loss")
    loss_ax.set(xlabel="step", ylabel="loss", title="Loss")
    loss_ax.legend()
    lr_ax.plot([e["step"] for e in train_log], [e["lr"] for e in train_log], color="tab:green")
    lr_ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return _png(fig)


def confusion_matrices(matrices: dict[str, list[list[int]]], label_names: list[str]) -> bytes:
    """One heat map per entry of `matrices` (title -> rows true, columns predicted), side by side."""
    fig = _new_figure(4.2 * len(matrices), 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(matrices)))
    for ax, (title, matrix) in zip(axes, matrices.items()):
        m = np.asarray(matrix)
        ax.imshow(m, cmap="Blues", vmin=0)
        ticks = range(len(label_names))
        ax.set_xticks(ticks, label_names, rotation=45, ha="right")
        ax.set_yticks(ticks, label_names)
        ax.set(xlabel="predicted", ylabel="true", title=title)
        for (i, j), v in np.ndenumerate(m):
            # Dark text on light cells, light text on dark ones.
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    return _png(fig)


def per_class_f1(per_class: dict[str, dict[str, dict]]) -> bytes:
    """Grouped bars: F1 per class for each model in `per_class` (title -> metrics' per_class)."""
    fig = _new_figure(max(5.0, 1.2 * len(next(iter(per_class.values())))), 3.4)
    ax = fig.subplots()
    names = list(next(iter(per_class.values())))
    width = 0.8 / len(per_class)
    for k, (title, stats) in enumerate(per_class.items()):
        ax.bar(np.arange(len(names)) + k * width, [stats[n]["f1"] for n in names], width, label=title)
    ax.set_xticks(np.arange(len(names)) + width * (len(per_class) - 1) / 2, names)
    ax.set(ylim=(0, 1.05), ylabel="F1", title="F1 per class")
    ax.legend()
    return _png(fig)


def binary_curves(curves: dict[str, dict]) -> bytes:
    """Precision-recall and ROC curves (title -> report.html.binary_curves output), side by side."""
    fig = _new_figure(9.0, 3.8)
    pr_ax, roc_ax = fig.subplots(1, 2)
    for title, c in curves.items():
        pr_ax.plot(c["recall"], c["precision"], label=f"{title} (AP {c['average_precision']:.3f})")
        roc_ax.plot(c["fpr"], c["tpr"], label=f"{title} (AUC {c['roc_auc']:.3f})")
    roc_ax.plot([0, 1], [0, 1], ":", color="grey")
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.05))
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.05))
    pr_ax.legend(loc="lower left")
    roc_ax.legend(loc="lower right")
    return _png(fig)
