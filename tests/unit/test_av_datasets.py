"""Audio-visual dataset adapters (RAVDESS, CREMA-D, AVE, VGGSound) on tiny fixtures written in
each on-disk layout: shapes, classes, splits, pairs, caching, errors, and a short distillation."""
import dataclasses
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ucmkd.api import run
from ucmkd.config import AVConfig, DataConfig, PairingConfig, RunConfig, load_config
from ucmkd.data import DATASETS, PRESETS, PairingSampler, load_modality
from ucmkd.data.av import fit_length, pick_frames
from ucmkd.errors import ConfigError, DataError

F_BINS = 8            # audio feature bins
SRC = 16              # fixture frame size (JPEG, pixels)
AV = AVConfig(image_size=8, frames=2)
FAMILIES = ("ravdess", "cremad", "ave", "vggsound")


# --------------------------------------------------------------------------- fixture builders
def _jpeg(path, rng, tint):
    px = rng.integers(0, 160, (SRC, SRC, 3)).astype(np.uint8) + np.uint8(40 * tint)
    Image.fromarray(px).save(path, quality=90)


def _feat(rng, ci, j):
    """[F, T] features with a class-dependent offset; T varies with j (10..13)."""
    return (rng.standard_normal((F_BINS, 10 + j % 4)) + ci).astype(np.float32)


def _frame_folder(folder, rng, ci, n=3):
    folder.mkdir(parents=True)
    for k in range(n):
        _jpeg(folder / f"{k + 1:05d}.jpg", rng, ci)


def make_ravdess(root, seed=0, per_split=(("train", 4), ("val", 1), ("test", 2))):
    """RAVDESS: data_file/spa_{dl,val,test}.csv (audio_name,image_name,label), aud_features/*.npy,
    vid_features/*.jpg; integer labels 1, 2, 10 (sorted numerically)."""
    rng = np.random.default_rng(seed)
    for d in ("aud_features", "vid_features", "data_file"):
        (root / d).mkdir(parents=True)
    fname = {"train": "spa_dl.csv", "val": "spa_val.csv", "test": "spa_test.csv"}
    for split, n in per_split:
        rows = []
        for ci, label in enumerate(("1", "2", "10")):
            for j in range(n):
                name = f"{split}_{label}_{j}"
                np.save(root / "aud_features" / f"{name}.npy", _feat(rng, ci, j))
                _jpeg(root / "vid_features" / f"{name}.jpg", rng, ci)
                rows.append(f"{name}.npy,{name}.jpg,{label}\n")
        (root / "data_file" / fname[split]).write_text("".join(rows))
    return root


def _pickled_clip(root, audio_dir, frame_dir, cid, rng, ci, j):
    """One clip of the pickled-feature layouts: <audio_dir>/<cid>.pkl and <frame_dir>/<cid>/ frames."""
    with open(root / audio_dir / f"{cid}.pkl", "wb") as f:
        pickle.dump(_feat(rng, ci, j), f)
    _frame_folder(root / frame_dir / cid, rng, ci)


def make_cremad(root, seed=0):
    """CREMA-D: stat.csv (class list), train.csv/test.csv (id,class), Audio-1004/<id>.pkl,
    Image-01-FPS/<id>/ frames. No validation list."""
    rng = np.random.default_rng(seed)
    classes = ("NEU", "HAP", "ANG")
    (root / "Audio-1004").mkdir(parents=True)
    (root / "stat.csv").write_text("".join(f"{c}\n" for c in classes))
    for split, n in (("train", 4), ("test", 2)):
        rows = []
        for ci, c in enumerate(classes):
            for j in range(n):
                cid = f"10{ci}{j}_{split}_{c}"
                _pickled_clip(root, "Audio-1004", "Image-01-FPS", cid, rng, ci, j)
                rows.append(f"{cid},{c}\n")
        (root / f"{split}.csv").write_text("".join(rows))
    return root


def make_set_lists(root, seed=0, classes=("Dog", "Church bell", "Acoustic guitar"), with_val=True):
    """AVE / VGGSound: {train,val,test}Set.txt lines class&id&..., Audio-1004-SE/<id>.pkl,
    Image-01-FPS-SE/<id>/ frames."""
    rng = np.random.default_rng(seed)
    (root / "Audio-1004-SE").mkdir(parents=True)
    splits = (("train", 4), ("val", 1), ("test", 2)) if with_val else (("train", 4), ("test", 2))
    for split, n in splits:
        lines = []
        for ci, c in enumerate(classes):
            for j in range(n):
                cid = f"{split[:2]}{ci}{j}xYz"
                _pickled_clip(root, "Audio-1004-SE", "Image-01-FPS-SE", cid, rng, ci, j)
                lines.append(f"{c}&{cid}&good&0&10\n")
        (root / f"{split}Set.txt").write_text("".join(lines))
    return root


