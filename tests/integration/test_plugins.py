"""Plugins (ucmkd.plugins): user code the CLI, ``ucmkd.run``, bench workers and torchrun ranks
import (``--plugin``, ``plugins:`` in YAML, entry points), and whose source is part of the run
and store keys, so that an edited method re-runs and nothing else does."""
import hashlib
import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import yaml

import ucmkd
from ucmkd import plugins as plugins_mod
from ucmkd.api import key_config, prepare, run_key
from ucmkd.cli import main
from ucmkd.config import RunConfig, from_dict, load_config, to_dict
from ucmkd.errors import ConfigError
from ucmkd.grid import Cell, ResultStore, cell_context
from ucmkd.methods import METHODS, register_method
from ucmkd.methods.ce import CE
from ucmkd.plugins import digest, load_plugins, user_code

from factories import TINY_BASE


def plugin_source(prefix: str, weight: str = "0.5") -> str:
    """A plugin registering two 3-class vector datasets ``<prefix>/a`` (6 features) and
    ``<prefix>/b`` (10 features) and a method ``<prefix>-ce``: cross-entropy scaled by WEIGHT."""
    return f'''
import numpy as np

from ucmkd.data import RawModality, register_dataset
from ucmkd.methods import DistillOutput, register_method
from ucmkd.methods.ce import CE

WEIGHT = {weight}


def _make(dim, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(150) % 3
    x = (rng.normal(size=(150, dim)) + 2.0 * np.eye(3, dim)[y]).astype(np.float32)
    return RawModality(x=x, y=y, classes=["r", "g", "b"], kind="vector")


@register_dataset("{prefix}/a")
def _a(cfg):
    return _make(6, 0)


@register_dataset("{prefix}/b")
def _b(cfg):
    return _make(10, 1)


@register_method("{prefix}-ce")
class ScaledCE(CE):
    def forward(self, batch):
        out = super().forward(batch)
        return DistillOutput(out.logits, {{k: WEIGHT * v for k, v in out.losses.items()}})
'''


def tiny_base(prefix: str) -> dict:
    return {**TINY_BASE, "data": {"teacher": f"{prefix}/a", "student": f"{prefix}/b"}}


def write_plugin(path: Path, prefix: str, weight: str = "0.5") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plugin_source(prefix, weight))
    return path


@pytest.fixture(autouse=True)
def _own_plugin_list(monkeypatch):
    """Each test sees the plugins it loads (bench workers are given the list): not other tests'."""
    monkeypatch.setattr(plugins_mod, "_LOADED", dict(plugins_mod._LOADED))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- keys
def test_configs_without_plugins_keep_their_keys():
    """Pinned before plugins existed: configs using ucmkd's code alone keep their run and store keys."""
    assert run_key(RunConfig()) == "5b269cb990"
    cfg = from_dict(RunConfig, TINY_BASE)
    assert run_key(cfg) == "626b16518e"
    assert Cell("mild", "ce", 0, cfg, Path("x")).store_key == "mild|ce|626b16518e"
    assert "user_code" not in key_config(cfg) and "plugins" not in key_config(cfg)
    # the run directory's content key (config, data fingerprints, student architecture), pinned too
    assert prepare(cfg).key == "09d9d812e78c"


def test_a_method_registered_from_python_is_keyed_by_its_file():
    """No plugin spec (a script or notebook): the file defining the class enters the key."""
    name = "plugins-test-direct"
    if name not in METHODS:
        @register_method(name)
        class Direct(CE):
            pass
    cfg = from_dict(RunConfig, {**TINY_BASE, "method": {"name": name}})
    assert user_code(key_config(cfg)) == {f"method {name}": digest([sha(Path(__file__))])}
    assert key_config(cfg)["user_code"] == user_code(key_config(cfg))
    plain = from_dict(RunConfig, TINY_BASE)
    assert run_key(cfg) != run_key(plain)


