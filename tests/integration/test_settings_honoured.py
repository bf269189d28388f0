"""Every run setting takes effect on every path that trains: the Python API, ``ucmkd train``,
``ucmkd run`` (an experiment), ``ucmkd bench`` in-process and in worker processes, and cells
trained by torchrun. What a run trained with is read inside it (:meth:`Trainer.runtime`: torch's
thread count, the student's device, the autocast precision, the DataLoader processes reading
lazy batches, the logger) and stored in ``result.json`` and in every results row, next to the
library versions (:func:`ucmkd.provenance.versions`)."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from ucmkd.cli import main
from ucmkd.provenance import RECORDED, lock_status, read_lock, versions

from factories import TINY_BASE

# conftest runs the suite at 1 thread: 2 shows the setting was applied (spawned bench workers and
# torchrun ranks also start at 1 thread)
THREADS = 2
SETTINGS = {"threads": THREADS, "optim.precision": "bf16", "data.storage": "mmap", "data.workers": 1,
            "logging.tensorboard": True}
EXPECTED = {"threads": THREADS, "device": "cpu", "precision": "bf16", "data_workers": 1,
            "logger": "TensorBoardLogger"}


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _overrides() -> list[str]:
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in SETTINGS.items()]


def _flat_base() -> list[str]:
    out = []

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out.append(f"{prefix}{k}={v}")

    walk(TINY_BASE, "")
    return out


def _nested(base: dict, dotted: dict) -> dict:
    """A copy of ``base`` with the ``dotted`` keys set."""
    base = json.loads(json.dumps(base))
    for k, v in dotted.items():
        node = base
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return base


def _suite(tmp_path: Path) -> Path:
    p = tmp_path / "settings.yaml"
    p.write_text(yaml.safe_dump({"name": "settings", "methods": ["ce", "kd"], "seeds": [0],
                                 "base": _nested(TINY_BASE, SETTINGS),
                                 "settings": {"one": {"overrides": {}}}}))
    return p


def _check(res: dict, world_size: int = 1) -> None:
    assert res["runtime"] == {**EXPECTED, "world_size": world_size}, res["runtime"]
    assert res["versions"] == versions()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_python_api(tmp_path):
    import ucmkd
    from ucmkd.config import RunConfig, load_config

    cfg = load_config(RunConfig, None, _flat_base() + _overrides() + [f"data.cache_dir={tmp_path / 'cache'}"])
    res = ucmkd.run(cfg, run_dir=tmp_path / "run")
    _check(res)
    stored = json.loads((tmp_path / "run" / "result.json").read_text())
    assert stored["runtime"] == res["runtime"] and stored["versions"] == res["versions"]


@pytest.mark.slow
def test_cli_train(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress", *_flat_base(), *_overrides()]) == 0, \
        capsys.readouterr().err
    _check(json.loads((tmp_path / "run" / "result.json").read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_cli_bench_in_process_and_in_workers(tmp_path, capsys, workers):
    out = tmp_path / "out"
    assert main(["bench", str(_suite(tmp_path)), "--out", str(out), "--workers", str(workers), "--no-progress"]) == 0, \
        capsys.readouterr().err
    rows = _rows(out)
    assert len(rows) == 2
    for r in rows:
        _check(r)


@pytest.mark.slow
def test_cli_run_experiment(tmp_path, capsys):
    from test_cli_run import TINY

    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({**TINY, "methods": ["ce"], "seeds": [0], "variants": {}, "method_params": {},
                                   "base": _nested({**TINY["base"]}, SETTINGS)}))
    assert main(["run", str(exp), "--out", str(tmp_path / "out"), "--no-progress"]) == 0, capsys.readouterr().err
    rows = _rows(tmp_path / "out")
    assert rows
    for r in rows:
        _check(r)


@pytest.mark.slow
def test_torchrun_cells(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["bench", str(_suite(tmp_path)), "--out", str(out), "--nproc-per-cell", "2", "--no-progress",
                 "methods=[ce]", "base.pairing.label_budget=4"])   # 12 labelled items: 2 equal shards
    assert code == 0, capsys.readouterr().err
    (row,) = _rows(out)
    _check(row, world_size=2)


def test_versions_name_the_libraries_and_the_lock(tmp_path):
    v = versions()
    assert v["ucmkd"].startswith("ucmkd ") and v["torch"] == torch.__version__
    assert set(RECORDED) <= set(v) and all(v[k] for k in RECORDED)
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"# a comment\n--index-url https://example.invalid\ntorch=={torch.__version__.split('+')[0]}\n"
                    f"numpy=={v['numpy']}  # pinned\n")
    assert read_lock(lock) == {"torch": torch.__version__.split("+")[0], "numpy": v["numpy"]}
    assert lock_status(lock).startswith("requirements.lock@")
    lock.write_text("numpy==0.0.1\nno-such-package==1.0\n")
    assert lock_status(lock) == f"unlocked (no-such-package missing != 1.0, numpy {v['numpy']} != 0.0.1)"
    assert lock_status(tmp_path / "absent.lock") == "no lock file"
