"""Command-line interface: a thin layer over :mod:`ucmkd.api` and :mod:`ucmkd.experiment`.

    ucmkd run digits [--quick] [--out DIR] [--nproc-per-cell N] [key=value ...]
    ucmkd bench quick [--only PATTERNS] [--workers N] [--nproc-per-cell N] [--out DIR] [--report] [key=value ...]
    ucmkd train [--config FILE] [--run-dir DIR] [recipe=NAME] [key=value ...]
    torchrun --standalone --nproc_per_node=N -m ucmkd train ...     (data-parallel, docs/scaling.md)
    ucmkd train-teacher [--config FILE] [key=value ...]
    ucmkd diagnose [--config FILE] [--json] [key=value ...]
    ucmkd plot RUN_DIR [--ce RUN_DIR] [--method tsne|umap] [--out FILE]
    ucmkd export RUN_DIR [--format state_dict|torchscript] [--out FILE]
    ucmkd list

Every command takes ``--plugin MODULE_OR_FILE`` (repeatable, before or after the command name):
user code registering datasets, methods, ... (docs/plugins.md), imported before anything is
read, after the ``ucmkd.plugins`` entry points of the installed distributions.
"""
from __future__ import annotations

import argparse
import sys

from .config import builtin_yaml, resolve_yaml
from .errors import UcmkdError


def builtin_experiments() -> list[str]:
    return builtin_yaml("ucmkd.configs")


def experiment_path(name: str):
    """A built-in experiment name (``digits``) or a YAML path."""
    return resolve_yaml("ucmkd.configs", name, "experiment")


def _not_under_torchrun(command: str) -> None:
    import os

    from .errors import ConfigError

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError(f"ucmkd {command} starts its runs itself: launch it without torchrun, and give "
                          f"--nproc-per-cell N to train every run in N processes")


def _cmd_run(a) -> int:
    from .config import ExperimentConfig, load_config
    from .experiment import apply_quick, run_experiment

    _not_under_torchrun("run")
    exp = load_config(ExperimentConfig, experiment_path(a.experiment), a.overrides)
    if a.quick:
        exp = apply_quick(exp)
    run_experiment(exp, out_dir=a.out, progress=not a.no_progress, workers=a.workers,
                   nproc_per_cell=a.nproc_per_cell)
    return 0


def _cmd_bench(a) -> int:
    from .bench import load_suite, run_suite

    _not_under_torchrun("bench")
    suite, full = load_suite(a.suite, a.overrides)     # the reports cover the suite's own methods and seeds too
    run_suite(suite, out_dir=a.out, only=a.only, workers=a.workers, progress=not a.no_progress,
              nproc_per_cell=a.nproc_per_cell, full=full, report_only=a.report)
    return 0


def _load_run_config(a):
    from .config import RunConfig, load_config

    return load_config(RunConfig, a.config, a.overrides)


def _cmd_train(a) -> int:
    import json

    from .api import run
    from .engine import distributed

    cfg = _load_run_config(a)
    res = run(cfg, run_dir=a.run_dir, progress=not a.no_progress)
    res.pop("distiller", None)
    dp = distributed.init_from_env(cfg.device)      # the group run() joined under torchrun
    if dp is None or dp.is_main:
        print(json.dumps(res, indent=2, default=str))
    return 0


def _cmd_train_teacher(a) -> int:
    from .data import load_modality
    from .engine import distributed, get_teacher

    cfg = _load_run_config(a)
    dp = distributed.init_from_env(cfg.device)      # under torchrun: rank 0 alone trains (and caches) it

    def train():
        teacher_data = load_modality(cfg.data.teacher, cfg.data)     # the student modality plays no part
        return get_teacher(cfg, teacher_data, progress=not a.no_progress, retrain=a.retrain)[1]

    info = distributed.on_rank_zero(dp, train)
    if dp is None or dp.is_main:
        how = "as given, not trained" if info.get("best_epoch") is None else f"best epoch {info['best_epoch']}"
        print(f"teacher {cfg.data.teacher}: val acc {100 * info['val_acc']:.2f}%, test acc "
              f"{100 * info['test_acc']:.2f}% ({how})\ncheckpoint: {info['path']}")
    return 0


def _cmd_diagnose(a) -> int:
    import json

    from .diagnose import diagnose

    d = diagnose(_load_run_config(a), progress=not a.no_progress)
    print(json.dumps(d.to_dict(), indent=2, default=str) if a.json else d.table())
    return 0


def _cmd_plot(a) -> int:
    from .feature_plot import plot_features

    path = plot_features(a.run_dir, ce_dir=a.ce, method=a.method, out=a.out)
    print(f"{path}: validation features of {a.run_dir} (and its ce run), {a.method}")
    return 0


def _cmd_export(a) -> int:
    from .export import export_student

    res = export_student(a.run_dir, a.format, a.out)
    how = " (compiled with torch.jit.trace: the encoder cannot be scripted)" if res["how"] == "trace" else ""
    load = ("torch.jit.load(path)" if a.format == "torchscript"
            else "torch.load(path, weights_only=True); ucmkd.export.load_exported(path) rebuilds the model")
    print(f"{res['path']}: the student of {a.run_dir} as {a.format}{how}; load it with {load}")
    return 0


