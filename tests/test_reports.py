"""What a user sees: the tuning report (HTML tables, inlined plots, warnings, rounded numbers),
a readable slice grid, the retrieval picture, a run's loss.png, and file modes that honour the umask."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import stat

import numpy as np
import optuna
import pytest
from PIL import Image, ImageDraw

from backbones import checkpoint as ckpt
from competition.fileio import atomic_path, atomic_write_text
from competition.picture import GREEN, RED, retrieval_picture
from tuning import report

optuna.logging.set_verbosity(optuna.logging.WARNING)
NOISY = 0.15000000000000002          # a weight on a 0.05 grid, as the sampler hands it out
LONG_DECIMALS = re.compile(r"\.0*[1-9]\d{5,}")  # float noise: 6+ significant digits
WARNING = "only 3 check classes: the check-half gain is noise"


def _summary(warnings: list[str] | None = None) -> dict:
    """A report summary as ``tuning.report.summary`` returns it, with the floats a study really gives."""
    s = {"best_value": 0.7715785371954843, "best_trial": 8, "defaults_value": 0.6635174023655849,
         "check_best": {"mAP@1000": 0.5427073087989726, "Recall@1": 0.6111111111111112},
         "check_defaults": {"mAP@1000": 0.6019870963012055, "Recall@1": 0.9444444444444444},
         "search_classes": ["c02", "c04"], "check_classes": ["c00", "c01", "c03"], "n_complete": 2, "k": 1000,
         "best_post": {"weights": [NOISY, 0.6000000000000001], "whiten": False, "whiten_dim": None,
                       "rerank": {"dba_n": 7, "dba_alpha": 0.6589893120219609, "lambda_value": 0.054225928573292365}},
         "study_name": "postprocessing", "gain_search": 0.10806111163, "gain_check": -0.0592797875,
         "top_trials": [{"number": 8, "mAP@1000": 0.7715785371954843, "Recall@1": 0.7777777777777778,
                         "defaults": False, "params": {"weight_a": NOISY, "dba_alpha": 0.6589893120219609}},
                        {"number": 0, "mAP@1000": 0.6635174023655849, "Recall@1": 0.8333333333333334,
                         "defaults": True, "params": {"weight_a": 1.0, "k1": 20}}],
         "importances": {"weight_a": 0.77512345, "dba_alpha": 0.22487655},
         "trial_states": {"COMPLETE": 2, "FAIL": 1}}
    if warnings is not None:
        s["warnings"] = warnings
    return s


def _png(path, colour=(200, 200, 200), size=(40, 30)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_tidy_rounds_scores_to_4_decimals_and_parameters_to_4_significant_digits():
    t = report.tidy(_summary())
    assert t["best_value"] == 0.7716 and t["check_best"] == {"mAP@1000": 0.5427, "Recall@1": 0.6111}
    assert t["best_post"]["weights"] == [0.15, 0.6] and t["best_post"]["rerank"]["lambda_value"] == 0.05423
    assert t["top_trials"][0]["params"]["weight_a"] == 0.15 and t["top_trials"][1]["params"]["k1"] == 20
    assert t["best_post"]["whiten"] is False and t["best_post"]["whiten_dim"] is None
    assert not LONG_DECIMALS.search(json.dumps(t))


def test_markdown_has_warnings_first_real_tables_and_no_float_noise():
    md = report.markdown(_summary([WARNING]))
    assert not LONG_DECIMALS.search(md) and str(NOISY) not in md
    assert md.index(WARNING) < md.index("|")  # the warnings come before any table
    assert "| best (trial 8) | 0.7716 | 0.5427 | 0.6111 |" in md
    assert "| weights | 0.15, 0.6 |" in md and "| dba_alpha | 0.659 |" in md
    # one column per parameter; a parameter a trial did not have is a dash
    assert "| trial | mAP@1000 | Recall@1 | weight_a | dba_alpha | k1 |" in md
    assert "| 0 (defaults) | 0.6635 | 0.8333 | 1 | – | 20 |" in md
    assert "Warnings" not in report.markdown(_summary())  # none given, none shown (the field is optional)


def test_html_is_tables_and_inlined_pngs_not_a_pre_block(tmp_path):
    pngs = {name: _png(tmp_path / f"{name}.png") for name in report.PLOTS}
    page = report.html_page(_summary([WARNING, "a <b> & c"]), pngs)
    assert "<pre" not in page and page.count("<table>") == 4
    assert "<td>best (trial 8)</td><td>0.7716</td><td>0.5427</td><td>0.6111</td>" in page
    assert not LONG_DECIMALS.search(page)
    warn = re.search(r'<div class="warnings">.*?</div>', page)
    assert warn and WARNING in warn.group() and "a &lt;b&gt; &amp; c" in warn.group()
    assert warn.start() < page.index("<table>")
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    assert Image.open(io.BytesIO(base64.b64decode(images[0]))).size == (40, 30)


def test_html_uses_plotly_fragments_when_given_and_keeps_the_slice_png(tmp_path):
    pngs = {name: _png(tmp_path / f"{name}.png") for name in report.PLOTS}
    page = report.html_page(_summary(), pngs, {"optimization_history": '<div id="plotly-history"></div>'})
    assert '<div id="plotly-history"></div>' in page
    assert page.count("data:image/png;base64,") == 2  # importances and slice stay PNGs


def _study_with_14_parameters(n_trials: int = 24) -> optuna.Study:
    def objective(trial):
        x = [trial.suggest_float(f"f{i}", 0.0, 1.0) for i in range(6)]
        x += [trial.suggest_float(f"log{i}", 1e-3, 10.0, log=True) for i in range(2)]
        x += [trial.suggest_int(f"n{i}", 1, 40) / 40 for i in range(4)]
        x += [float(trial.suggest_categorical(f"c{i}", [False, True])) for i in range(2)]
        return float(np.mean(x))

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=n_trials)
    return study


def test_slice_plot_is_a_grid_of_readable_panels(tmp_path, monkeypatch, caplog):
    from optuna.visualization import matplotlib as ovm

    def no_importances(study):  # fANOVA on 14 parameters is slow; a failing plot is skipped anyway
        raise RuntimeError("not here")

    monkeypatch.setattr(ovm, "plot_param_importances", no_importances)
    study = _study_with_14_parameters()
    paths = report.save_pngs(study, tmp_path, k=1000)
    assert set(paths) == {"optimization_history", "slice"} and "param_importances skipped" in caplog.text
    width, height = Image.open(paths["slice"]).size
    assert width <= 1600 and height >= 600 and width / height < 2.5  # optuna's own: 2800 x 453, one row
    fig = report.plot_slices(study, order=["n3", "c1"])
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(panels) == 14 and panels[0].get_title().startswith("n3") and panels[1].get_title().startswith("c1")
    assert len({round(ax.get_position().y0, 3) for ax in panels}) >= 3  # several rows
    assert [t.get_text() for t in panels[1].get_xticklabels()] == ["False", "True"]


def test_write_report_end_to_end(tuning_heldout, tmp_path, monkeypatch):
    from tuning.search import SearchConfig, SearchResult, run_search

    result = run_search(tuning_heldout, SearchConfig(n_trials=6, seed=1))
    plain = SearchResult.summary
    monkeypatch.setattr(SearchResult, "summary", lambda self: {**plain(self), "warnings": [WARNING]})
    paths = report.write_report(result, tmp_path / "rep")
    page, md = paths["html"].read_text(), paths["markdown"].read_text()
    assert "<pre" not in page and "<table>" in page and page.count('src="data:image/png;base64,') == 3
    assert WARNING in page and md.index(WARNING) < md.index("|")
    for text in (page, md, paths["json"].read_text()):
        assert not LONG_DECIMALS.search(text)
    assert Image.open(paths["png_slice"]).size[0] <= 1600


def _tile_frames_on_one_line(img: Image.Image, colour) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Runs [start, stop) of ``colour`` pixels on the image row that holds most of them, and that row."""
    a = np.asarray(img.convert("RGB"))
    mask = (a == np.array(colour, dtype=a.dtype)).all(axis=2)
    y = int(mask.sum(axis=1).argmax())
    edges = np.diff(np.concatenate([[0], mask[y].astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))), a[y]


