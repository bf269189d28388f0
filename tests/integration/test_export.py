"""Taking the student away: load_student, export_student (state_dict, TorchScript), ucmkd export."""
import pytest
import torch

import ucmkd
from ucmkd.api import load_pair, run
from ucmkd.cli import main
from ucmkd.data import load_modality
from ucmkd.data.standardize import Standardizer
from ucmkd.engine import get_teacher
from ucmkd.errors import DataError
from ucmkd.export import ExportedStudent, export_student, load_exported
from ucmkd.engine.shadow import CEShadow
from ucmkd.models import build_classifier

from factories import small_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished ucmkd run (its CE shadow selected, so the loaded weights are not the distilled
    student's) and the result it returned."""
    cfg = small_config("ucmkd", epochs=2)
    cfg.data.cache_dir = str(tmp_path_factory.mktemp("cache"))
    student, teacher_data = load_pair(cfg)
    teacher, info = get_teacher(cfg, teacher_data)
    d = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setattr(CEShadow, "select", lambda self, records, chosen: "fallback")
    try:
        res = run(cfg, run_dir=d, student=student, teacher_data=teacher_data, teacher=teacher, teacher_info=info)
    finally:
        mp.undo()
    return cfg, d, res, student


def _val(student):
    return student.split("val")[0]


def test_load_student_gives_the_runs_returned_student(finished):
    cfg, d, res, student = finished
    assert res["selected"] == "fallback"
    loaded = ucmkd.load_student(d)
    assert loaded.selected == "fallback" and not loaded.model.training
    assert type(loaded.model) is type(res["distiller"].student)
    assert not hasattr(loaded.model, "teacher") and loaded.config.method.name == "ucmkd"
    x = _val(student)
    ref = res["distiller"].student.eval()(x)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), ref)
    # the shadow's weights, not the distilled student's (which differ after training)
    distilled = res["distiller"].extra["fallback"]
    assert torch.equal(loaded.model.head.weight, distilled.head.weight)
    assert loaded.classes == list(student.classes)


def test_load_student_brings_the_standardisation(finished):
    _, d, _, student = finished
    loaded = ucmkd.load_student(d)
    ref = Standardizer.load(d, "student")
    assert loaded.standardizer.mode == ref.mode != "none"
    assert torch.equal(loaded.standardizer.mean, student.standardizer.mean)
    raw = torch.randn(5, *student.input_shape, dtype=torch.float64).to(torch.float32)
    assert torch.equal(loaded.predict_raw(raw), loaded.model((raw - ref.mean) / ref.std))


def test_state_dict_export_loads_with_plain_torch(finished, tmp_path):
    _, d, _, student = finished
    out = export_student(d, "state_dict", tmp_path / "s.pt")
    blob = torch.load(out["path"], weights_only=True)        # plain types only
    a = blob["architecture"]
    model = build_classifier(tuple(a["input_shape"]), a["kind"], a["num_classes"], a["backbone"], a["width"],
                             a["feat_dim"], backbone_args=a["backbone_args"])
    model.load_state_dict(blob["state_dict"], strict=True)
    model.eval()
    x = _val(student)
    loaded = ucmkd.load_student(d)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
        m2, std, classes = load_exported(out["path"])
        assert torch.equal(m2(x), loaded.model(x)) and classes == loaded.classes
    assert std.mode == loaded.standardizer.mode and torch.equal(std.std, loaded.standardizer.std)


def test_torchscript_export_round_trips_exactly(finished, tmp_path):
    _, d, _, student = finished
    out = export_student(d, "torchscript", tmp_path / "s.ts")
    assert out["how"] == "script"
    m = torch.jit.load(out["path"])
    loaded = ucmkd.load_student(d)
    x = _val(student)
    with torch.no_grad():
        assert torch.equal(m(x), loaded.model(x))
        raw = x * 3.0 + 1.0
        assert torch.equal(m.predict_raw(raw), loaded.predict_raw(raw))
    assert list(m.input_shape) == list(student.input_shape) and list(m.classes) == loaded.classes
    with pytest.raises(Exception, match="input shape"):
        m(torch.zeros(2, 3))


@pytest.mark.parametrize("backbone,shape,kind", [("mlp", (12,), "vector"), ("plain-mlp", (12,), "vector"),
                                                 ("cnn1d", (1, 40), "signal"), ("cnn2d", (1, 8, 8), "image")])
def test_every_builtin_backbone_scripts_exactly(backbone, shape, kind):
    torch.manual_seed(0)
    model = build_classifier(shape, kind, 4, backbone, width=8, feat_dim=6).eval()
    x = torch.randn(7, *shape)
    scripted = torch.jit.script(ExportedStudent(model, Standardizer.identity(), list("abcd")).eval())
    with torch.no_grad():
        assert torch.equal(scripted(x), model(x))
        assert torch.equal(scripted.features(x), model.encoder(x))


class Unscriptable(torch.nn.Module):
    """A user encoder TorchScript cannot compile (``**kwargs``), traceable all the same."""

    def __init__(self, d_in, d):
        super().__init__()
        self.lin = torch.nn.Linear(d_in, d)

    def forward(self, x, **unused):
        return torch.relu(self.lin(x.flatten(1)))


def test_an_unscriptable_encoder_is_traced(tmp_path):
    from ucmkd.models import Classifier

    cfg = small_config("ce", epochs=1)
    student, teacher_data = load_pair(cfg)

    def build():
        torch.manual_seed(0)
        return Classifier(Unscriptable(student.input_shape[0], 8), 8, student.num_classes, student.input_shape)

    with pytest.raises(Exception):
        torch.jit.script(build().encoder)
    run(cfg, run_dir=tmp_path / "r", student=student, teacher_data=teacher_data, student_model=build())
    out = export_student(tmp_path / "r", "torchscript", tmp_path / "t.ts", model=build())
    assert out["how"] == "trace"
    m = torch.jit.load(out["path"])
    x = _val(student)
    with torch.no_grad():
        assert torch.equal(m(x), ucmkd.load_student(tmp_path / "r", model=build()).model(x))


def test_a_user_built_student_must_be_given_again(tmp_path):
    cfg = small_config("ce", epochs=1)
    student, teacher_data = load_pair(cfg)
    torch.manual_seed(0)
    mine = build_classifier(student.input_shape, student.kind, student.num_classes, "plain-mlp", width=8, feat_dim=8)
    run(cfg, run_dir=tmp_path / "r", student=student, teacher_data=teacher_data, student_model=mine)
    with pytest.raises(DataError, match="model=") as e:
        ucmkd.load_student(tmp_path / "r")
    assert "student" in str(e.value)
    again = build_classifier(student.input_shape, student.kind, student.num_classes, "plain-mlp", width=8, feat_dim=8)
    loaded = ucmkd.load_student(tmp_path / "r", model=again)
    x = _val(student)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), mine.eval()(x))


def test_unfinished_or_missing_runs_are_named(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ucmkd.load_student(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="has not finished"):
        ucmkd.load_student(tmp_path / "half")


def test_cli_export(finished, tmp_path, capsys):
    _, d, _, student = finished
    assert main(["export", str(d), "--format", "torchscript", "--out", str(tmp_path / "cli.ts")]) == 0
    assert "torch.jit.load" in capsys.readouterr().out
    m = torch.jit.load(str(tmp_path / "cli.ts"))
    x = _val(student)
    with torch.no_grad():
        assert torch.equal(m(x), ucmkd.load_student(d).model(x))
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
