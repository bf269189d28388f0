"""Named recipes: selection, layering (defaults <- recipe <- the user's values), validation,
records, and one pinned step per recipe and method against the documented reference."""
import json

import pytest
import torch
import yaml

import paper_reference as ref
from ucmkd.cli import main
from ucmkd.config import ExperimentConfig, RunConfig, from_dict, load_config, save_config
from ucmkd.engine.trainer import scheduled_lr
from ucmkd.errors import ConfigError
from ucmkd.recipes import load_recipe, recipe_config, recipe_names

RECIPES = ["paper-ave", "paper-cremad", "paper-ravdess"]
METHODS = ["ucmkd-joint", "ucmkd-bilevel", "ce"]
F64_EPS, F32_EPS = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps


def test_the_three_recipes_ship_and_cover_both_paper_methods():
    assert recipe_names() == RECIPES
    for name in RECIPES:
        assert set(load_recipe(name).methods) == set(METHODS)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("method", METHODS)
def test_recipe_fixes_the_documented_settings(name, method):
    cfg = recipe_config(name, method)
    p = ref.documented(name, method)
    o, t, mp = cfg.optim, cfg.teacher, cfg.method.params
    assert (o.optimizer, o.lr, o.weight_decay, o.epochs, o.warmup_epochs, o.min_lr, o.batch_size, o.clip_norm) == \
        (p["optimizer"], p["lr"], p["weight_decay"], p["epochs"], p["warmup_epochs"], p["min_lr"], p["batch_size"],
         p["clip"])
    assert o.schedule_unit == "epoch" and o.steps_per_epoch is None and cfg.pairing.label_budget is None
    assert o.precision == p.get("precision", "fp32")
    assert (t.optimizer, t.lr, t.weight_decay, t.epochs, t.batch_size, t.precision, t.clip_norm) == \
        tuple(ref.DOCUMENTED[name]["teacher"][k] for k in ("optimizer", "lr", "weight_decay", "epochs", "batch_size", "precision")) + (0.0,)
    if method != "ce":
        assert (mp["metric"], mp["eps"], mp["n_iter"], mp["backend"], mp["grad"]) == \
            (p["metric"], p["eps"], p["n_iter"], "pot", "autodiff")
    for k in ("la_teacher_grad", "inner_lr", "inner_wd", "label_smoothing", "n1", "n2", "w_fa", "w_la"):
        if k in mp:
            assert mp[k] == p[k], k
    assert cfg.recipe == name


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_schedules_equal_torch_schedulers(name):
    """Per-epoch lr of the student (torch LinearLR + CosineAnnealingLR in SequentialLR, read
    back from torch) and of the teacher (CosineAnnealingLR, or the scripts' poly formula)."""
    cfg = recipe_config(name, "ce")
    spe = 7
    ours = [scheduled_lr(cfg.optim, e * spe + k, spe) for e in range(cfg.optim.epochs) for k in (0, spe - 1)]
    theirs = [lr for lr in ref.student_lrs(name) for _ in (0, 1)]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=0)
    assert ours[0] == cfg.optim.min_lr   # epoch 0 runs at min_lr
    t = [scheduled_lr(cfg.teacher, e * spe, spe) for e in range(cfg.teacher.epochs)]
    assert t == pytest.approx(ref.teacher_lrs(name), rel=1e-12, abs=0)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("method", METHODS)
def test_one_step_of_each_recipe_matches_its_reference(name, method):
    """First step (epoch 0) through the recipe's config, optimiser, schedule and strategy
    against the plain-PyTorch reference of the documented settings (tests/support/paper_reference.py).
    Bound: the update's relative error is the gradient's (SGD: linear; Adam's first step
    lr g/(|g| + 1e-8) with |g| >> 1e-8 here), and the gradients through 100 Sinkhorn
    iterations carry at most ~1e3 units of rounding: 1e3 eps of the dtype."""
    assert ref.pinned_step(name, method, torch.float64, "fp32") <= 1e3 * F64_EPS
    assert ref.pinned_step(name, method, torch.float32, "fp32") <= 1e3 * F32_EPS
    if ref.documented(name, method).get("precision") == "bf16":
        # both sides run the same bf16 kernels; bf16 keeps 8 bits (2^-8), a handful of roundings deep
        assert ref.pinned_step(name, method, torch.float32, "bf16") <= 10 * 2.0 ** -8


def test_recipe_sits_between_the_defaults_and_the_users_values(tmp_path):
    default = RunConfig()
    cfg = load_config(RunConfig, None, ["recipe=paper-ravdess", "method.name=ucmkd-bilevel", "optim.epochs=3",
                                        "method.params.n1=2"])
    assert default.optim.lr == 3e-3 and cfg.optim.lr == 1e-4          # recipe over the default
    assert cfg.optim.epochs == 3 and cfg.method.params["n1"] == 2      # the user's over the recipe
    assert cfg.method.params["inner_lr"] == 5e-5                       # the rest of the method block stays
    assert cfg.model == default.model                                  # what the recipe leaves alone
    # from a YAML file too, overrides on top of it
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"recipe": "paper-cremad", "method": {"name": "ucmkd-joint"}, "optim": {"lr": 0.02}}))
    cfg2 = load_config(RunConfig, f, ["optim.momentum=0.5"])
    assert (cfg2.optim.optimizer, cfg2.optim.lr, cfg2.optim.momentum) == ("sgd", 0.02, 0.5)
    # the saved config records the recipe and the resolved values, and reloads to itself
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["recipe"] == "paper-ravdess" and saved["optim"]["schedule_unit"] == "epoch"
    assert load_config(RunConfig, tmp_path / "config.yaml") == cfg
    assert recipe_config("paper-ravdess", "ucmkd-bilevel", {"optim.epochs": 3, "method.params.n1": 2}) == cfg