def make_ave(root, seed=0):
    return make_set_lists(root, seed)


def make_vggsound(root, seed=0):
    return make_set_lists(root, seed, classes=("playing piano", "dog barking", "rain"), with_val=False)


BUILDERS = {"ravdess": make_ravdess, "cremad": make_cremad, "ave": make_ave, "vggsound": make_vggsound}
EXPECTED = {  # classes, has its own val list, frames per clip in the fixture
    "ravdess": (["1", "2", "10"], True),
    "cremad": (["ANG", "HAP", "NEU"], False),
    "ave": (["Dog", "Church bell", "Acoustic guitar"], True),
    "vggsound": (["playing piano", "dog barking", "rain"], False),
}


def data_cfg(tmp_path, family, root, **av):
    return DataConfig(cache_dir=str(tmp_path / "cache"), roots={family: str(root)},
                      av=dataclasses.replace(AV, **av))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each family's fixture and both loaded modalities (built once for the module)."""
    out = {}
    for fam, make in BUILDERS.items():
        base = tmp_path_factory.mktemp(fam)
        root = make(base / "root")
        cfg = data_cfg(base, fam, root)
        out[fam] = (root, cfg, load_modality(f"{fam}/audio", cfg), load_modality(f"{fam}/visual", cfg))
    return out


# --------------------------------------------------------------------------- shapes, classes, splits, pairs
def test_registered_names():
    for fam in FAMILIES:
        assert f"{fam}/audio" in DATASETS and f"{fam}/visual" in DATASETS


@pytest.mark.parametrize("fam", FAMILIES)
def test_shapes_classes_splits_pairs(built, fam):
    _, _, audio, visual = built[fam]
    classes, has_val = EXPECTED[fam]
    n_train, n_val, n_test = 12, (3 if has_val else 0), 6
    n = n_train + n_val + n_test
    assert audio.kind == visual.kind == "image"
    assert audio.input_shape == (1, F_BINS, 13)             # longest clip (T = 10..13), others padded
    assert visual.input_shape == (3 * AV.frames, AV.image_size, AV.image_size)
    assert len(audio.y) == len(visual.y) == n
    assert audio.classes == visual.classes == classes
    assert torch.equal(audio.y, visual.y)
    assert torch.equal(audio.pair_id, visual.pair_id) and torch.equal(audio.pair_id, torch.arange(n))
    for k in ("train", "val", "test"):
        assert torch.equal(audio.splits[k], visual.splits[k])
    # clips are indexed in list order: train list, then val list, then test list
    assert torch.equal(audio.splits["test"], torch.arange(n - n_test, n))      # the dataset's test list
    if has_val:
        assert torch.equal(audio.splits["val"], torch.arange(n_train, n_train + n_val))
    else:                                                                      # carved from train
        tv = torch.cat([audio.splits["train"], audio.splits["val"]]).sort().values
        assert torch.equal(tv, torch.arange(n_train)) and len(audio.splits["val"]) >= 1
    assert set(audio.y[audio.splits["test"]].tolist()) == {0, 1, 2}
    assert torch.isfinite(audio.x).all() and torch.isfinite(visual.x).all()


def test_class_label_follows_list(built):
    """y indexes the class list: RAVDESS label '10' sorts after '2' (numeric); AVE keeps the
    order of first appearance in testSet.txt."""
    _, _, audio, _ = built["ravdess"]
    assert audio.classes[audio.y[0]] == "1" and audio.classes[audio.y[-1]] == "10"
    _, _, audio, _ = built["ave"]
    assert audio.classes[audio.y[0]] == "Dog"


def test_audio_length_option_and_rules(tmp_path, built):
    root, _, _, _ = built["cremad"]
    a = load_modality("cremad/audio", data_cfg(tmp_path, "cremad", root, audio_length=5))
    assert a.input_shape == (1, F_BINS, 5)
    a = load_modality("cremad/audio", data_cfg(tmp_path, "cremad", root, audio_length=5, audio_size=6))
    assert a.input_shape == (1, 6, 6)
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    assert fit_length(x, 2).tolist() == [[[0, 1], [3, 4]]]                   # crop keeps the start
    assert fit_length(x, 5).tolist() == [[[0, 1, 2, 0, 1], [3, 4, 5, 3, 4]]]  # pad wraps around
    assert pick_frames(3, 1) == [1] and pick_frames(10, 2) == [2, 7] and pick_frames(1, 3) == [0, 0, 0]


