"""Report of a tuning study: best against defaults, top trials, plots.

``write_report(result, out_dir)`` writes into ``out_dir``:
``report.json`` and ``report.md`` (best vs defaults on the search and check
halves, the best post-processing, the top trials, parameter importances), PNG
plots (optimisation history and parameter importances from
``optuna.visualization.matplotlib``, and a grid of slice panels, one per
parameter, drawn here; all on the Agg backend) and ``report.html``: the same
tables as HTML tables and the plots inlined (PNG data URIs; the history and
importances as interactive plotly figures when plotly is installed), one
self-contained file. ``summary["warnings"]`` (when the search gave any) come
first in both. Numbers are rounded to what they mean: scores to 4 decimals,
parameters to 4 significant digits. A plot that cannot be drawn (e.g. too few
trials for importances) is skipped with a warning; the report never fails
because of a plot.
"""
from __future__ import annotations

import base64
import html
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState

from competition.fileio import atomic_path, atomic_write_json, atomic_write_text
from competition.metrics import file_keys
from tuning.objective import DEFAULTS_ATTR

log = logging.getLogger(__name__)

PLOTS = ("optimization_history", "param_importances", "slice")
PLOT_TITLES = {"optimization_history": "Optimisation history", "param_importances": "Parameter importances",
               "slice": "Study score against each parameter"}
SCORE_KEYS = ("best_value", "defaults_value", "gain_search", "gain_check")
SLICE_COLUMNS = 4


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
    """JSON content of the report for a ``SearchResult`` (full precision; see ``tidy``)."""
    s = result.summary()
    s["gain_search"] = result.best_value - result.defaults_value
    s["gain_check"] = result.check_best["map_at_k"] - result.check_defaults["map_at_k"]
    s["top_trials"] = top_trials(result.study, n_top, result.k)
    s["importances"] = importances(result.study)
    states = [t.state.name for t in result.study.get_trials(deepcopy=False)]
    s["trial_states"] = {name: states.count(name) for name in sorted(set(states))}
    return s


def _is_score(key: Any) -> bool:
    return isinstance(key, str) and (key.startswith(("mAP", "Recall@")) or key in SCORE_KEYS)


