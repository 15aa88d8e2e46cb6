"""The recipe's table: what each stage adds, on the held-out split and on the test set.

Rows: each member alone, the ensemble with equal weights, + PCA-whitening, + DBA/aQE,
+ k-reciprocal with default parameters, or + diffusion with default parameters instead, the
tuned post-processing, and (when the recipe refits) the refit checkpoint. Scores are mAP@k and
Recall@1 as ``tuning.objective.evaluate`` computes them; a row's ``heldout`` or ``test`` is None
where it cannot be scored honestly.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from competition.data import QUERY_DIR, REFERENCE_DIR, image_name, list_images, read_labels
from competition.metrics import file_keys
from ensemble.postprocess import PostProcessing
from tuning.heldout import HeldoutSet
from tuning.objective import SearchSpace, evaluate, max_whiten_dim, post_from_params, standard_params


def describe_test_set(bundle, data: Path, cache_dir: Path, device: str) -> HeldoutSet:
    """Member descriptors of the test queries and references, as a HeldoutSet scored like the held-out one."""
    labels = read_labels(data)
    ensemble = bundle.ensemble(device=device, cache_dir=cache_dir)
    query_paths, ref_paths = list_images(data / QUERY_DIR), list_images(data / REFERENCE_DIR)
    # the set names Ensemble.rank uses, so the local submission reuses these descriptors
    query, q_ok = ensemble.member_descriptors(query_paths, set_name="query")
    reference, r_ok = ensemble.member_descriptors(ref_paths, set_name="reference")
    q_labels = [labels["query"][image_name(p)] for p, ok in zip(query_paths, q_ok) if ok]
    r_labels = [labels["reference"][image_name(p)] for p, ok in zip(ref_paths, r_ok) if ok]
    return HeldoutSet(bundle.member_names, query, reference, bundle.train_descriptors(), q_labels, r_labels)


def stage_rows(heldout: HeldoutSet, tuned: PostProcessing) -> dict[str, PostProcessing]:
    """The table's rows: each member alone, then the ensemble with one more textbook stage each
    (``tuning.objective.standard_params``; the two re-rankers each on top of DBA/aQE), then tuned."""
    names, space = heldout.member_names, SearchSpace()
    n = len(names)
    rows = {f"{name} alone": PostProcessing(weights=[float(i == j) for j in range(n)])
            for i, name in enumerate(names)}
    rows["ensemble, equal weights"] = PostProcessing()
    for row, stage in (("+ PCA-whitening", "whiten"), ("+ DBA/aQE", "expand"),
                       ("+ k-reciprocal (defaults)", "kreciprocal"), ("+ diffusion (defaults)", "diffusion")):
        rows[row] = post_from_params(standard_params(names, space, max_whiten_dim(heldout), stage), names, space)
    rows["tuned"] = tuned
    return rows


def score_rows(rows: dict[str, PostProcessing], heldout: HeldoutSet, test: HeldoutSet | None,
               k: int) -> list[dict]:
    """Score every row on the held-out split and (when given) the test set:
    ``[{"row", "heldout": scores, "test": scores or None, "seconds"}]``, scores as ``evaluate`` gives them."""
    table = []
    for name, post in rows.items():
        t0 = time.time()
        table.append({"row": name, "heldout": evaluate(heldout, post, k=k),
                      "test": None if test is None else evaluate(test, post, k=k),
                      "seconds": round(time.time() - t0, 2)})
    return table


def table_for_file(table: list[dict], k: int) -> list[dict]:
    """The table's rows with their scores spelled as files spell them (``mAP@<k>``, ``Recall@1``)."""
    return [{**r, "heldout": r["heldout"] and file_keys(r["heldout"], k), "test": r["test"] and file_keys(r["test"], k)}
            for r in table]


def _cell(scores: dict | None, key: str) -> str:
    return "—" if scores is None else f"{scores[key]:.4f}"


def format_table(table: list[dict], k: int) -> str:
    """A markdown table of the rows ("—" where a row cannot be scored honestly)."""
    has_test = any(r["test"] is not None for r in table)
    head = f"| row | held-out mAP@{k} |" + (f" test mAP@{k} | test Recall@1 |" if has_test else "") + \
        " time (s, training included) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table:
        cells = [r["row"], _cell(r["heldout"], "map_at_k")]
        if has_test:
            cells += [_cell(r["test"], "map_at_k"), _cell(r["test"], "recall_at_1")]
        cells.append(f"{r['seconds'] + r.get('train_seconds', 0):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_table(table: list[dict], path: Path, k: int) -> None:
    """A horizontal bar chart of held-out and test mAP@k per row (rows without a score get no bar)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from competition.fileio import atomic_path
    names = [r["row"] for r in table][::-1]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    for part, offset in (("heldout", 0.2), ("test", -0.2)):
        values = [np.nan if r[part] is None else r[part]["map_at_k"] for r in table][::-1]
        if not np.isnan(values).all():
            ax.barh(y + offset, values, height=0.4, label="held-out" if part == "heldout" else "test")
    ax.set_yticks(y, names)
    ax.set_xlabel(f"mAP@{k}")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
