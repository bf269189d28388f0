"""``teacher.checkpoint``: a teacher trained elsewhere, used as is (a state dict of the configured
backbone, or a TorchScript module with ``features``/``head``), keyed by the file's content."""
import hashlib
import json
import shutil
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ucmkd.api import prepare, run, run_key
from ucmkd.cache import content_key
from ucmkd.cli import main
from ucmkd.config import RunConfig, deep_merge, from_dict
from ucmkd.data import load_modality
from ucmkd.engine import get_teacher
from ucmkd.engine.teacher import build_teacher_model, teacher_dir, teacher_key
from ucmkd.errors import ConfigError, DataError
from ucmkd.grid import Cell, ResultStore

from factories import TINY_BASE


def config(**extra) -> RunConfig:
    return from_dict(RunConfig, deep_merge(deep_merge(TINY_BASE, {"method": {"name": "kd"}}), extra))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, teacher data, a teacher trained the normal way, its info)."""
    cfg = config(data={"cache_dir": str(tmp_path_factory.mktemp("cache"))})
    data = load_modality(cfg.data.teacher, cfg.data)
    model, info = get_teacher(cfg, data)
    return cfg, data, model, info


def with_checkpoint(cfg: RunConfig, path, method: str | None = None, **model) -> RunConfig:
    """``cfg`` with ``teacher.checkpoint=path`` (and ``method.name``, ``model.*`` fields)."""
    d = deep_merge(asdict(cfg), {"teacher": {"checkpoint": str(path)}, "model": model})
    return from_dict(RunConfig, deep_merge(d, {"method": {"name": method}}) if method else d)


class ScriptTeacher(nn.Module):
    """A teacher written outside ucmkd: 16 inputs -> ``feat`` features -> ``k`` logits."""

    def __init__(self, feat: int = 12, k: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, feat), nn.ReLU())
        self.fc = nn.Linear(feat, k)

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @torch.jit.export
    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_script(path, **kw):
    torch.manual_seed(0)
    module = torch.jit.script(ScriptTeacher(**kw))
    torch.jit.save(module, str(path))
    return module


# --------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model"])
def test_state_dict_round_trip(tmp_path, trained, wrap):
    cfg, data, model, info = trained
    path = tmp_path / "teacher.pt"
    state = model.state_dict()
    torch.save(state if wrap == "plain" else {wrap: state, "other": 1}, path)
    cfg2 = with_checkpoint(cfg, path)
    teacher, info2 = get_teacher(cfg2, data)
    x = data.x[data.splits["test"]]
    assert torch.equal(teacher(x), model.eval()(x))               # the same weights: the same bits
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert (info2["val_acc"], info2["test_acc"]) == (info["val_acc"], info["test_acc"])   # measured, same model
    assert info2["best_epoch"] is None
    assert info2["checkpoint"] == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                   "format": "state_dict"}
    # a run with it: nothing trains the teacher, whose accuracy the result records
    ctx = prepare(cfg2, teacher_data=data)
    assert torch.equal(ctx.teacher(x), model(x))
    assert ctx.teacher_info["test_acc"] == info["test_acc"]
    assert not (teacher_dir(cfg2, data) / "teacher.pt").exists() and not (teacher_dir(cfg2, data) / "run").exists()


def test_run_with_a_checkpoint_and_the_teacher_argument(tmp_path, trained):
    cfg, data, model, info = trained
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    res = run(with_checkpoint(cfg, path), teacher_data=data)
    assert res["teacher_test_acc"] == info["test_acc"]
    given = run(cfg, teacher_data=data, teacher=model, teacher_info=info)   # the teacher= argument still works
    assert given["teacher_test_acc"] == info["test_acc"]
    assert given["test_acc"] == res["test_acc"]                   # the same teacher: the same student


def test_shape_mismatch_names_the_file_the_parameter_and_both_shapes(tmp_path, trained):
    cfg, data, _, _ = trained
    wide = build_teacher_model(config(model={"teacher_width": 16}), data)
    path = tmp_path / "wide.pt"
    torch.save(wide.state_dict(), path)
    with pytest.raises(DataError) as ei:
        get_teacher(with_checkpoint(cfg, path), data)
    msg = str(ei.value)
    assert str(path) in msg and "'encoder.stages.0.0.weight'" in msg
    assert "shape [16, 16] in the checkpoint but [8, 16] in the backbone" in msg
    assert "model.teacher_width=8" in msg
    # a missing and an unexpected parameter
    state = build_teacher_model(cfg, data).state_dict()
    torch.save({k: v for k, v in state.items() if k != "head.bias"}, path)
    with pytest.raises(DataError, match=r"'head.bias' \(shape \[3\] in the backbone\) is missing from the checkpoint"):
        get_teacher(with_checkpoint(cfg, path), data)
    torch.save({**state, "extra.weight": torch.zeros(2, 5)}, path)
    with pytest.raises(DataError, match=r"'extra.weight' \(shape \[2, 5\] in the checkpoint\) is not in the backbone"):
        get_teacher(with_checkpoint(cfg, path), data)
    torch.save({"epoch": 3}, path)
    with pytest.raises(DataError, match="not a state dict"):
        get_teacher(with_checkpoint(cfg, path), data)
    with pytest.raises(DataError, match=r"teacher.checkpoint: file not found: .*nowhere.pt"):
        get_teacher(with_checkpoint(cfg, tmp_path / "nowhere.pt"), data)


def test_class_count_and_feature_dim_mismatches(tmp_path, trained):
    cfg, data, _, _ = trained
    state = build_teacher_model(cfg, data).state_dict()          # then a 4-class head
    state["head.weight"], state["head.bias"] = torch.zeros(4, 8), torch.zeros(4)
    path = tmp_path / "four.pt"
    torch.save(state, path)
    with pytest.raises(DataError) as ei:
        get_teacher(with_checkpoint(cfg, path), data)
    assert str(path) in str(ei.value)
    assert "head has 4 classes (head.weight [4, 8]), but 'synthetic/a' has 3 (c0, c1, c2)" in str(ei.value)
    # TorchScript: the head's classes, the features' dimension against model.teacher_feat_dim
    ts = tmp_path / "four.ts"
    save_script(ts, feat=12, k=4)
    with pytest.raises(DataError, match=r"four.ts: the teacher's head gives 4 classes, but 'synthetic/a' .* has 3"):
        get_teacher(with_checkpoint(cfg, ts, teacher_feat_dim=12), data)
    save_script(ts, feat=12, k=3)
    with pytest.raises(DataError, match=r"dimension 12, but model.teacher_feat_dim is 8; set model.teacher_feat_dim=12"):
        get_teacher(with_checkpoint(cfg, ts), data)


# --------------------------------------------------------------------------- TorchScript
def test_torchscript_teacher(tmp_path, trained):
    cfg, data, _, _ = trained
    path = tmp_path / "teacher.ts"
    module = save_script(path)
    cfg2 = with_checkpoint(cfg, path, teacher_feat_dim=12)
    teacher, info = get_teacher(cfg2, data)
    x = data.x[data.splits["test"]]
    with torch.no_grad():
        z, logits = teacher(x, return_features=True)
        assert torch.equal(z, module.features(x)) and torch.equal(logits, module(x))
        zs = torch.randn(5, 12)
        assert torch.equal(teacher.head(zs), module.head(zs))        # the head on any features (projected students)
    assert (teacher.feat_dim, teacher.num_classes) == (12, 3)
    assert info["checkpoint"]["format"] == "torchscript"
    y = data.y[data.splits["test"]]
    correct = int((logits.argmax(1) == y).sum())
    assert info["test_acc"] == pytest.approx(correct / len(y), abs=0.5 / len(y))   # k / n: within half an item
    # the distillers read it like a ucmkd teacher: one that applies the teacher head to student features
    res = run(with_checkpoint(cfg, path, method="ucmkd", teacher_feat_dim=12), teacher_data=data)
    assert res["teacher_test_acc"] == info["test_acc"]
    # methods that need the teacher's stage maps get an error naming the file
    from ucmkd.methods.reviewkd import probe_stages

    with pytest.raises(ConfigError, match=r"teacher.ts: this TorchScript teacher has no forward_stages"):
        probe_stages(teacher, "teacher")


def test_torchscript_without_features_or_head(tmp_path, trained):
    cfg, data, _, _ = trained
    path = tmp_path / "plain.ts"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(16, 3))), str(path))
    with pytest.raises(DataError, match=r"plain.ts: the TorchScript teacher has no features or head"):
        get_teacher(with_checkpoint(cfg, path), data)


# --------------------------------------------------------------------------- keys
def test_content_change_rekeys_teachers_runs_and_store_rows(tmp_path, trained):
    cfg, data, model, _ = trained
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    first = path.read_bytes()
    cfg2 = with_checkpoint(cfg, path)
    key1, tdir1 = run_key(cfg2), teacher_dir(cfg2, data)
    cell = Cell("s", "kd", 0, cfg2, tmp_path / "run")
    store = ResultStore(tmp_path / "results.jsonl")
    store.append({"setting": "s", "method": "kd", "seed": 0, "store_key": cell.store_key,
                  "config": asdict(cfg2), "test_acc": 0.5})
    assert store.find(cell) is not None

    other = {k: v + 1 for k, v in model.state_dict().items()}
    torch.save(other, path)                                  # the same path, another content
    assert run_key(cfg2) != key1 and teacher_dir(cfg2, data) != tdir1
    assert store.find(Cell("s", "kd", 0, cfg2, tmp_path / "run")) is None   # not matched by its config alone
    path.write_bytes(first)                                  # the content back: the key back
    assert run_key(cfg2) == key1 and teacher_dir(cfg2, data) == tdir1
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(path, moved)                                 # where the file lies is not part of the key
    assert run_key(with_checkpoint(cfg, moved)) == key1
    assert run_key(cfg) != key1


def test_configs_without_a_checkpoint_keep_their_keys():
    """Pinned before teacher.checkpoint existed: the run keys of fixed configs and a teacher key."""
    assert run_key(RunConfig()) == "5b269cb990"
    assert run_key(config()) == "1e01197ed4"
    stub = SimpleNamespace(name="synthetic/a", fingerprint={"sha256": "abc"}, input_shape=(16,), classes=["0", "1", "2"])
    assert content_key(teacher_key(RunConfig(), stub), n=10) == "700451225b"


# --------------------------------------------------------------------------- command line, suites
def test_cli_train_train_teacher_and_bench(tmp_path, trained, capsys):
    cfg, data, model, info = trained
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    args = ["data.teacher=synthetic/a", "data.student=synthetic/b", "data.synthetic.n_items=300",
            "data.synthetic.num_classes=3", f"data.cache_dir={cfg.data.cache_dir}", "model.teacher_width=8",
            "model.teacher_feat_dim=8", "model.student_width=8", "model.student_feat_dim=8", "optim.epochs=1",
            "optim.steps_per_epoch=2", "pairing.label_budget=5", "method.name=kd", f"teacher.checkpoint={path}"]
    assert main(["train", "--no-progress", *args]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["teacher_test_acc"] == info["test_acc"]
    assert main(["train-teacher", "--no-progress", *args]) == 0
    out = capsys.readouterr().out
    assert f"test acc {100 * info['test_acc']:.2f}% (as given, not trained)" in out and f"checkpoint: {path}" in out

    suite = {"name": "ck", "methods": ["ce", "kd"], "seeds": [0], "out_dir": str(tmp_path / "bench"),
             "base": deep_merge(TINY_BASE, {"teacher": {"checkpoint": str(path)}, "optim": {"epochs": 1},
                                       "data": {"cache_dir": cfg.data.cache_dir}}),
             "settings": {"mild": {"overrides": {}}}}
    (tmp_path / "ck.yaml").write_text(json.dumps(suite))
    assert main(["bench", str(tmp_path / "ck.yaml"), "--no-progress"]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "bench" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["ce", "kd"]
    assert all(r["teacher_test_acc"] == info["test_acc"] for r in rows)