def tidy(obj: Any, key: Any = None) -> Any:
    """``obj`` with every float rounded for people: scores (mAP*, Recall@*, best/defaults
    values, gains) to 4 decimals, anything else to 4 significant digits."""
    if isinstance(obj, dict):
        return {k: tidy(v, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [tidy(v, key) for v in obj]
    if isinstance(obj, float) and math.isfinite(obj):
        return round(obj, 4) if _is_score(key) else float(f"{obj:.4g}")
    return obj


def _cell(v: Any, key: Any = None) -> str:
    """A table cell: scores as 0.1234, other floats with 4 significant digits, None as a dash."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if _is_score(key) else f"{tidy(v):g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell(x, key) for x in v)
    return str(v)


def _flat_post(post: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, value) pairs of a post-processing dict, its nested ``rerank`` dict inlined."""
    return [pair for k, v in post.items()
            for pair in (v.items() if isinstance(v, dict) else [(k, v)])]


def blocks(s: dict[str, Any]) -> list[tuple]:
    """The report as blocks both renderers share: ("h1"|"h2"|"p", text), ("warnings", [text]),
    ("table", header cells, rows of cells)."""
    m = f"mAP@{s['k']}"
    states = ", ".join(f"{n} {name.lower()}" for name, n in s["trial_states"].items())
    out: list[tuple] = [("h1", f"Tuning report: study {s['study_name']}")]
    if s.get("warnings"):
        out.append(("warnings", [str(w) for w in s["warnings"]]))
    folds = s.get("folds") or [s["search_classes"]]
    rate = s.get("study_rate", 1.0)
    sample = f", ranked on a class sample of {rate:.0%} of the split" if rate < 1.0 else ""
    out += [("p", (f"{s['n_complete']} completed trials ({states}). The study optimised the mean {m} over "
                   f"{len(folds)} class fold{'s' if len(folds) > 1 else ''} ({len(s['search_classes'])} classes"
                   f"{sample}); the check classes ({len(s['check_classes'])}) were never scored by the study, "
                   "so their gain is the one to trust.")),
            ("table", ["", f"study {m}", f"check classes {m}", "check classes Recall@1"],
             [["defaults", _cell(s["defaults_value"], m), _cell(s["check_defaults"][m], m),
               _cell(s["check_defaults"]["Recall@1"], m)],
              [f"best (trial {s['best_trial']})", _cell(s["best_value"], m), _cell(s["check_best"][m], m),
               _cell(s["check_best"]["Recall@1"], m)],
              ["gain", f"{s['gain_search']:+.4f}", f"{s['gain_check']:+.4f}", ""]])]
    out += _final_blocks(s.get("final"), m) + _space_blocks(s.get("space"))
    out += [("h2", "Chosen post-processing"),
            ("table", ["parameter", "value"], [[k, _cell(v)] for k, v in _flat_post(s["best_post"])])]
    if s["top_trials"]:
        names = list(dict.fromkeys(p for t in s["top_trials"] for p in t["params"]))
        rows = [[f"{t['number']}{' (defaults)' if t['defaults'] else ''}", _cell(t[m], m),
                 _cell(t["Recall@1"], m), *(_cell(t["params"].get(p)) for p in names)] for t in s["top_trials"]]
        out += [("h2", "Top trials (study value)"), ("table", ["trial", m, "Recall@1", *names], rows)]
    if s["importances"]:
        out += [("h2", "Parameter importances"),
                ("table", ["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in s["importances"].items()])]
    return out


def _final_blocks(final: dict[str, Any] | None, m: str) -> list[tuple]:
    """The final choice: its rule, the verdict, every candidate re-scored on the whole split."""
    if not final:
        return []
    rows = [[f"{c['trial']}{' (chosen)' if c['chosen'] else ''}", _cell(c["study_value"], m),
             ", ".join(f"{v:.4f}" for v in c["fold_maps"]), _cell(c["mean"], m), f"{c['spread']:.4f}",
             _cell(c["robust"], m), _cell(c["check"], m),
             "" if c["chosen"] else f"{c['difference']:+.4f} ± {c['standard_error']:.4f}",
             "yes" if c["indistinguishable"] else ""] for c in final["candidates"]]
    return [("h2", "Final choice"),
            ("p", f"The best {len(rows)} distinct trials, re-scored on the whole split; chosen by {final['rule']}. "
                  f"{final['verdict'][0].upper()}{final['verdict'][1:]}."),
            ("table", ["trial", f"study {m}", f"fold {m}", "mean", "spread", "rule", f"check {m}",
                       "chosen minus it (± s.e.)", "tied"], rows)]


def _space_blocks(space: dict[str, Any] | None) -> list[tuple]:
    """The size-bound ranges searched and the class sizes they follow."""
    if not space:
        return []
    names = [n for n in ("k1", "k2", "dba_n", "aqe_n", "diffusion_k") if n in space]
    return [("h2", "Search space"),
            ("p", f"Ranges sized by the held-out classes: {space['images_per_class']:g} images "
                  f"({space['references_per_class']:g} references) per class, the medians "
                  "(rule in tuning/space.py)."),
            ("table", ["parameter", "range"], [[n, f"{space[n][0]}-{space[n][1]}"] for n in names])]


def markdown(s: dict[str, Any]) -> str:
    """Markdown report of a ``summary`` dict."""
    lines: list[str] = []
    for kind, *rest in blocks(s):
        if kind == "h1":
            lines += [f"# {rest[0]}", ""]
        elif kind == "h2":
            lines += [f"## {rest[0]}", ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "warnings":
            lines += ["> **Warnings**", ">", *(f"> - {w}" for w in rest[0]), ""]
        elif kind == "table":
            header, rows = rest
            esc = [[c.replace("|", "\\|") for c in row] for row in [header, *rows]]
            lines += [f"| {' | '.join(r)} |" for r in esc[:1]] + ["|" + "---|" * len(header)]
            lines += [f"| {' | '.join(r)} |" for r in esc[1:]] + [""]
    return "\n".join(lines).rstrip() + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
.warnings{background:#fff4e5;border-left:5px solid #e8590c;padding:.6em 1em;margin:1em 0}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f1f3f5}td:first-child,th:first-child{text-align:left}img{max-width:100%}"""


def _html_block(kind: str, *rest) -> str:
    if kind in ("h1", "h2", "p"):
        return f"<{kind}>{html.escape(rest[0])}</{kind}>"
    if kind == "warnings":
        items = "".join(f"<li>{html.escape(w)}</li>" for w in rest[0])
        return f'<div class="warnings"><strong>Warnings</strong><ul>{items}</ul></div>'
    header, rows = rest
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def html_page(s: dict[str, Any], pngs: dict[str, Path], plotly_parts: dict[str, str] | None = None) -> str:
    """Self-contained HTML: the report's tables, then each plot as a plotly figure
    (``plotly_parts``: {plot name: HTML fragment}) or its PNG inlined as a base64 data URI."""
    body = [_html_block(*b) for b in blocks(s)]
    plotly_parts = plotly_parts or {}
    if pngs or plotly_parts:
        body.append("<h2>Plots</h2>")
    for name in PLOTS:
        title = html.escape(PLOT_TITLES[name])
        if name in plotly_parts:
            body.append(f"<h3>{title}</h3><div>{plotly_parts[name]}</div>")
        elif name in pngs:
            data = base64.b64encode(Path(pngs[name]).read_bytes()).decode("ascii")
            body.append(f'<h3>{title}</h3><img alt="{title}" src="data:image/png;base64,{data}">')
    title = html.escape(f"Tuning report: {s['study_name']}")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style>'
            "</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _log_axis(axis, ratio: float) -> None:
    """Log scale with a few plainly written ticks (0.01, 2, 30, not 10^-2) over a range of ``ratio``."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_xscale("log")
    subs = (1.0,) if ratio >= 100 else (1.0, 2.0, 5.0) if ratio >= 10 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    axis.set_major_locator(LogLocator(subs=subs, numticks=6))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_slices(study: optuna.Study, k: int = 1000, order: list[str] | None = None,
                n_cols: int = SLICE_COLUMNS):
    """Matplotlib figure: one small panel per parameter (``order`` first, then by name) in a grid
    of ``n_cols`` columns, the study value (mean mAP@k over folds) of each completed trial against the parameter's
    value, coloured by trial number, the best trial starred. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    present = {p for t in trials for p in t.params}
    if not present:
        raise ValueError("no completed trial with parameters")
    names = [p for p in (order or []) if p in present] + sorted(present - set(order or []))
    n_cols = min(n_cols, len(names))
    n_rows = math.ceil(len(names) / n_cols)
    width, height = 3.1 * n_cols + 1.0, 2.4 * n_rows + 0.6
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, height), sharey=True, squeeze=False)
    fig.subplots_adjust(left=0.7 / width, right=1 - 1.0 / width, bottom=0.35 / height, top=1 - 0.65 / height,
                        wspace=0.08, hspace=0.42)  # fixed margins: constrained layout is slow on 14 panels
    first, last = min(t.number for t in trials), max(t.number for t in trials)
    norm = Normalize(first, max(last, first + 1))
    best = max(trials, key=lambda t: t.value)
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, size=last + 1)
    for ax, name in zip(axes.flat, names):
        with_p = [t for t in trials if name in t.params]
        dist = with_p[0].distributions[name]
        if isinstance(dist, CategoricalDistribution):
            cats = list(dict.fromkeys([str(c) for c in dist.choices] + [str(t.params[name]) for t in with_p]))
            xs = {t.number: cats.index(str(t.params[name])) + jitter[t.number] for t in with_p}
            ax.set_xticks(range(len(cats)), cats)
            ax.set_xlim(-0.5, len(cats) - 0.5)
        else:
            xs = {t.number: t.params[name] for t in with_p}
            if getattr(dist, "log", False):
                _log_axis(ax.xaxis, dist.high / dist.low)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(4, integer=isinstance(dist, IntDistribution)))
        ax.scatter([xs[t.number] for t in with_p], [t.value for t in with_p], c=[t.number for t in with_p],
                   cmap="viridis", norm=norm, s=22, edgecolors="white", linewidths=0.4)
        if best.number in xs:
            ax.scatter([xs[best.number]], [best.value], marker="*", s=160, facecolors="none", edgecolors="red",
                       linewidths=1.2)
        ax.set_title(f"{name}  ({len(with_p)} trials)", fontsize=10)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(f"mAP@{k}", fontsize=9)
    axes[0, 0].margins(y=0.12)  # shared: room for the star above the best point
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), label="trial",
                       cax=fig.add_axes((1 - 0.75 / width, 0.2, 0.15 / width, 0.6)))
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.suptitle(f"Study mAP@{k} (mean over folds) against each parameter (red star: best trial {best.number})",
                 fontsize=11)
    return fig


def save_pngs(study: optuna.Study, out_dir: Path, k: int = 1000, order: list[str] | None = None) -> dict[str, Path]:
    """Draw the plots with matplotlib (Agg) into ``out_dir``; return {plot name: path}.
    ``order``: parameters whose slice panels come first (e.g. by importance)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    def first_axes(ax):
        return ax.flat[0] if hasattr(ax, "flat") else ax

    funcs = {"optimization_history": lambda: first_axes(ovm.plot_optimization_history(study)).get_figure(),
             "param_importances": lambda: first_axes(ovm.plot_param_importances(study)).get_figure(),
             "slice": lambda: plot_slices(study, k, order)}
    paths: dict[str, Path] = {}
    with plt.style.context("ggplot"):  # optuna's plots set ggplot globally; keep the change inside
        for name in PLOTS:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fig = funcs[name]()
                if name == "optimization_history":
                    fig.axes[0].set_ylabel(f"study mAP@{k} (mean over folds)")
                if name != "slice":
                    fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
                path = out_dir / f"{name}.png"
                with atomic_path(path) as tmp:
                    fig.savefig(tmp, format="png", dpi=90 if name != "slice" else 100, bbox_inches="tight")
                paths[name] = path
            except Exception as exc:  # noqa: BLE001
                log.warning("plot %s skipped: %s", name, exc)
            finally:
                plt.close("all")
    return paths


def _plotly_html(study: optuna.Study) -> dict[str, str]:
    """{plot name: HTML fragment} of the plotly history and importances (plotly.js inlined once);
    {} without plotly. The slice stays a PNG: plotly's draws every parameter in one row."""
    try:
        import plotly  # noqa: F401
        from optuna import visualization as ov
    except ImportError:
        return {}
    funcs = {"optimization_history": ov.plot_optimization_history, "param_importances": ov.plot_param_importances}
    parts: dict[str, str] = {}
    for name, f in funcs.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = f(study)
            parts[name] = fig.to_html(full_html=False, include_plotlyjs=not parts)
        except Exception as exc:  # noqa: BLE001
            log.warning("plotly plot %s skipped: %s", name, exc)
    return parts


def write_report(result, out_dir: str | os.PathLike, n_top: int = 10, plots: bool = True) -> dict[str, Path]:
    """Write report.json, report.md, the PNG plots and report.html into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = summary(result, n_top)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    atomic_write_json(paths["json"], tidy(s))
    atomic_write_text(paths["markdown"], markdown(s))
    pngs = save_pngs(result.study, out, result.k, list(s["importances"])) if plots else {}
    atomic_write_text(paths["html"], html_page(s, pngs, _plotly_html(result.study) if plots else {}))
    paths.update({f"png_{k}": v for k, v in pngs.items()})
    return paths
