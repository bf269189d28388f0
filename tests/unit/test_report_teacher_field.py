"""Reports name the teacher-free field: best distiller, best teacher-free method and the
teacher's share (headline minus best teacher-free, paired by seed), on synthetic results files."""
import math

import numpy as np
import pytest
from scipy import stats

from ucmkd.bench import report, teacher_split
from ucmkd.config import SuiteConfig, from_dict
from ucmkd.report import headline_report

# per-seed test accuracies (seeds 0, 1, 2) of one setting. Mean deltas vs ce (pp): dkd +2.7 (best
# distiller), ucmkd-no-la +15.3 (an ablation), better-together +5.0 (best teacher-free), ucmkd-no-teacher
# +1.3, pseudo-label +1.0; ucmkd - better-together per seed: 4, 6, 6 pp
# (better-together - ce: 6, 5, 4; a share taken against ce would show +5.0 [+2.5, +7.5])
ACC = {
    "ce": [0.50, 0.60, 0.55],
    "dkd": [0.55, 0.61, 0.57],
    "ucmkd-joint": [0.40, 0.41, 0.42],
    "ucmkd": [0.60, 0.71, 0.65],
    "ucmkd-no-la": [0.70, 0.71, 0.72],            # an ablation: never the best distiller
    "pseudo-label": [0.52, 0.60, 0.56],
    "better-together": [0.56, 0.65, 0.59],
    "ucmkd-no-teacher": [0.51, 0.62, 0.56],
}


def results(acc=ACC, settings=("s1",), seeds=(0, 1, 2)):
    return [{"setting": s, "method": m, "seed": k, "test_acc": a[k], "val_acc": a[k], "seconds": 1.0,
             "teacher_test_acc": 0.9} for s in settings for m, a in acc.items() for k in seeds]


def suite(methods):
    return from_dict(SuiteConfig, {
        "name": "t", "methods": methods, "seeds": [0, 1, 2], "baseline": "ce",
        "settings": {"s1": {"overrides": {}}},
        "headline": {"method": "ucmkd", "compare": ["ucmkd-joint"], "control": "pseudo-label",
                     "ablation_prefix": "ucmkd-no-"},
        "variants": {"ucmkd-no-la": {"method": "ucmkd", "params": {"w_la": 0.0}},
                     "ucmkd-no-teacher": {"method": "ucmkd", "params": {"w_kd": 0.0, "w_la": 0.0, "w_fa": 0.0,
                                                                        "teacher_vote": False}},
                     "paired-kd": {"method": "paired-kd", "overrides": {"pairing.mode": "paired"}}}})


def test_teacher_split_comes_from_the_registry():
    s = suite(list(ACC) + ["ce-ls", "kd", "paired-kd"])
    distillers, free = teacher_split(s, s.methods)
    # ucmkd-no-teacher is the ucmkd method with every teacher term off: teacher-free by its params
    assert set(free) == {"pseudo-label", "better-together", "ucmkd-no-teacher", "ce-ls"}
    # the headline, its ablations and the paired oracle are not "distillers"
    assert set(distillers) == {"dkd", "ucmkd-joint", "kd"}


def _hand_share():
    d = 100 * (np.array(ACC["ucmkd"]) - np.array(ACC["better-together"]))      # [4, 6, 6], paired by seed
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    return d.mean(), d.mean() - half, d.mean() + half


def test_headline_columns_and_the_share_paired_by_seed(tmp_path):
    s = suite(list(ACC))
    report(s, results(), tmp_path)
    md = (tmp_path / "ucmkd.md").read_text()
    header = next(x for x in md.splitlines() if x.startswith("| setting |"))
    assert "| best baseline | best distiller | best teacher-free | teacher's share (ucmkd - best teacher-free) |" \
        in header
    line = next(x for x in md.splitlines() if x.startswith("| s1 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = dict(zip(cols, cells))
    assert row["best distiller"].startswith("dkd +2.7")              # not ucmkd-no-la (+15.3), an ablation
    assert row["best teacher-free"].startswith("better-together +5.0")
    mean, lo, hi = _hand_share()
    assert (round(mean, 1), round(lo, 1), round(hi, 1)) == (5.3, 2.5, 8.2)
    assert row["teacher's share (ucmkd - best teacher-free)"] == f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}] *"
    # unpaired (independent-samples) statistics would give another interval
    a, b = 100 * np.array(ACC["ucmkd"]), 100 * np.array(ACC["better-together"])
    assert stats.ttest_ind(a, b).pvalue > 0.05 and lo > 0
    assert f"mean {mean:+.2f} pp over 1 settings; 95 % CI above 0 in 1 of 1" in md
    tables = (tmp_path / "tables.md").read_text()
    assert "best distiller: dkd +2.7" in tables and "best teacher-free: better-together +5.0" in tables
    assert f"teacher's share (ucmkd - better-together): {mean:+.1f} [{lo:+.1f}, {hi:+.1f}] *" in tables


def test_no_teacher_free_method_is_said_not_left_blank(tmp_path):
    acc = {m: ACC[m] for m in ("ce", "dkd", "ucmkd", "ucmkd-joint")}
    report(suite(list(acc)), results(acc), tmp_path)
    md = (tmp_path / "ucmkd.md").read_text()
    assert "best teacher-free" not in md.splitlines()[0] and "teacher's share (" not in md
    assert "No teacher-free method other than ce ran" in md
    assert "best teacher-free: none ran besides ce" in (tmp_path / "tables.md").read_text()


def test_one_seed_prints_no_nan(tmp_path):
    report(suite(list(ACC)), results(seeds=(0,)), tmp_path)
    for f in ("ucmkd.md", "tables.md"):
        text = (tmp_path / f).read_text()
        assert "nan" not in text.lower(), f
        assert "[CI n/a]" in text, f
    md = (tmp_path / "ucmkd.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| s1 |"))
    assert "| +4.0 [CI n/a] |" in line          # the share: ucmkd 0.60 - better-together 0.56, seed 0


def test_headline_report_without_the_field_keeps_its_columns():
    md = headline_report(results(), ["s1"], ["dkd", "pseudo-label"], "ce", "ucmkd", ("ucmkd-joint",), "pseudo-label")
    assert "best distiller" not in md and "| best baseline |" in md


def test_headline_shows_the_method_against_the_augmented_baseline_paired_by_seed():
    acc = {**ACC, "ce-aug": [0.58, 0.66, 0.60]}          # ucmkd - ce-aug per seed: 2, 5, 5 pp
    text = headline_report(results(acc), ["s1"], ["dkd"], "ce", "ucmkd", aug_baseline="ce-aug")
    header, row = text.splitlines()[0], text.splitlines()[2]
    assert "| ucmkd - ce-aug |" in header
    d = np.array([2.0, 5.0, 5.0])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert f"+{d.mean():.1f} [{d.mean() - half:+.1f}, {d.mean() + half:+.1f}]" in row
    # not run: no column
    assert "ce-aug" not in headline_report(results(), ["s1"], ["dkd"], "ce", "ucmkd", aug_baseline="ce-aug")