def test_channel_last_features_and_optional_class_list(tmp_path):
    from ucmkd.data.av import LAYOUTS, read_audio

    bgr = np.stack([np.full((4, 5), v, np.float32) for v in (0, 1, 2)], axis=-1)   # [F, T, 3] BGR
    np.save(tmp_path / "c.npy", bgr)
    a = read_audio(LAYOUTS["ravdess"], tmp_path / "c.npy")
    assert a.shape == (3, 4, 5) and a[:, 0, 0].tolist() == [2, 1, 0]               # -> RGB, channel-first
    root = make_cremad(tmp_path / "root")
    (root / "stat.csv").unlink()                                                    # classes: sorted train labels
    assert load_modality("cremad/audio", data_cfg(tmp_path, "cremad", root)).classes == ["ANG", "HAP", "NEU"]


def test_frames_and_grayscale(tmp_path, built):
    root, _, _, _ = built["ave"]
    v = load_modality("ave/visual", data_cfg(tmp_path, "ave", root, frames=3, grayscale=True, image_size=6))
    assert v.input_shape == (3, 6, 6)


# --------------------------------------------------------------------------- pairing
def _row_index(x_all, rows):
    flat = x_all.reshape(len(x_all), -1)
    return [int(torch.nonzero((flat == r.reshape(1, -1)).all(1))[0]) for r in rows]


def test_paired_mode_gives_true_pairs(built):
    _, _, audio, visual = built["ave"]
    sampler = PairingSampler(visual, audio, PairingConfig(mode="paired", label_budget=None), batch_size=5, seed=3)
    for batch in sampler.epoch(0):
        si = _row_index(visual.x, batch.xs)
        ti = _row_index(audio.x, batch.xt)
        assert visual.pair_id[si].tolist() == audio.pair_id[ti].tolist()
        assert torch.equal(batch.ys, batch.yt)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_all_pairing_presets_sample(built, preset):
    _, _, audio, visual = built["ravdess"]
    cfg = PairingConfig(label_budget=None, **PRESETS[preset])
    batch = next(iter(PairingSampler(audio, visual, cfg, batch_size=4, seed=0).epoch(0)))
    assert batch.xs.shape[1:] == audio.x.shape[1:] and batch.xt.shape[1:] == visual.x.shape[1:]


# --------------------------------------------------------------------------- cache
def test_second_load_uses_cache(tmp_path, monkeypatch):
    root = make_ravdess(tmp_path / "root")
    cfg = data_cfg(tmp_path, "ravdess", root)
    first = load_modality("ravdess/visual", cfg)
    files = sorted((tmp_path / "cache" / "av").glob("ravdess-visual-*.npz"))
    assert len(files) == 1

    def no_open(*a, **k):
        raise AssertionError("image decoded although the cache should be used")

    monkeypatch.setattr(Image, "open", no_open)
    again = load_modality("ravdess/visual", cfg)
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    with pytest.raises(AssertionError, match="decoded"):   # other options: another cache entry
        load_modality("ravdess/visual", data_cfg(tmp_path, "ravdess", root, image_size=4))


# --------------------------------------------------------------------------- errors
def test_missing_root_key_and_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.roots\.ravdess="):
        load_modality("ravdess/audio", DataConfig(cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match="nowhere"):
        load_modality("cremad/visual", data_cfg(tmp_path, "cremad", tmp_path / "nowhere"))


def _expect(tmp_path, fam, modality, pattern, root=None):
    """Loading ``fam/modality`` from ``root`` (default tmp_path/root) raises a DataError matching ``pattern``."""
    with pytest.raises(DataError, match=pattern):
        load_modality(f"{fam}/{modality}", data_cfg(tmp_path, fam, root or tmp_path / "root"))


def test_missing_feature_file_named(tmp_path):
    root = make_ravdess(tmp_path / "root")
    (root / "aud_features" / "test_2_1.npy").unlink()
    _expect(tmp_path, "ravdess", "visual", r"test_2_1\.npy.*spa_test\.csv:4")   # both modalities check


def test_missing_pickle_named(tmp_path):
    root = make_cremad(tmp_path / "root")
    target = next((root / "Audio-1004").glob("*_train_HAP.pkl"))
    target.unlink()
    _expect(tmp_path, "cremad", "audio", target.name)


def test_missing_list_file_named(tmp_path):
    root = make_vggsound(tmp_path / "root")
    (root / "testSet.txt").unlink()
    _expect(tmp_path, "vggsound", "audio", r"testSet\.txt")


def test_clip_folder_without_frames_named(tmp_path):
    root = make_ave(tmp_path / "root")
    folder = root / "Image-01-FPS-SE" / "va10xYz"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "notes.txt").write_text("no frames here")
    _expect(tmp_path, "ave", "visual", r"no frames.*va10xYz")


