"""Plots (matplotlib, Agg) and the one-file HTML report of ``training.evaluate``.

Every function takes the metrics dict that ``training.evaluate.compute_metrics`` returns
(or a part of it) and draws; nothing here computes a metric.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from triage.errors import TriageError  # noqa: E402
from triage.ingest import read_radiograph  # noqa: E402
from triage.preprocess import PreprocessSpec, resize_unit, unit_image  # noqa: E402

DPI = 110


def json_ready(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None and numpy scalars by Python ones (strict JSON)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, metrics: dict[str, Any], path: Path) -> Path:
    """ROC curve with the AUROC and its CI, and the two operating points marked."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ci = metrics["auroc"]["ci95"]
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {metrics['auroc']['value']:.4f} (95% CI {ci['low']:.4f}-{ci['high']:.4f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    for key, label, style in (("operating_threshold", "bundle threshold", dict(marker="o", ms=12, mfc="none", mew=2)),
                              ("flag_rate_5pct", "top 5% flagged", dict(marker="s", ms=6)),
                              ("risk_0.5", "risk >= 0.5", dict(marker="^", ms=8))):
        point = metrics[key]
        ax.plot(1 - point["specificity"], point["sensitivity"], ls="none", label=label, **style)
    ax.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01),
           title=f"ROC, n={metrics['n']} ({metrics['n_positive']} positive)")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(calibration: dict[str, Any], path: Path) -> Path:
    """Reliability diagram: observed rate against mean calibrated risk per bin, counts below (log scale)."""
    bins = calibration["reliability"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins[0]["high"] - bins[0]["low"]
    filled = [b for b in bins if b["count"]]
    top.bar([b["low"] for b in filled], [b["observed"] for b in filled], width=width, align="edge", alpha=0.6,
            edgecolor="k", label="observed rate of positives")
    top.plot([b["mean_risk"] for b in filled], [b["observed"] for b in filled], "o-", c="C3", label="observed vs mean risk of the bin")
    top.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    top.set(ylabel="observed frequency", ylim=(0, 1), title=f"Reliability ({calibration['n_bins']} bins): ECE "
            f"{calibration['ece_calibrated']:.4f} (T = {calibration['temperature']:.3f}, b = {calibration.get('bias', 0.0):.3f})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar([b["low"] for b in bins], [max(b["count"], 0.8) for b in bins], width=width, align="edge", color="grey")
    bottom.set(yscale="log", xlabel="calibrated risk", ylabel="images", xlim=(0, 1))
    return _save(fig, path)


def plot_confusion(metrics: dict[str, Any], path: Path) -> Path:
    """2x2 confusion matrices at the bundle's operating threshold and at risk >= 0.5."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key, title in ((axes[0], "operating_threshold", "bundle threshold"), (axes[1], "risk_0.5", "risk >= 0.5")):
        point = metrics[key]
        matrix = np.array([[point["tn"], point["fp"]], [point["fn"], point["tp"]]])
        ax.imshow(matrix, cmap="Blues")
        for (r, c), count in np.ndenumerate(matrix):
            ax.text(c, r, str(count), ha="center", va="center", fontsize=14,
                    color="white" if count > matrix.max() / 2 else "black")
        ax.set(xticks=[0, 1], xticklabels=["not flagged", "flagged"], yticks=[0, 1], yticklabels=["negative", "positive"],
               xlabel="model", ylabel="label", title=f"{title} ({point['threshold']:.4g})")
    return _save(fig, path)


def thumbnail(path: str, spec: PreprocessSpec) -> np.ndarray | None:
    """The model's view of one image: (H, W) float32 in [0, 1] after triage's VOI and resize, None if unreadable."""
    try:
        return resize_unit(unit_image(read_radiograph(path), spec), spec)
    except (TriageError, OSError):
        return None


def plot_top_losses(losses: list[dict[str, Any]], spec: PreprocessSpec, path: Path, columns: int = 4) -> Path:
    """Grid of the highest-loss images with label, subtype, calibrated risk and BCE (no heatmaps: none exported)."""
    rows = max(1, math.ceil(len(losses) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, item in zip(axes.ravel(), losses):
        image = thumbnail(item["path"], spec)
        if image is not None:
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        label = "positive" if item["label"] else "negative"
        ax.set_title(f"{label} ({item['subtype']})\nrisk {item['risk']:.3f}, BCE {item['bce']:.2f}", fontsize=8,
                     color="C3" if item["label"] else "C0")
    fig.suptitle("Top losses (highest BCE of the calibrated risk)", fontsize=10)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    """Write ``fig`` as PNG and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell ("n/a" for NaN/None)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _ci(ci: dict[str, Any]) -> str:
    """"low-high" of a bootstrap CI dict."""
    return f"{_fmt(ci['low'])}&ndash;{_fmt(ci['high'])}"


def _img(path: Path, alt: str) -> str:
    """An <img> with the PNG embedded as a data URI, so index.html stands alone."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)} ' \
           f'(<a href="{path.name}">{path.name}</a>)</figcaption></figure>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table from already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(metrics: dict[str, Any], out_dir: Path) -> str:
    """The whole report as one HTML string (PNGs embedded)."""
    source, split, cal = metrics["source"], metrics["split"], metrics["calibration"]
    op, rate, half = metrics["operating_threshold"], metrics["flag_rate_5pct"], metrics["risk_0.5"]
    points = [[name, _fmt(p["threshold"] if "threshold" in p else p["lowest_flagged_risk"], 6), _fmt(p["flagged_fraction"]),
               _fmt(p["sensitivity"]), _fmt(p["specificity"]), _fmt(p["ppv"]), _fmt(p["npv"]),
               f"{p['tp']}/{p['fp']}/{p['fn']}/{p['tn']}"]
              for name, p in (("bundle operating threshold", op), ("top 5% flagged (this set)", rate), ("risk &ge; 0.5", half))]
    flag_keys = [k for k in metrics["subgroups"][0] if k.startswith("flagged_")] if metrics["subgroups"] else []
    subgroups = [[html.escape(r["subgroup"]), str(r["n"]), str(r["n_positive"]), _fmt(r["mean_risk"]),
                  _fmt(r["auroc_vs_other_class"])] + [_fmt(r[k]) for k in flag_keys] for r in metrics["subgroups"]]
    losses = [[html.escape(Path(r["path"]).name), "positive" if r["label"] else "negative", html.escape(r["subtype"]),
               _fmt(r["risk"]), _fmt(r["bce"], 3)] for r in metrics["top_losses"]]
    unscorable = "".join(f"<li>{html.escape(u['path'])}: {html.escape(u['reason'])}</li>" for u in metrics["unscorable"])
    finding = html.escape(metrics.get("finding", "pneumonia"))
    described = "; ".join(f"{html.escape(p['name'])}: {html.escape(p['description'])} ({p['n_images']} images)"
                          for p in split.get("sources", [])) or html.escape(split.get("description", ""))
    by_source = [[html.escape(name), str(r["n"]), _fmt(r["prevalence"], 3), f"{_fmt(r['auroc']['value'])} "
                  f"({_ci(r['auroc']['ci95'])})", _fmt(r["calibration"]["mean_risk"], 3),
                  _fmt(r["calibration"]["ece_calibrated"]), _fmt(r["operating_threshold"]["flagged_fraction"], 3),
                  _fmt(r["operating_threshold"]["sensitivity"], 3), _fmt(r["operating_threshold"]["ppv"], 3),
                  _fmt(r["flag_rate_5pct"]["ppv"], 3), _fmt(r["flag_rate_5pct"]["lowest_flagged_risk"], 4)]
                 for name, r in metrics.get("by_source", {}).items()]
    per_finding = [[html.escape(name), str(r["n"]), str(r["n_positive"]), f"{_fmt(r['auroc']['value'])} "
                    f"({_ci(r['auroc']['ci95'])})", _fmt(r["ece_calibrated"])]
                   for name, r in metrics.get("per_finding", {}).items()]
    heatmaps = ("The model exports heatmaps, but this report does not draw them yet." if source.get("has_heatmaps") else
                "No heatmaps: this model has no class-activation-map output yet, so the gallery shows the images only "
                "(no heatmaps are invented).")
    in_sample = ("The calibration and the operating threshold were fitted on these same validation images, so the "
                 "calibrated ECE and the operating point are in-sample; the cross-fitted ECE (calibration fitted on half "
                 "the patients, measured on the other half) is the honest figure."
                 if split["name"] == "validation" else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation: {html.escape(str(source.get('name')))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}}
th{{background:#eee}}figure{{display:inline-block;margin:0.5em}}img{{max-width:100%}}.note{{color:#555}}</style></head>
<body>
<h1>Evaluation of {html.escape(str(source.get('name')))} {html.escape(str(source.get('version', '')))}</h1>
<p>Source: {html.escape(source['kind'])} <code>{html.escape(source['path'])}</code>; data <code>{html.escape(metrics['data'])}</code>.<br>
Images: <b>{described}</b>. {split['n_images']} images of {split['n_patients']} patients
({metrics['n']} scored with a {finding} label, {metrics['n_positive']} positive, prevalence {_fmt(metrics['prevalence'], 3)}).</p>
<p class="note">A demonstration model; not a medical device. Prevalence here
({_fmt(metrics['prevalence'], 2)}) is likely far above a real worklist's, which inflates PPV and deflates NPV.</p>

<h2>Per source ({finding})</h2>
<p class="note">One table row per data source: a model that ranks one site well can still fail at another, and one
calibration can be right for one population and wrong for another. The threshold is the bundle's.</p>
{_table(['source', 'n', 'prevalence', 'AUROC (95% CI)', 'mean risk', 'ECE', 'flagged at threshold',
         'sensitivity at threshold', 'PPV at threshold', 'PPV top 5%', 'lowest risk in top 5%'], by_source)}

<h2>Per finding</h2>
{_table(['finding', 'n labelled', 'positive', 'AUROC (95% CI)', 'ECE'], per_finding)}

<h2>Discrimination</h2>
<p>AUROC <b>{_fmt(metrics['auroc']['value'])}</b> (95% CI {_ci(metrics['auroc']['ci95'])}; bootstrap
{metrics['bootstrap']['n_boot']} replicates, seed {metrics['bootstrap']['seed']}, resampling
{html.escape(metrics['auroc']['ci95']['resampled'])}).</p>
{_img(out_dir / 'roc.png', 'ROC curve')}

<h2>Operating points</h2>
{_table(['point', 'threshold (risk)', 'flagged', 'sensitivity', 'specificity', 'PPV', 'NPV', 'TP/FP/FN/TN'], points)}
<p>At the bundle threshold: sensitivity 95% CI {_ci(op['sensitivity_ci95'])}, specificity 95% CI {_ci(op['specificity_ci95'])}.
Top 5%: PPV 95% CI {_ci(rate['ppv_ci95'])}, sensitivity 95% CI {_ci(rate['sensitivity_ci95'])}.
With {_fmt(metrics['prevalence'], 2)} prevalence, flagging 5% can reach at most
{_fmt(min(1.0, 0.05 / max(metrics['prevalence'], 1e-9)), 3)} sensitivity.</p>
{_img(out_dir / 'confusion.png', 'Confusion matrices')}

<h2>Calibration</h2>
<p>ECE ({cal['n_bins']} equal-width bins) of the calibrated risks <b>{_fmt(cal['ece_calibrated'])}</b>
(uncalibrated sigmoid(logit): {_fmt(cal['ece_uncalibrated'])}; cross-fitted: {_fmt(cal['ece_cross_fitted'])}).
NLL {_fmt(cal['nll_calibrated'])} (uncalibrated {_fmt(cal['nll_uncalibrated'])}), Brier {_fmt(cal['brier_calibrated'])}.
Risk = sigmoid(logit / T + b) with T = {_fmt(cal['temperature'])}, b = {_fmt(cal.get('bias', 0.0))}, fitted on {html.escape(str(source.get('calibration_fitted_on')))}.</p>
<p class="note">{in_sample}</p>
{_img(out_dir / 'reliability.png', 'Reliability diagram')}

<h2>Subgroups (source, subtype, sex, age band, view)</h2>
<p class="note">For an all-positive subgroup (e.g. a pneumonia subtype) the flagged fraction is its sensitivity; for an
all-negative one it is the false-positive rate. AUROC compares the subgroup against every image of the other class.</p>
{_table(['subgroup', 'n', 'positive', 'mean risk', 'AUROC vs other class'] + [k.replace('flagged_', 'flagged at ') for k in flag_keys], subgroups)}

<h2>Top losses</h2>
<p class="note">{heatmaps}</p>
{_img(out_dir / 'top_losses.png', 'Top losses')}
{_table(['file', 'label', 'subtype or source', 'risk', 'BCE'], losses)}
{f'<h2>Unscorable files</h2><ul>{unscorable}</ul>' if unscorable else ''}
<p class="note">Figures: <a href="metrics.json">metrics.json</a>; every image's logit, risk and loss:
<a href="predictions.csv">predictions.csv</a>.</p>
</body></html>
"""


def write_report(out_dir: Path, metrics: dict[str, Any], spec: PreprocessSpec,
                 roc: tuple[np.ndarray, np.ndarray]) -> Path:
    """Write the PNGs, ``metrics.json`` and ``index.html`` into ``out_dir``; returns the HTML path.

    ``roc``: (fpr, tpr) from ``training.evaluate.roc_curve_points``; ``spec`` draws the thumbnails.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_roc(*roc, metrics, out_dir / "roc.png")
    plot_reliability(metrics["calibration"], out_dir / "reliability.png")
    plot_confusion(metrics, out_dir / "confusion.png")
    plot_top_losses(metrics["top_losses"], spec, out_dir / "top_losses.png")
    (out_dir / "metrics.json").write_text(json.dumps(json_ready(metrics), indent=2, allow_nan=False) + "\n")
    path = out_dir / "index.html"
    path.write_text(render_html(metrics, out_dir))
    return path
