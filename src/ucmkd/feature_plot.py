"""``ucmkd plot RUN_DIR``: the student's and the teacher's validation features in one 2-D embedding.

For a finished run and a ``ce`` run of the same setting, side by side: the validation features of
the returned student (mapped into the teacher's feature space, see below) and of the frozen
teacher on its own modality's validation split, embedded together in 2-D (scikit-learn t-SNE,
or UMAP with ``method="umap"`` when ``umap-learn`` is installed), coloured by class and marked
by modality (circles: student, triangles: teacher). A student whose classes sit on the
teacher's clusters of the same colour is aligned class by class (what ``ucmkd``'s label-aware OT
and teacher-head terms aim at); the title repeats the run's class-wise OT cost and test accuracy.

Bounded cost: at most ``max_per_class`` items per class and ``max_items`` per modality and panel
(defaults 30 and 300, so at most 600 points per embedding: a few seconds per panel on a laptop
CPU); features are L2-normalised first (the OT's cosine geometry).

Feature spaces: the student's features go through the run's learned projector when it has one
(``ucmkd`` with d_s != d_t), as is when d_s = d_t, and otherwise (e.g. ``ce`` with d_s != d_t)
through the least-squares linear map of the student's labelled training features onto the
teacher's class means of their labels (the map is stated in the panel title).

The ``ce`` run is, in this order: ``ce_dir`` if given; the sibling cell of a grid or suite
(``.../<setting>/ce/seed<k>`` next to ``.../<setting>/<method>/seed<k>``) when it holds a finished
run on the same data and seed; else trained once with the run's config (method ``ce``, same seed
and schedule) into ``<run_dir>/plot-ce`` and reused from there next time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import SUPERVISED
from .errors import ConfigError, DataError
from .keys import run_key_parts

EMBEDDINGS = ("tsne", "umap")


def _require_umap():
    try:
        import umap
    except ImportError:
        raise ConfigError("--method umap needs the optional package 'umap-learn' "
                          "(pip install ucmkd[umap]); the default is --method tsne") from None
    return umap


def _embed(x: np.ndarray, method: str, seed: int) -> np.ndarray:
    """[N, d] -> [N, 2]."""
    if method == "umap":
        return _require_umap().UMAP(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def _stratified(y: np.ndarray, per_class: int, total: int, seed: int) -> np.ndarray:
    """Positions into ``y``: at most ``per_class`` of each class, at most ``total`` in all."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per = max(1, min(per_class, total // max(1, len(classes))))
    return np.sort(np.concatenate([rng.permutation(np.nonzero(y == c)[0])[:per] for c in classes]))


def _teacher_for(loaded, student, teacher_data):
    """The run's frozen teacher, from the cache (its weights must be those the run's key names)."""
    from .cache import state_digest
    from .engine import get_teacher

    teacher, _ = get_teacher(loaded.config, teacher_data)
    want = run_key_parts(loaded.run_dir).get("teacher")
    if want and state_digest(teacher.state_dict()) != want:
        raise DataError(f"{loaded.run_dir}: the cached teacher is not the run's teacher (digest "
                        f"{state_digest(teacher.state_dict())} != {want}): the run was given its own teacher")
    return teacher


def _labelled(loaded, student, teacher_data) -> np.ndarray:
    """The run's labelled student items, as the run recorded them (``draw.npz``); for a run
    written before runs recorded their draw, the run's sampler drawn again (with the teacher
    modality when the method draws from it, so that ``pairing.mismatch_ratio`` draws the same)."""
    from .assembly import sampler_for
    from .data.pairing import DRAW_FILE, read_draw
    from .methods import METHODS

    draw = read_draw(loaded.run_dir / DRAW_FILE)
    if draw is not None:
        return draw["labelled"]
    cfg = loaded.config
    method = METHODS.get(cfg.method.name)
    return sampler_for(cfg, student, teacher_data if method.draws_teacher_modality() else None,
                       unlabelled=False, require_unlabelled=False).labelled


def _learned_map(loaded, teacher):
    """The feature map the run learned (its distiller's :meth:`~ucmkd.methods.Distiller.feature_map`
    at the best-validation epoch), or None: the run's method rebuilt around a copy of its student
    and the teacher, with the trainer's components, and its best trainable state loaded."""
    import copy

    from .engine.checkpoint import load_checkpoint
    from .engine.shadow import CEShadow
    from .methods import METHODS

    cfg = loaded.config
    method = METHODS.get(cfg.method.name)
    if not method.uses_teacher:
        return None
    d = method(copy.deepcopy(loaded.model), teacher, method.parse_params(cfg.method.params))
    CEShadow.attach(d)
    d.load_trainable_state_dict(load_checkpoint(loaded.run_dir / "latest.pt")["best_states"]["student"])
    return d.feature_map()


def _student_map(loaded, teacher, student, teacher_data, d_s: int):
    """(callable z [N, d_s] -> [N, d_t], how) of the module docstring."""

    if loaded.selected == "student":
        fmap = _learned_map(loaded, teacher)
        if fmap is not None:
            return fmap, "the run's projector"
    if d_s == teacher.feat_dim:
        return (lambda z: z), "as is"
    from .diagnose import least_squares_map

    lab = torch.as_tensor(_labelled(loaded, student, teacher_data))
    xt, yt = teacher_data.split("train")
    fmap = least_squares_map(loaded.model.features(student.x[lab]), student.y[lab], teacher.features(xt), yt,
                             student.num_classes)
    return fmap, "least-squares map onto the teacher's class means"