def test_store_rows_of_other_plugin_code_never_match(tmp_path):
    write_plugin(tmp_path / "p.py", "plug-store")
    (plugin,) = load_plugins([str(tmp_path / "p.py")])
    cfg = from_dict(RunConfig, {**tiny_base("plug-store"), "method": {"name": "plug-store-ce"}})
    code = key_config(cfg)["user_code"]
    assert code == {"p.py": plugin.digest} and plugin.digest == digest([sha(tmp_path / "p.py")])
    cell = Cell("s", "m", 0, cfg, tmp_path / "run")
    plain = Cell("s", "m", 0, from_dict(RunConfig, tiny_base("plug-store")), tmp_path / "run2")
    assert key_config(plain.cfg).get("user_code") is None       # the plugin's datasets: keyed by content
    store = ResultStore(tmp_path / "results.jsonl")
    base_row = {"setting": "s", "method": "m", "seed": 0, "test_acc": 0.5}
    # a row written before user_code existed (config-compatible, another store key): not this cell's ...
    store.append({**base_row, "store_key": "old", "config": to_dict(cell.cfg)})
    assert store.find(cell) is None
    # ... but a cell without plugin code may reuse it (config fallback)
    store.append({**base_row, "store_key": "old2", "config": to_dict(plain.cfg)})
    assert store.find(plain)["store_key"] == "old2"
    # a row recorded with other code under this very store key is not a match either
    store.append({**base_row, "store_key": cell.store_key, "config": to_dict(cell.cfg), "user_code": {"p.py": "x"}})
    assert store.find(cell) is None
    store.append({**base_row, "store_key": cell.store_key, "config": to_dict(cell.cfg), "user_code": code})
    assert store.find(cell)["user_code"] == code


def test_a_plugin_backbone_enters_the_teacher_key(tmp_path):
    from ucmkd.data import load_modality
    from ucmkd.engine.teacher import teacher_key

    (tmp_path / "bb.py").write_text("from ucmkd.models.backbones import BACKBONES, mlp\n\n"
                                    "BACKBONES.register('plug-bb')(lambda input_shape, **kw: mlp(input_shape, **kw))\n")
    (p,) = load_plugins([str(tmp_path / "bb.py")])
    cfg = from_dict(RunConfig, TINY_BASE)
    data = load_modality("synthetic/a", cfg.data)
    assert "user_code" not in teacher_key(cfg, data)
    cfg.model.teacher_backbone = "plug-bb"
    assert teacher_key(cfg, data)["user_code"] == {"bb.py": p.digest}


# --------------------------------------------------------------------------- loading
def test_loading_is_idempotent_and_an_edit_reloads(tmp_path, monkeypatch):
    path = write_plugin(tmp_path / "idem.py", "plug-idem")
    monkeypatch.chdir(tmp_path)
    (a,) = load_plugins(["./idem.py"])
    (b,) = load_plugins([str(path)])                  # the same file: not imported (nor registered) twice
    assert a is b and a.spec == str(path.resolve()) and a.label == "idem.py"
    assert a.provides == {("dataset", "plug-idem/a"), ("dataset", "plug-idem/b"), ("method", "plug-idem-ce")}
    assert sys.modules[a.module].WEIGHT == 0.5
    write_plugin(path, "plug-idem", weight="0.125")   # edited: imported again, its entries replaced
    (c,) = load_plugins([str(path)])
    assert c.digest == digest([sha(path)]) != a.digest
    assert sys.modules[c.module].WEIGHT == 0.125 and METHODS.get("plug-idem-ce").__module__ == c.module