def test_retrieval_picture_separates_tiles_and_has_a_legend_and_captions(tmp_path, monkeypatch):
    query = _png(tmp_path / "q.png", (30, 30, 200), (64, 64))
    refs = [_png(tmp_path / f"r{i}.png", (200, 150, 30), (64, 48)) for i in range(3)]
    texts: list[str] = []
    draw_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *a, **kw: texts.append(text) or draw_text(self, xy, text, *a, **kw))
    out = retrieval_picture([query], [refs], [[True, True, True]], tmp_path / "pic.png",
                            query_names=["query_0042"], query_ap=[0.5], ap_name="AP@1000", tile=60, spacing=6)
    img = Image.open(out)
    runs, line = _tile_frames_on_one_line(img, GREEN)
    assert len(runs) == 3 and all(stop - start == 60 for start, stop in runs)  # three tiles, not one band
    for (_, stop), (start, _) in zip(runs, runs[1:]):
        assert start - stop == 6 and (line[stop:start] == 255).all()  # background between neighbours
    # the legend shows the red frame's meaning although no reference is wrong
    assert (np.asarray(img) == np.array(RED, dtype=np.uint8)).all(axis=2).any()
    assert any("same class" in t for t in texts) and any("another class" in t for t in texts)
    assert any("query_0042" in t and "AP@1000 0.5000" in t for t in texts)


