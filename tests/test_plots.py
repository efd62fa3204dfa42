"""report.html's figures: each plot function returns a PNG that decodes, at its figure size."""

import io

import pytest

from peftlab.report import plots
from peftlab.report.html import binary_curves, render_plots

pytest.importorskip("matplotlib")

LABELS = ["neg", "pos"]
PER_CLASS = {"neg": {"precision": 0.8, "recall": 0.9, "f1": 0.85}, "pos": {"precision": 0.9, "recall": 0.7, "f1": 0.79}}
TRAIN_LOG = [{"step": s, "loss": 1.0 / s, "lr": 1e-3 * s} for s in (1, 2, 3, 4)]
VAL_LOG = [{"step": 2, "val_loss": 0.6}, {"step": 4, "val_loss": 0.4}]
CURVES = {"fine-tuned": binary_curves([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0])}


def _fake_report() -> dict:
    """The fields render_plots reads, for a binary task with baseline and fine-tuned models."""
    metrics = {"confusion_matrix": [[3, 1], [0, 4]], "per_class": PER_CLASS}
    return {"label_names": LABELS, "baseline": metrics, "finetuned": metrics}


def _decoded_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels of a PNG, read back with matplotlib's own decoder."""
    import matplotlib.image

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
    return pixels.shape[1], pixels.shape[0]


@pytest.mark.parametrize(
    "draw,size",
    [
        (lambda: plots.training_curves(TRAIN_LOG, VAL_LOG), (900, 340)),
        (lambda: plots.training_curves(TRAIN_LOG, []), (900, 340)),
        (
            lambda: plots.confusion_matrices({"baseline": [[3, 1], [0, 4]], "fine-tuned": [[4, 0], [1, 3]]}, LABELS),
            (840, 380),
        ),
        (lambda: plots.per_class_f1({"baseline": PER_CLASS, "fine-tuned": PER_CLASS}), (500, 340)),
        (lambda: plots.binary_curves(CURVES), (900, 380)),
    ],
    ids=["training_curves", "training_curves_no_validation", "confusion_matrices", "per_class_f1", "binary_curves"],
)
def test_each_plot_is_a_png_that_decodes(draw, size):
    assert _decoded_size(draw()) == size


def test_render_plots_draws_all_four_for_a_binary_run():
    images = render_plots(_fake_report(), {"curves": CURVES}, TRAIN_LOG, VAL_LOG)
    assert sorted(images) == ["confusion_matrices", "per_class_f1", "pr_roc_curves", "training_curves"]
    assert all(_decoded_size(png) for png in images.values())
