"""PNG plots of a run's training curves, read from its ``metrics.jsonl``.

Four panels: the loss parts (train and held-out), the learning rate of each optimiser group, the
gradient norm before clipping, and the teacher's share of step time. Saddle interventions, skipped
steps and teacher switches are drawn as vertical lines on every panel, so a jump in the curves can
be read against what the trainer did at that step. A run with on-policy steps shows their divergence
(on the student's own text) as its own series, and the train loss parts of the other steps; given
``evaluate``'s generation metrics, a fifth panel compares the student's answers with the teacher's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Lines drawn for events: label and colour.
EVENT_STYLES = {
    "saddle_intervention": ("saddle intervention", "tab:red"),
    "nonfinite_skip": ("skipped step", "tab:purple"),
    "teacher_switch": ("teacher switch", "tab:orange"),
}
LOSS_KEYS = ("train/total", "train/kl", "train/ce", "eval/total", "eval/kl", "eval/ce")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file; a torn last line (a run killed mid-write) is skipped."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({exc}); expected one object per line") from exc
    return records


ONPOLICY_KEY = "onpolicy/divergence"  # train/divergence of the on-policy steps (a series of its own)


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of every record that has a numeric ``key``; the train loss parts of on-policy
    steps are left out (another loss on other text): they are :data:`ONPOLICY_KEY`'s."""
    onpolicy = key == ONPOLICY_KEY
    source = "train/divergence" if onpolicy else key
    loss_part = onpolicy or (key.startswith("train/") and key in (*LOSS_KEYS, "train/divergence"))
    points = [(r["step"], float(r[source])) for r in records
              if isinstance(r.get(source), (int, float)) and "step" in r
              and (not loss_part or bool(r.get("train/onpolicy")) == onpolicy)]
    return [s for s, _ in points], [v for _, v in points]


def _generation_panel(ax: Any, generation: dict[str, dict[str, Any]]) -> None:
    """Bars of the generation metrics of each model in ``generation`` (``{"student": {...}, ...}``)."""
    from student_trainer.evaluation.generation_quality import GENERATION_METRICS

    who = [name for name in ("student", "teacher") if name in generation]
    width = 0.8 / max(len(who), 1)
    for i, name in enumerate(who):
        values = [generation[name].get(metric) for metric in GENERATION_METRICS]
        xs = [j + i * width for j in range(len(GENERATION_METRICS))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=f"{name} answers")
        for x, v in zip(xs, values):
            ax.annotate("-" if v is None else f"{v:.3g}", (x, v or 0.0), ha="center", va="bottom", fontsize=8)
    ax.set_xticks([j + width * (len(who) - 1) / 2 for j in range(len(GENERATION_METRICS))], list(GENERATION_METRICS))
    ax.set_title("generation quality (evaluate): teacher NLL per token, distinct-n, repetition")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def plot_training_curves(metrics_path: str | Path, output_path: str | Path, title: str | None = None,
                         generation: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a PNG of the curves in ``metrics_path`` to ``output_path``; returns the path.

    ``generation``: ``evaluate``'s generation metrics per model (``report.json``'s ``generation``), drawn
    as a fifth panel.

    Raises ``ValueError`` when the file holds no training steps (nothing to plot).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in containers
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not series(records, "train/total")[0] and not series(records, "eval/total")[0]:
        raise ValueError(f"{metrics_path} has no train/total or eval/total values; is it a retnet-distill metrics.jsonl?")
    lr_keys = sorted({k for r in records for k in r if k.startswith("lr/")})
    rows = 3 if generation else 2
    figure, axes = plt.subplots(rows, 2, figsize=(12, 4 * rows), constrained_layout=True, squeeze=False)
    if generation:
        bottom = axes[2, 0].get_gridspec()
        axes[2, 0].remove()
        axes[2, 1].remove()
        _generation_panel(figure.add_subplot(bottom[2, :]), generation)
    panels = [
        (axes[0, 0], "loss", [k for k in (*LOSS_KEYS, ONPOLICY_KEY) if series(records, k)[0]], True),
        (axes[0, 1], "learning rate", lr_keys, False),
        (axes[1, 0], "grad norm (before clip)", ["train/grad_norm"], True),
        (axes[1, 1], "teacher share of step time", ["teacher/share"], False),
    ]
    for ax, name, keys, log_scale in panels:
        for key in keys:
            steps, values = series(records, key)
            style = "o-" if key.startswith("eval/") else "-"
            ax.plot(steps, values, style, label=key, markersize=3, linewidth=1.2)
        if log_scale and any(v > 0 for k in keys for v in series(records, k)[1]):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    seen: set[str] = set()
    for record in records:
        style = EVENT_STYLES.get(record.get("event", ""))
        if style is None:
            continue
        label, colour = style
        for ax, *_ in panels:
            ax.axvline(record["step"], color=colour, linestyle="--", alpha=0.6,
                       label=label if label not in seen and ax is axes[0, 0] else None)
        seen.add(label)
    for ax, *_ in panels:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    figure.suptitle(title or str(metrics_path))
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(output_path)  # a reader never sees half a PNG
    return output_path