def test_retrieval_picture_without_labels_draws_no_green_or_red_frames(tmp_path):
    refs = [_png(tmp_path / f"r{i}.png") for i in range(2)]
    img = np.asarray(Image.open(retrieval_picture([refs[0]], [refs], None, tmp_path / "pic.png")))
    for colour in (GREEN, RED):
        assert not (img == np.array(colour, dtype=np.uint8)).all(axis=2).any()
    with pytest.raises(ValueError, match="query_ap"):
        retrieval_picture([refs[0]], [refs], None, tmp_path / "bad.png", query_ap=[0.1, 0.2])


ROWS_WITH_VAL = [{"epoch": 0, "loss": None, "val": {"mAP@1000": 0.21, "Recall@1": 0.4}},
                 {"epoch": 1, "loss": 1.7, "val": None},
                 {"epoch": 2, "loss": 1.1, "val": {"mAP@1000": 0.2102, "Recall@1": 0.41}}]
ROWS_WITHOUT_VAL = [{"epoch": e, "loss": 1.0 / e, "val": None} for e in (1, 2, 3)]


def test_loss_figure_puts_held_out_map_beside_the_loss_on_a_0_1_axis():
    fig = ckpt.loss_figure(ROWS_WITH_VAL, 1000, "member_a (resnet18)")
    loss_ax, val_ax = fig.axes
    assert fig._suptitle.get_text() == "member_a (resnet18)"
    assert val_ax.get_ylim() == (0.0, 1.0)  # 0.21 -> 0.2102 stays flat, not stretched over the panel
    assert loss_ax.get_ylim()[0] == 0.0 and loss_ax.get_position().x1 < val_ax.get_position().x0
    fig.canvas.draw()
    legend = val_ax.get_legend().get_window_extent()
    assert legend.x0 >= val_ax.get_window_extent().x1  # the legend sits off the curves
    assert [t.get_text() for t in val_ax.get_legend().get_texts()] == ["mAP@1000", "Recall@1"]
    assert len(ckpt.loss_figure(ROWS_WITHOUT_VAL, 1000).axes) == 1


@pytest.mark.parametrize("rows", [ROWS_WITH_VAL, ROWS_WITHOUT_VAL], ids=["with_val", "without_val"])
def test_write_log_titles_loss_png_with_the_member(tmp_path, monkeypatch, rows):
    run = tmp_path / "member_a"
    run.mkdir()
    (run / ckpt.CONFIG_FILE).write_text(json.dumps({"arch": "resnet18"}))
    ckpt.write_log(run, rows, 1000)  # the call backbones/train.py makes
    assert Image.open(run / "loss.png").size[0] > 300
    titles: list = []
    monkeypatch.setattr(ckpt, "plot_loss", lambda path, rows, k, title=None: titles.append(title))
    ckpt.write_log(run, rows, 1000)
    ckpt.write_log(tmp_path / "bare", rows, 1000, title="given")
    assert titles == ["member_a (resnet18)", "given"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "b.png") as tmp:  # a writer that opens the temp path itself
            Image.new("RGB", (2, 2)).save(tmp, format="PNG")
        atomic_write_text(tmp_path / "a.txt", "y")  # replacing keeps the umask's mode
    finally:
        os.umask(old)
    for name in ("a.txt", "b.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.png"]  # no temp file left