def test_recipe_errors_name_what_is_wrong():
    with pytest.raises(ConfigError, match="unknown recipe 'paper-x'; known recipes: paper-ave, paper-cremad, paper-ravdess"):
        load_config(RunConfig, None, ["recipe=paper-x", "method.name=ce"])
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        RunConfig(recipe="nope")
    with pytest.raises(ConfigError, match="give method.name too"):
        load_config(RunConfig, None, ["recipe=paper-ave"])
    with pytest.raises(ConfigError, match="no settings for method 'kd'; it covers ucmkd-joint, ucmkd-bilevel, ce"):
        load_config(RunConfig, None, ["recipe=paper-ave", "method.name=kd"])
    with pytest.raises(ConfigError, match="base.recipe: a recipe applies to one run"):
        from_dict(ExperimentConfig, {"base": {"recipe": "paper-ave", "method": {"name": "ce"}}})
    with pytest.raises(ConfigError, match="optim.schedule_unit: unknown value 'batch'; choose one of step, epoch"):
        load_config(RunConfig, None, ["optim.schedule_unit=batch"])


def test_cli_trains_with_a_recipe_and_lists_recipes(tmp_path, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {n} (ucmkd-joint, ucmkd-bilevel, ce)" in out for n in RECIPES)
    run_dir = tmp_path / "run"
    args = ["train", "--no-progress", "--run-dir", str(run_dir), "recipe=paper-cremad", "method.name=ucmkd-bilevel",
            "data.teacher=synthetic/a", "data.student=synthetic/b", "data.synthetic.n_items=300",
            "data.synthetic.num_classes=3", "model.teacher_width=8", "model.student_width=8",
            "model.teacher_feat_dim=8", "model.student_feat_dim=8", "optim.epochs=2", "optim.steps_per_epoch=2",
            "optim.batch_size=16", "optim.warmup_epochs=1", "teacher.epochs=2", "method.params.n_iter=10"]
    assert main(args) == 0
    res = json.loads((run_dir / "result.json").read_text())
    assert res["params"]["inner_lr"] == 1e-5 and res["params"]["label_smoothing"] == 0.0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["recipe"] == "paper-cremad" and saved["optim"]["optimizer"] == "sgd"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1e-5, 1e-2])   # epoch 0 at min_lr, then lr
    assert {"train_inner_fa", "train_inner_head_ce", "train_inner_head_la", "train_outer_ce"} <= set(rows[0])


def test_poly_decay_equals_torch_polynomial_lr():
    """lr_decay poly with min_lr 0 and no warm-up is torch's PolynomialLR(power 0.9), per step."""
    from ucmkd.config import OptimConfig

    o = OptimConfig(epochs=5, lr=0.1, min_lr=0.0, warmup_epochs=0, lr_decay="poly")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=o.lr)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=5 * 4, power=0.9)
    theirs = []
    for _ in range(20):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [scheduled_lr(o, s, 4) for s in range(20)] == pytest.approx(theirs, rel=1e-12)


@pytest.mark.parametrize("name,method,wrong", [
    ("paper-ave", "ucmkd-joint", "method.params.la_teacher_grad=true"),       # the AVE no_grad term
    ("paper-ave", "ucmkd-bilevel", "method.params.label_smoothing=0.1"),
    ("paper-ravdess", "ucmkd-bilevel", "method.params.inner_lr=1e-5"),
    ("paper-cremad", "ucmkd-joint", "optim.optimizer=adamw"),
    ("paper-ravdess", "ce", "optim.schedule_unit=step"),                      # per-step warm-up
])
def test_the_pinned_step_detects_a_wrong_setting(name, method, wrong):
    """Each of these would fail the float64 bound above (the inner lr only moves the outer
    gradient's point by ~inner_lr, so it shows at ~1e-5, the others at 0.5 and more)."""
    assert ref.pinned_step(name, method, torch.float64, "fp32", [wrong]) > 1e4 * 1e3 * F64_EPS


def test_default_schedule_is_the_per_step_warmup_cosine_of_before():
    """schedule_unit step + lr_decay cosine (the defaults) is warmup_cosine over steps, exactly."""
    from ucmkd.config import OptimConfig
    from ucmkd.engine import warmup_cosine

    o = OptimConfig(epochs=6, warmup_epochs=2, lr=3e-3, min_lr=1e-6)
    spe = 5
    assert [scheduled_lr(o, s, spe) for s in range(30)] == [warmup_cosine(s, 30, 10, 3e-3, 1e-6) for s in range(30)]