def test_a_package_plugin_hashes_every_file(tmp_path, monkeypatch):
    pkg = tmp_path / "src" / "plugpkg"
    write_plugin(pkg / "impl.py", "plug-pkg")
    (pkg / "helpers.py").write_text("SCALE = 1\n")
    (pkg / "__init__.py").write_text("from . import impl  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    (p,) = load_plugins(["plugpkg"])
    assert p.label == "plugpkg" and len(p.files) == 3
    assert p.digest == digest(sha(pkg / f) for f in ("__init__.py", "helpers.py", "impl.py"))
    cfg = from_dict(RunConfig, {**tiny_base("plug-pkg"), "method": {"name": "plug-pkg-ce"}})
    before = key_config(cfg)["user_code"]
    (pkg / "helpers.py").write_text("SCALE = 20\n")    # a file that registers nothing (edits change sizes here:
    # a same-size edit within the file system's clock tick would not be seen in this process)
    (q,) = load_plugins(["plugpkg"])
    assert q.digest != p.digest and key_config(cfg)["user_code"] == {"plugpkg": q.digest} != before


def test_missing_and_failing_plugins_are_named(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"plugin '.*nope\.py' \(--plugin\): no such file or directory"):
        load_plugins(["nope.py"], base_dir=tmp_path, where="--plugin")
    with pytest.raises(ConfigError, match="no module named 'no_such_plugin_module'"):
        load_plugins(["no_such_plugin_module"])
    bad = tmp_path / "bad.py"
    bad.write_text("from ucmkd.methods import register_method\nfrom ucmkd.methods.ce import CE\n\n"
                   "register_method('plug-bad-ce')(type('B', (CE,), {}))\nraise RuntimeError('boom')\n")
    with pytest.raises(ConfigError) as e:
        load_plugins([str(bad)])
    bad = bad.resolve()
    assert f"plugin {str(bad)!r} failed to import: RuntimeError: boom (at {bad}:5)" in str(e.value)
    assert isinstance(e.value.__cause__, RuntimeError)
    assert "plug-bad-ce" not in METHODS                 # what it registered before failing is undone
    assert main(["list", "--plugin", str(tmp_path / "gone.py")]) == 2
    assert f"plugin '{(tmp_path / 'gone.py').resolve()}' (--plugin): no such file" in capsys.readouterr().err


def test_entry_points_are_loaded_by_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "plug_ep_mod.py").write_text(
        "from ucmkd.methods import register_method\nfrom ucmkd.methods.ce import CE\n\n\ndef register():\n"
        "    register_method('plug-ep-ce')(type('EP', (CE,), {}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def fake(group=None, **kw):
        seen.append(group)
        return [EntryPoint(name="demo", value="plug_ep_mod:register", group=group)] if group == "ucmkd.plugins" else []

    monkeypatch.setattr("importlib.metadata.entry_points", fake)
    assert main(["list"]) == 0 and main(["list"]) == 0        # loaded by each, imported once
    assert seen == ["ucmkd.plugins", "ucmkd.plugins"]
    assert "plug-ep-ce" in capsys.readouterr().out.split("methods:")[1].splitlines()[0]
    assert "plug_ep_mod:register" in plugins_mod.loaded_specs()


def test_yaml_plugins_are_read_against_the_file_and_loaded_before_validation(tmp_path, monkeypatch):
    from ucmkd.config import ExperimentConfig, SuiteConfig
    from ucmkd.experiment import validate_experiment

    write_plugin(tmp_path / "cfg" / "lib" / "yaml_plugin.py", "plug-yaml")
    (tmp_path / "cfg" / "exp.yaml").write_text(yaml.safe_dump(
        {"plugins": ["lib/yaml_plugin.py"], "methods": ["ce", "plug-yaml-ce"], "directions": [["plug-yaml/a", "plug-yaml/b"]]}))
    (tmp_path / "cfg" / "suite.yaml").write_text(yaml.safe_dump(
        {"base": {"plugins": ["./lib/yaml_plugin.py"], "method": {"name": "plug-yaml-ce"}}}))
    monkeypatch.chdir(tmp_path)                       # elsewhere: the paths are the YAML file's
    absolute = str((tmp_path / "cfg" / "lib" / "yaml_plugin.py").resolve())
    exp = load_config(ExperimentConfig, tmp_path / "cfg" / "exp.yaml")
    assert exp.plugins == [absolute]
    validate_experiment(exp)                          # the plugin's method validates
    suite = load_config(SuiteConfig, tmp_path / "cfg" / "suite.yaml")
    assert suite.base.plugins == [absolute] and suite.base.method.name == "plug-yaml-ce"
    with pytest.raises(ConfigError, match=r"suite\.yaml: plugin '.*missing\.py' \(base\.plugins\): no such file"):
        load_config(SuiteConfig, tmp_path / "cfg" / "suite.yaml", ["base.plugins=[missing.py]"])


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_bench_workers_run_plugin_code_and_rerun_it_when_edited(tmp_path, capsys):
    plugin = write_plugin(tmp_path / "suite" / "my_plugin.py", "plug-bench")
    suite = {"name": "plug", "methods": ["ce", "plug-bench-ce"], "seeds": [0], "base": tiny_base("plug-bench"),
             "settings": {"toy": {"overrides": {}}}, "plugins": ["my_plugin.py"]}     # read against the YAML's dir
    path = tmp_path / "suite" / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    args = ["bench", str(path), "--out", str(out), "--workers", "2", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    first = rows(out / "results.jsonl")
    assert sorted(r["method"] for r in first) == ["ce", "plug-bench-ce"]
    by = {r["method"]: r for r in first}
    old = digest([sha(plugin)])
    assert by["ce"]["user_code"] == {} and by["plug-bench-ce"]["user_code"] == {"my_plugin.py": old}
    result = json.loads((out / "runs" / "toy" / "plug-bench-ce" / "seed0" / "result.json").read_text())
    assert result["user_code"] == {"my_plugin.py": old}
    assert main(args) == 0                                 # nothing re-runs
    assert len(rows(out / "results.jsonl")) == 2
    write_plugin(plugin, "plug-bench", weight="0.25")
    assert main(args) == 0, capsys.readouterr().err        # the edited method's cell re-runs, ce's does not
    new = rows(out / "results.jsonl")[2:]
    assert [r["method"] for r in new] == ["plug-bench-ce"]
    assert new[0]["user_code"] == {"my_plugin.py": digest([sha(plugin)])} != {"my_plugin.py": old}
    assert list((out / "runs" / "toy" / "plug-bench-ce").glob("seed0.stale-*"))   # the old run, set aside


@pytest.mark.slow
def test_train_with_plugin_option_and_yaml_plugins(tmp_path, monkeypatch, capsys):
    plugin = write_plugin(tmp_path / "code" / "train_plugin.py", "plug-train")
    monkeypatch.chdir(tmp_path)
    args = ["--no-progress", "method.name=plug-train-ce", *(f"{k}={json.dumps(v)}" for k, v in [
        ("data", tiny_base("plug-train")["data"]), ("optim", TINY_BASE["optim"]), ("model", TINY_BASE["model"]),
        ("pairing", TINY_BASE["pairing"])])]
    assert main(["--plugin", "code/train_plugin.py", "train", *args]) == 0, capsys.readouterr().err
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "plug-train-ce" and res["user_code"] == {"train_plugin.py": digest([sha(plugin)])}
    # plugins: in a run YAML, relative to the YAML file, honoured by ucmkd.run too
    (tmp_path / "code" / "run.yaml").write_text(yaml.safe_dump({**tiny_base("plug-train"), "plugins": ["train_plugin.py"],
                                                                "method": {"name": "plug-train-ce"}}))
    cfg = load_config(RunConfig, tmp_path / "code" / "run.yaml")
    assert cfg.plugins == [str(plugin.resolve())]
    assert ucmkd.run(cfg)["user_code"] == res["user_code"]


@pytest.mark.slow
def test_a_torchrun_rank_imports_the_plugins_it_is_given(tmp_path):
    """``python -m ucmkd.cell`` (what torchrun starts on every rank) in a fresh process: the plugin
    comes from CELL.json, nothing else."""
    plugin = write_plugin(tmp_path / "rank_plugin.py", "plug-rank")
    load_plugins([str(plugin)])
    cfg = to_dict(from_dict(RunConfig, {**tiny_base("plug-rank"), "method": {"name": "plug-rank-ce"}}))
    spec = tmp_path / "cell.json"
    spec.write_text(json.dumps({"config": cfg, "plugins": [str(plugin)]}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ucmkd.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "ucmkd.cell", str(spec), str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["method"] == "plug-rank-ce" and res["user_code"] == {"rank_plugin.py": digest([sha(plugin)])}
    assert cell_context(from_dict(RunConfig, cfg)).key == res["key"]     # the key this process computes