def test_unknown_class_named(tmp_path):
    root = make_cremad(tmp_path / "root")
    with open(root / "train.csv", "a") as f:
        f.write("1099_train_XYZ,XYZ\n")
    _expect(tmp_path, "cremad", "audio", r"train\.csv:13: unknown class 'XYZ'.*stat\.csv")
    root = make_ravdess(tmp_path / "r2")
    with open(root / "data_file" / "spa_test.csv", "a") as f:
        f.write("train_1_0.npy,train_1_0.jpg,7\n")
    _expect(tmp_path, "ravdess", "audio", r"spa_test\.csv:7: unknown class '7'", root)
    root = make_ave(tmp_path / "r3")
    with open(root / "trainSet.txt", "a") as f:
        f.write("Cat&tr00xYz&good&0&10\n")
    _expect(tmp_path, "ave", "audio", r"trainSet\.txt:13: unknown class 'Cat'.*testSet\.txt", root)


def test_malformed_rows_named(tmp_path):
    root = make_ravdess(tmp_path / "root")
    p = root / "data_file" / "spa_dl.csv"
    lines = p.read_text().splitlines(keepends=True)
    lines[2] = "only_audio.npy,1\n"
    p.write_text("".join(lines))
    _expect(tmp_path, "ravdess", "audio", r"spa_dl\.csv:3: malformed row")
    root = make_vggsound(tmp_path / "r2")
    with open(root / "trainSet.txt", "a") as f:
        f.write("rain without an id\n")
    _expect(tmp_path, "vggsound", "visual", r"trainSet\.txt:13: malformed row", root)


def test_bad_image_and_inconsistent_features_named(tmp_path):
    root = make_ravdess(tmp_path / "root")
    (root / "vid_features" / "val_2_0.jpg").write_bytes(b"not a jpeg")
    _expect(tmp_path, "ravdess", "visual", r"val_2_0\.jpg: cannot read image")
    np.save(root / "aud_features" / "val_2_0.npy", np.zeros((F_BINS + 1, 12), np.float32))
    _expect(tmp_path, "ravdess", "audio", r"val_2_0\.npy: audio features have \[C, F\]")
    (root / "aud_features" / "test_1_1.npy").write_bytes(b"junk")
    _expect(tmp_path, "ravdess", "audio", r"test_1_1\.npy: cannot read audio features: not a \.npy file")


def test_clip_in_two_splits_is_an_error(tmp_path):
    root = make_ave(tmp_path / "root")
    with open(root / "testSet.txt", "a") as f:
        f.write("Dog&tr00xYz&good&0&10\n")
    _expect(tmp_path, "ave", "audio", r"testSet\.txt:7: clip 'tr00xYz' is also listed at .*trainSet\.txt:1")


# --------------------------------------------------------------------------- two-epoch distillation
RUNS = [  # family, teacher modality, student modality, method, extra overrides
    ("ravdess", "visual", "audio", "ucmkd-bilevel", []),
    ("cremad", "audio", "visual", "kd", ["pairing.label_budget=1"]),
    ("ave", "audio", "visual", "ucmkd-bilevel", ["pairing.mode=paired"]),
    ("vggsound", "visual", "audio", "kd", []),
]


@pytest.mark.slow
@pytest.mark.parametrize("fam,t,s,method,extra", RUNS, ids=[r[0] for r in RUNS])
def test_two_epoch_distillation(tmp_path, built, fam, t, s, method, extra):
    root = built[fam][0]
    cfg = load_config(RunConfig, None, [
        f"data.roots.{fam}={root}", f"data.teacher={fam}/{t}", f"data.student={fam}/{s}",
        f"data.cache_dir={tmp_path / 'cache'}", f"data.av.image_size={AV.image_size}", f"data.av.frames={AV.frames}",
        f"method.name={method}", "model.teacher_width=4", "model.student_width=4",
        "model.teacher_feat_dim=8", "model.student_feat_dim=8", "optim.epochs=2", "optim.steps_per_epoch=2",
        "optim.batch_size=6", "optim.warmup_epochs=0", "teacher.epochs=1", "teacher.batch_size=6",
        "teacher.warmup_epochs=0", "pairing.label_budget=null", *extra])
    res = run(cfg)
    assert res["epochs"] == 2 and res["teacher"] == f"{fam}/{t}" and res["student"] == f"{fam}/{s}"
    assert 0.0 <= res["test_acc"] <= 1.0 and math.isfinite(res["teacher_test_acc"])
