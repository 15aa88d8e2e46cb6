"""Report of a tuning study: best against defaults, top trials, plots.

``write_report(result, out_dir)`` writes into ``out_dir``:
``report.json`` and ``report.md`` (best vs defaults on the search and check
halves, the top trials), PNG plots (optimisation history, parameter importances,
slices; ``optuna.visualization.matplotlib`` on the Agg backend) and
``report.html``: interactive plotly figures when plotly is installed, otherwise a
self-contained page with the PNGs inlined as base64. A plot that cannot be drawn
(e.g. too few trials for importances) is skipped with a warning; the report never
fails because of a plot.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from competition.fileio import atomic_path, atomic_write_json, atomic_write_text
from competition.metrics import file_keys
from tuning.objective import DEFAULTS_ATTR

log = logging.getLogger(__name__)

PLOTS = ("optimization_history", "param_importances", "slice")


def top_trials(study: optuna.Study, n: int = 10, k: int = 1000) -> list[dict[str, Any]]:
    """The ``n`` best completed trials: number, mAP@k, Recall@1, params, defaults flag."""
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    return [{"number": t.number, **file_keys({"map_at_k": t.value, "recall_at_1": t.user_attrs.get("recall_at_1")}, k),
             "defaults": bool(t.user_attrs.get(DEFAULTS_ATTR)), "params": dict(t.params)} for t in done[:n]]


def importances(study: optuna.Study) -> dict[str, float]:
    """Parameter importances ({} when they cannot be computed, e.g. too few trials)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except Exception as exc:  # noqa: BLE001 - a report must not fail on a statistic
        log.warning("parameter importances not computed: %s", exc)
        return {}


def summary(result, n_top: int = 10) -> dict[str, Any]:
    """JSON content of the report for a ``SearchResult``."""
    s = result.summary()
    s["gain_search"] = result.best_value - result.defaults_value
    s["gain_check"] = result.check_best["map_at_k"] - result.check_defaults["map_at_k"]
    s["top_trials"] = top_trials(result.study, n_top, result.k)
    s["importances"] = importances(result.study)
    states = [t.state.name for t in result.study.get_trials(deepcopy=False)]
    s["trial_states"] = {name: states.count(name) for name in sorted(set(states))}
    return s


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(s: dict[str, Any]) -> str:
    """Markdown report of a ``summary`` dict."""
    m = f"mAP@{s['k']}"
    lines = [f"# Tuning report: study `{s['study_name']}`", "",
             f"{s['n_complete']} completed trials ({s['trial_states']}). Search half: "
             f"{len(s['search_classes'])} classes; check half: {len(s['check_classes'])} classes.", "",
             f"| | search half {m} | check half {m} | check half R@1 |", "|---|---|---|---|",
             f"| defaults | {s['defaults_value']:.4f} | {s['check_defaults'][m]:.4f} | "
             f"{s['check_defaults']['Recall@1']:.4f} |",
             f"| best (trial {s['best_trial']}) | {s['best_value']:.4f} | {s['check_best'][m]:.4f} | "
             f"{s['check_best']['Recall@1']:.4f} |",
             f"| gain | {s['gain_search']:+.4f} | {s['gain_check']:+.4f} | |", "",
             "## Best post-processing", "", "```json", json.dumps(s["best_post"], indent=1), "```", "",
             "## Top trials", "", f"| trial | {m} | R@1 | params |", "|---|---|---|---|"]
    for t in s["top_trials"]:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t["params"].items())
        tag = " (defaults)" if t["defaults"] else ""
        lines.append(f"| {t['number']}{tag} | {t[m]:.4f} | {_fmt(t['Recall@1'])} | {params} |")
    if s["importances"]:
        lines += ["", "## Parameter importances", "", "| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in s["importances"].items()]
    return "\n".join(lines) + "\n"


def save_pngs(study: optuna.Study, out_dir: Path) -> dict[str, Path]:
    """Draw the plots with matplotlib (Agg) into ``out_dir``; return {plot name: path}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    funcs = {"optimization_history": ovm.plot_optimization_history,
             "param_importances": ovm.plot_param_importances, "slice": ovm.plot_slice}
    paths: dict[str, Path] = {}
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = funcs[name](study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            path = out_dir / f"{name}.png"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
            plt.close(fig)
            paths[name] = path
        except Exception as exc:  # noqa: BLE001
            log.warning("plot %s skipped: %s", name, exc)
            plt.close("all")
    return paths


def _plotly_html(study: optuna.Study) -> list[str]:
    """Plotly figures as HTML fragments (plotly.js inlined once); [] without plotly."""
    try:
        import plotly  # noqa: F401
        from optuna import visualization as ov
    except ImportError:
        return []
    funcs = [ov.plot_optimization_history, ov.plot_param_importances, ov.plot_slice]
    parts: list[str] = []
    for f in funcs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = f(study)
            parts.append(fig.to_html(full_html=False, include_plotlyjs=not parts))
        except Exception as exc:  # noqa: BLE001
            log.warning("plotly plot %s skipped: %s", f.__name__, exc)
    return parts


def html_page(s: dict[str, Any], pngs: dict[str, Path], plotly_parts: list[str]) -> str:
    """Self-contained HTML: tables, then plotly figures or the PNGs inlined as base64."""
    md = html.escape(markdown(s))
    body = [f"<h1>Tuning report: {html.escape(s['study_name'])}</h1>", f"<pre>{md}</pre>"]
    if plotly_parts:
        body += [f"<div>{p}</div>" for p in plotly_parts]
    else:
        for name, path in pngs.items():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            body.append(f"<h2>{html.escape(name)}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Tuning report</title></head><body>"
            + "\n".join(body) + "</body></html>\n")


def write_report(result, out_dir: str | os.PathLike, n_top: int = 10, plots: bool = True) -> dict[str, Path]:
    """Write report.json, report.md, the PNG plots and report.html into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = summary(result, n_top)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    atomic_write_json(paths["json"], s)
    atomic_write_text(paths["markdown"], markdown(s))
    pngs = save_pngs(result.study, out) if plots else {}
    atomic_write_text(paths["html"], html_page(s, pngs, _plotly_html(result.study) if plots else []))
    paths.update({f"png_{k}": v for k, v in pngs.items()})
    return paths