def _cmd_list(a) -> int:
    from .data import DATASETS, PRESETS
    from .data.base import SCHEMES
    from .losses.ot import BACKENDS, METRICS
    from .methods import METHODS
    from .models import BACKBONES

    print("datasets:   " + ", ".join(list(DATASETS.names()) + [f"{s}:PATH" for s in SCHEMES]))
    print("methods:    " + ", ".join(METHODS.names()))
    print("backbones:  " + ", ".join(BACKBONES.names()) + " (auto picks by input kind)")
    print("OT metrics: " + ", ".join(METRICS) + "; OT backends: " + ", ".join(BACKENDS))
    print("pairing presets: " + ", ".join(PRESETS))
    print("experiments: " + ", ".join(builtin_experiments()))
    from .bench import builtin_suites

    print("bench suites: " + ", ".join(builtin_suites()))
    from .recipes import describe, recipe_names

    print("recipes (recipe=NAME method.name=..., docs/reproduction.md):")
    for name in recipe_names():
        print("  " + describe(name))
    return 0


PLUGIN_HELP = ("a plugin to import first: a module name or a .py file or package directory that registers "
               "datasets, methods, ... (repeatable; docs/plugins.md)")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ucmkd", description="Cross-modal knowledge distillation without paired data.")
    # before the command (``ucmkd --plugin X bench ...``) and after it, in their own lists: a
    # sub-command's defaults would overwrite one shared list
    p.add_argument("--plugin", dest="plugins_before", action="append", default=[], metavar="MODULE_OR_FILE",
                   help=PLUGIN_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run an experiment grid (methods x seeds x directions) and report")
    r.add_argument("experiment", help=f"built-in experiment ({', '.join(builtin_experiments())}) or a YAML file")
    r.add_argument("--quick", action="store_true", help="the ~1-minute smoke version")
    r.add_argument("--out", default=None, help="output directory (default: the experiment's out_dir)")
    r.add_argument("--workers", type=int, default=1, help="parallel worker processes (1 thread each)")
    r.add_argument("--nproc-per-cell", type=int, default=1,
                   help="train every run data-parallel in N processes (torchrun; docs/scaling.md)")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1] base.optim.epochs=20")
    r.set_defaults(fn=_cmd_run)

    from .bench import builtin_suites

    b = sub.add_parser("bench", help="run a benchmark suite (settings x methods x seeds) with paired statistics")
    b.add_argument("suite", help=f"built-in suite ({', '.join(builtin_suites())}) or a YAML file")
    b.add_argument("--only", default=None, help="comma-separated glob patterns of setting names to run now")
    b.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: the suite's)")
    b.add_argument("--nproc-per-cell", type=int, default=None,
                   help="train every run data-parallel in N processes (torchrun; default: the suite's "
                   "nproc_per_cell; docs/scaling.md)")
    b.add_argument("--out", default=None, help="output directory (default: the suite's out_dir)")
    b.add_argument("--report", action="store_true",
                   help="run nothing: rewrite tables.md and the other reports from the results store")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1] base.optim.epochs=20")
    b.set_defaults(fn=_cmd_bench)

    for name, fn, helptext in (("train", _cmd_train, "train one student (one method, one seed)"),
                               ("train-teacher", _cmd_train_teacher, "train (or reuse) the teacher"),
                               ("diagnose", _cmd_diagnose, "before training: checks, short probes of the bound's "
                                "terms and the predicted gain of ucmkd over ce, with a verdict")):
        t = sub.add_parser(name, help=helptext)
        t.add_argument("--config", default=None, help="YAML file with RunConfig fields")
        t.add_argument("--no-progress", action="store_true")
        t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.name=kd data.student=digits/image; "
                       "recipe=paper-ravdess method.name=ucmkd-bilevel selects the authors' RAVDESS settings")
        if name == "train":
            t.add_argument("--run-dir", default=None, help="checkpoint/metrics directory (resumable)")
        elif name == "train-teacher":
            t.add_argument("--retrain", action="store_true", help="ignore a cached teacher")
        else:
            t.add_argument("--json", action="store_true", help="print the diagnosis as JSON instead of a table")
        t.set_defaults(fn=fn)

    pl = sub.add_parser("plot", help="student and teacher validation features in one 2-D embedding, next to ce's")
    pl.add_argument("run_dir", help="a finished run directory")
    pl.add_argument("--ce", default=None, help="the ce run to compare with (default: the grid sibling, else trained)")
    pl.add_argument("--method", default="tsne", choices=["tsne", "umap"], help="tsne (scikit-learn) or umap (umap-learn)")
    pl.add_argument("--out", default=None, help="PNG file (default: RUN_DIR/features.png)")
    pl.set_defaults(fn=_cmd_plot)

    e = sub.add_parser("export", help="write a finished run's trained student as a standalone PyTorch file")
    e.add_argument("run_dir", help="a finished run directory (ucmkd train --run-dir, ucmkd.run(run_dir=...))")
    e.add_argument("--format", default="state_dict", choices=["state_dict", "torchscript"],
                   help="state_dict: torch.load + an architecture description; torchscript: torch.jit.load")
    e.add_argument("--out", default=None, help="output file (default: RUN_DIR/student.pt or student.torchscript.pt)")
    e.set_defaults(fn=_cmd_export)

    ls = sub.add_parser("list", help="list datasets, methods, backbones, metrics, presets and recipes")
    ls.set_defaults(fn=_cmd_list)
    for sp in sub.choices.values():
        sp.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE_OR_FILE",
                        help=PLUGIN_HELP)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; ``key=value`` overrides may stand anywhere after the sub-command,
    also after options."""
    overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
    rest = [a for i, a in enumerate(argv) if i == 0 or a not in overrides]
    args = make_parser().parse_args(rest)
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + overrides
    args.plugins = args.plugins_before + args.plugins
    return args


def main(argv: list[str] | None = None) -> int:
    from .engine import distributed

    from .plugins import load_entry_points, load_plugins

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        load_entry_points()
        load_plugins(args.plugins, where="--plugin")
        return args.fn(args)
    except UcmkdError as e:
        print(f"ucmkd: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()      # under torchrun: leave the process group cleanly


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