def _panel_points(loaded, student, teacher_data, teacher, per_class: int, total: int, seed: int):
    """(features [N, d_t] L2-normalised, labels [N], is_teacher [N], how the student's were mapped)."""
    xs, ys = student.split("val")
    xt, yt = teacher_data.split("val")
    si = _stratified(ys.numpy(), per_class, total, seed)
    ti = _stratified(yt.numpy(), per_class, total, seed + 1)
    with torch.no_grad():
        zs = loaded.model.features(xs[si])
        fmap, how = _student_map(loaded, teacher, student, teacher_data, zs.shape[1])
        z = torch.cat([fmap(zs), teacher.features(xt[ti])]).double()
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = np.concatenate([ys[si].numpy(), yt[ti].numpy()])
    is_teacher = np.concatenate([np.zeros(len(si), bool), np.ones(len(ti), bool)])
    return z.numpy(), labels, is_teacher, how


def find_ce_run(run_dir: Path) -> Optional[Path]:
    """A finished ``ce`` run beside a grid cell ``.../<setting>/<label>/seed<k>``: a sibling cell
    (any label) whose ``result.json`` says method ``ce`` with its default params, on the same data
    and seed (read from the runs' keys, not from directory names)."""
    from .cache import read_json

    run_dir = Path(run_dir).resolve()
    mine = run_key_parts(run_dir)
    for cand in sorted(run_dir.parent.parent.glob(f"*/{run_dir.name}")):
        res = read_json(cand / "result.json", "run result") if cand != run_dir else None
        if not res or res.get("method") != SUPERVISED or res.get("params") not in (None, {}, {"label_smoothing": 0.0}):
            continue
        other = run_key_parts(cand)
        if all(mine.get(k) == other.get(k) for k in ("student_data", "teacher_data")) and \
                (mine.get("config") or {}).get("seed") == (other.get("config") or {}).get("seed"):
            return cand
    return None


def ce_run_for(loaded, ce_dir: Optional[str | Path] = None, log=print) -> Path:
    """The ``ce`` run to compare with (module docstring: given, sibling, or trained into
    ``<run_dir>/plot-ce``)."""
    if ce_dir is not None:
        ce_dir = Path(ce_dir)
        if not (ce_dir / "result.json").is_file():
            raise DataError(f"--ce {ce_dir}: not a finished run directory (no result.json)")
        return ce_dir
    found = find_ce_run(loaded.run_dir)
    if found is not None:
        return found
    from .api import run
    from .config import from_dict, to_dict

    d = to_dict(loaded.config)
    d["method"] = {"name": SUPERVISED, "params": {}}
    d["logging"] = {}
    target = loaded.run_dir / "plot-ce"
    if not (target / "result.json").is_file():
        log(f"no ce run given or found next to {loaded.run_dir}: training one with the run's config into {target}")
    run(from_dict(type(loaded.config), d), run_dir=target)     # a finished one is loaded back (its key checked)
    return target


def plot_features(run_dir: str | Path, ce_dir: Optional[str | Path] = None, method: str = "tsne",
                  out: Optional[str | Path] = None, max_per_class: int = 30, max_items: int = 300,
                  seed: int = 0, log=print) -> Path:
    """Write the feature-cloud figure of the module docstring to ``out`` (default
    ``<run_dir>/features.png``) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .assembly import load_pair
    from .export import load_student

    if method not in EMBEDDINGS:
        raise ConfigError(f"--method: unknown value {method!r}; choose one of {', '.join(EMBEDDINGS)}")
    if method == "umap":
        _require_umap()               # before anything is loaded or trained
    loaded = load_student(run_dir)
    runs = [loaded]
    if loaded.config.method.name != SUPERVISED:
        runs.append(load_student(ce_run_for(loaded, ce_dir, log)))
    student, teacher_data = load_pair(loaded.config)
    teacher = _teacher_for(loaded, student, teacher_data)
    classes = list(student.classes)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 5.0), squeeze=False)
    for ax, r in zip(axes[0], runs):
        z, labels, is_t, how = _panel_points(r, student, teacher_data, teacher, max_per_class, max_items, seed)
        p = _embed(z, method, seed)
        for c in np.unique(labels):
            for t, marker in ((False, "o"), (True, "^")):
                sel = (labels == c) & (is_t == t)
                ax.scatter(p[sel, 0], p[sel, 1], s=14 if not t else 22, marker=marker, color=cmap(int(c) % cmap.N),
                           alpha=0.75, edgecolors="none" if not t else "k", linewidths=0.3)
        res = r.result
        fa = res.get("diag_fa_classwise")
        ax.set_title(f"{r.config.method.name} ({r.selected}): test acc {100 * res['test_acc']:.1f} %"
                     + (f", class-wise OT {fa:.2f}" if fa is not None else "") + f"\nstudent features: {how}",
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color="grey", label=f"student ({loaded.config.data.student})"),
               Line2D([], [], marker="^", ls="", color="grey", markeredgecolor="k",
                      label=f"teacher ({loaded.config.data.teacher})")]
    handles += [Line2D([], [], marker="s", ls="", color=cmap(i % cmap.N), label=str(c)) for i, c in enumerate(classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    fig.suptitle(f"validation features, {method.upper()} (colour: class, marker: modality)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    path = Path(out) if out is not None else Path(run_dir) / "features.png"
    from .cache import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


__all__ = ["plot_features", "find_ce_run", "ce_run_for", "EMBEDDINGS"]
