"""Folder datasets (``folder:PATH``): layouts, readers, the audio front end, the decode cache,
errors, and runs through the Python API and the CLI. Every fixture is generated here: tones
and chirps written with soundfile, eSpeak NG words, PNGs of scikit-learn's digits."""
import dataclasses
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from ucmkd.api import key_config, run_key
from ucmkd.config import DataConfig, FolderConfig, RunConfig, SpokenDigitsConfig, load_config
from ucmkd.data import check_compatible, folder, load_modality, spoken
from ucmkd.data.audio import FrontEnd, fit_length, log_mel, peak_normalize, resample, speech_bounds
from ucmkd.data.folder import compile_pattern, load_folder, parse_spec
from ucmkd.errors import ConfigError, DataError

SR = 8000
CLASSES = ("0", "1", "2")
SPEAKERS = ("ann", "bob", "cy", "dee")
PATTERN = "{label}_{group}_{*}.wav"


def tone(cls: int, speaker: int, take: int, sr: int = SR, seconds: float | None = None,
         noise: float = 0.005) -> np.ndarray:
    """A chirp from f to 1.2 f (f = 300 (cls + 1) Hz, shifted 3% per speaker), 0.2..0.3 s, plus
    seeded white noise of std ``noise``: float64 [L] with peak below 0.5."""
    seconds = seconds if seconds is not None else 0.2 + 0.05 * take
    n = round(sr * seconds)
    t = np.arange(n) / sr
    f0 = 300.0 * (cls + 1) * (1 + 0.03 * speaker)
    phase = 2 * np.pi * f0 * (t + 0.1 * t ** 2 / seconds)        # instantaneous f: f0 .. 1.2 f0
    rng = np.random.default_rng([cls, speaker, take])
    return 0.4 * np.sin(phase) + noise * rng.standard_normal(n)


def write_tones(root, layout: str = "pattern", takes: int = 3, sr: int = SR, classes=CLASSES):
    """WAV files of every class x speaker x take: ``pattern``: root/<class>_<speaker>_<take>.wav;
    ``parent``: root/<class>/<speaker>/<take>.wav."""
    for ci, c in enumerate(classes):
        for si, s in enumerate(SPEAKERS):
            for t in range(takes):
                p = root / f"{c}_{s}_{t}.wav" if layout == "pattern" else root / c / s / f"{t}.wav"
                p.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(p), tone(ci, si, t, sr), sr, subtype="PCM_16")
    return root


def write_digit_pngs(root, per_class: int = 40, classes=CLASSES):
    """PNGs of scikit-learn's 8x8 digits (0..16 scaled to 0..255) in root/<digit>/<i>.png."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in classes:
        imgs = d.images[d.target == int(c)][:per_class]
        (root / c).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(imgs):
            Image.fromarray(np.round(im * 255 / 16).astype(np.uint8), mode="L").save(root / c / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    return write_tones(tmp_path_factory.mktemp("wavs"))


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    return write_digit_pngs(tmp_path_factory.mktemp("pngs"))


def cfg_for(tmp_path, **folder_opts) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), folder=FolderConfig(**folder_opts))


def spec(path, **opts) -> str:
    return f"folder:{path}" + ("?" + "&".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


# --------------------------------------------------------------------------- layouts
def test_pattern_layout_classes_groups_and_speaker_held_out_test(wavs, tmp_path):
    d = load_modality(spec(wavs, pattern=PATTERN), cfg_for(tmp_path))
    raw = load_folder(spec(wavs, pattern=PATTERN), cfg_for(tmp_path))
    assert d.classes == list(CLASSES) and d.kind == "image" and d.augment_kind == "spectrogram"
    # 8 kHz: hop 20 ms = 160, n_fft 512; clips padded to the longest file (0.3 s = 2400 samples)
    assert d.input_shape == (1, 32, 1 + 2400 // 160)
    assert len(d.y) == 3 * 4 * 3 and np.bincount(d.y.numpy()).tolist() == [12, 12, 12]
    spk = {k: set(raw.groups[v.numpy()]) for k, v in d.splits.items()}
    assert spk["test"] and not spk["test"] & (spk["train"] | spk["val"])        # whole speakers held out
    assert set(raw.groups) == set(SPEAKERS)
    # the front end, composed by hand for one file: centred in zeros, peak 1, log-mel
    wav, sr = sf.read(str(wavs / "1_bob_0.wav"), dtype="float64")
    j = sorted(p.name for p in wavs.iterdir()).index("1_bob_0.wav")       # items are sorted by path
    assert sr == SR and len(wav) == 1600 and (raw.y[j], raw.groups[j]) == (1, "bob")
    clip = np.zeros(2400)
    clip[400: 2000] = wav / np.abs(wav).max()
    fe = FrontEnd(sample_rate=SR, length=2400, n_mels=32, hop_length=160, n_fft=512)
    np.testing.assert_array_equal(raw.x[j], log_mel(clip[None], fe))
    # the class is audible: the loudest mel band rises with the tone's frequency
    peak_band = [int(np.asarray(raw.x)[raw.y == c].mean((0, 1, 3)).argmax()) for c in range(3)]
    assert peak_band[0] < peak_band[1] < peak_band[2]


def test_class_subfolders_with_speaker_folders(tmp_path):
    root = write_tones(tmp_path / "tree", layout="parent", takes=2)
    (root / "1" / "ann" / ".DS_Store").write_bytes(b"\0junk")           # hidden: skipped
    (root / ".cache").mkdir()
    (root / ".cache" / "x.wav").write_bytes(b"junk")                      # in a hidden folder: skipped
    (root / "README.txt").write_text("not data")                          # no reader takes .txt: skipped
    raw = load_folder(spec(root, group_from="parent"), cfg_for(tmp_path))
    assert raw.classes == list(CLASSES) and len(raw.y) == 3 * 4 * 2
    assert sorted(set(raw.groups)) == sorted(SPEAKERS) and raw.split is None
    d = load_modality(spec(root, group_from="parent"), cfg_for(tmp_path))
    spk = {k: set(raw.groups[v.numpy()]) for k, v in d.splits.items()}
    assert not spk["test"] & (spk["train"] | spk["val"])
    # without groups: no group ids, a stratified split
    assert load_folder(spec(root), cfg_for(tmp_path)).groups is None


def test_split_folders_are_the_datasets_own_split(tmp_path):
    root = tmp_path / "split"
    write_digit_pngs(root / "train", per_class=12)
    write_digit_pngs(root / "test", per_class=4)
    (root / "test" / "2" / "000.png").rename(root / "test" / "2" / "zz.png")   # names sort after train's
    raw = load_folder(spec(root), cfg_for(tmp_path))
    assert raw.classes == list(CLASSES) and raw.x.shape == (48, 1, 8, 8) and raw.kind == "image"
    assert sorted(set(raw.split)) == ["test", "train"] and (raw.split == "test").sum() == 12
    d = load_modality(spec(root), cfg_for(tmp_path))
    assert d.splits["test"].tolist() == np.nonzero(raw.split == "test")[0].tolist()
    assert set(d.splits["val"].tolist()) <= set(np.nonzero(raw.split == "train")[0].tolist())
    # split_folders=false: train and test are two classes
    flat = load_folder(spec(root, split_folders="false", classes="test,train"), cfg_for(tmp_path))
    assert flat.classes == ["test", "train"] and flat.split is None
    with pytest.raises(DataError, match="not train/val/test"):
        (root / "extra").mkdir()
        load_folder(spec(root, split_folders="true"), cfg_for(tmp_path))


def test_pngs_decode_exactly(pngs, tmp_path):
    from sklearn.datasets import load_digits

    raw = load_folder(spec(pngs), cfg_for(tmp_path))
    assert raw.kind == "image" and raw.x.shape == (120, 1, 8, 8) and raw.augment is None
    d = load_digits()
    want = np.round(d.images[d.target == 2][:40] * 255 / 16).astype(np.uint8).astype(np.float32) / 255.0
    np.testing.assert_array_equal(np.asarray(raw.x)[raw.y == 2][:, 0], want)
    rgb = load_folder(spec(pngs, image_mode="RGB", image_size=16), cfg_for(tmp_path))
    assert rgb.x.shape == (120, 3, 16, 16)
    np.testing.assert_array_equal(rgb.x[:, 0], rgb.x[:, 2])            # gray as RGB: equal channels


def test_npy_files_kind_by_dimensions(tmp_path):
    rng = np.random.default_rng(0)
    for shape, kind in (((5,), "vector"), ((2, 7), "signal"), ((1, 4, 4), "image")):
        root = tmp_path / kind
        for c in ("a", "b"):
            (root / c).mkdir(parents=True)
            for i in range(3):
                np.save(root / c / f"{i}.npy", rng.normal(size=shape))
        raw = load_folder(spec(root), cfg_for(tmp_path))
        assert raw.kind == kind and raw.x.shape == (6, *shape) and raw.y.tolist() == [0, 0, 0, 1, 1, 1]
        np.testing.assert_array_equal(raw.x[4], np.load(root / "b" / "1.npy").astype(np.float32))
    np.save(tmp_path / "image" / "a" / "odd.npy", np.zeros((1, 4, 5)))
    with pytest.raises(DataError, match="odd.npy"):
        load_folder(spec(tmp_path / "image"), cfg_for(tmp_path))


def test_explicit_class_order(wavs, tmp_path):
    raw = load_folder(spec(wavs, pattern=PATTERN, classes="2,0,1"), cfg_for(tmp_path))
    assert raw.classes == ["2", "0", "1"]
    base = load_folder(spec(wavs, pattern=PATTERN), cfg_for(tmp_path))
    np.testing.assert_array_equal(raw.y, np.array([1, 2, 0])[base.y])
    with pytest.raises(DataError, match=r"class '2' is not in .*option classes"):
        load_folder(spec(wavs, pattern=PATTERN, classes="0,1"), cfg_for(tmp_path))
    with pytest.raises(DataError, match=r"\['7'\] of data.folder.classes have no files"):
        load_folder(spec(wavs), cfg_for(tmp_path, pattern=PATTERN, classes=("0", "1", "2", "7")))


def test_espeak_words_resampled_and_trimmed(tmp_path):
    """eSpeak NG words (22,050 Hz) read as a folder at 16 kHz, silence trimmed."""
    eng = spoken.get_engine()
    root = tmp_path / "words"
    root.mkdir()
    for word in ("zero", "one"):
        for voice in ("en-us", "en-gb-scotland"):
            for rate in (140, 180):
                pcm = eng.synth(word, voice, rate=rate, pitch=50)
                sf.write(str(root / f"{word}_{voice}_{rate}.wav"), pcm, spoken.ESPEAK_SAMPLE_RATE, subtype="PCM_16")
    raw = load_folder(spec(root, pattern=PATTERN, sample_rate=16000, trim_db=40, duration=0.6), cfg_for(tmp_path))
    assert raw.classes == ["one", "zero"] and raw.x.shape == (8, 1, 32, 1 + 9600 // 320)
    assert sorted(set(raw.groups)) == ["en-gb-scotland", "en-us"] and np.isfinite(raw.x).all()


# --------------------------------------------------------------------------- the audio front end
def test_fit_length_centre_and_start():
    x = np.arange(1, 6, dtype=np.float64)
    assert fit_length(x, 3, "centre").tolist() == [2, 3, 4]
    assert fit_length(x, 3, "start").tolist() == [1, 2, 3]
    assert fit_length(x, 8, "centre").tolist() == [0, 1, 2, 3, 4, 5, 0, 0]
    assert fit_length(x, 8, "start").tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert fit_length(np.stack([x, -x]), 4, "centre").shape == (2, 4)


def test_front_end_trims_mixes_down_and_normalises(tmp_path):
    sig = np.concatenate([np.zeros(1600), tone(0, 0, 0), np.zeros(400)])        # 0.2 s silence, tone, silence
    st = np.stack([sig, 0.5 * sig], 1)
    sf.write(str(tmp_path / "s.wav"), st, SR, subtype="DOUBLE")
    fe = FrontEnd(sample_rate=SR, length=1000, trim_db=40, crop="start")
    c = fe.clip(tmp_path / "s.wav")
    a, _ = speech_bounds(0.75 * sig, SR, 40)
    assert c.shape == (1, 1000) and a <= 1600 < a + 40                        # the silence is cut (5 ms frames)
    np.testing.assert_allclose(c[0], peak_normalize(0.75 * sig[a: a + 1000]), rtol=0, atol=1e-15)
    stereo = dataclasses.replace(fe, mono=False).clip(tmp_path / "s.wav")
    assert stereo.shape == (2, 1000) and np.abs(stereo).max() == 1.0


def test_resampling_matches_a_tone_written_at_the_target_rate(tmp_path):
    root = tmp_path / "rates"
    for take, sr in enumerate((SR, 2 * SR)):
        for c in range(2):
            (root / str(c)).mkdir(parents=True, exist_ok=True)
            sf.write(str(root / str(c) / f"{take}.wav"), tone(c, 0, 0, sr, 0.25, noise=0), sr, subtype="DOUBLE")
    with pytest.raises(DataError, match=r"different sample rates: 8000 Hz .*, 16000 Hz .*data.folder.sample_rate"):
        load_folder(spec(root), cfg_for(tmp_path))
    with pytest.raises(DataError, match=r"1\.wav: sample rate 16000 Hz, but .*option sample_rate is 8000"):
        load_folder(spec(root, sample_rate=SR, resample="false"), cfg_for(tmp_path))
    raw = load_folder(spec(root, sample_rate=SR, peak_normalize="false", n_mels=16), cfg_for(tmp_path))
    assert raw.x.shape == (4, 1, 16, 1 + 2000 // 160)
    # the 16 kHz file brought to 8 kHz is the 8 kHz file up to the anti-aliasing filter's
    # passband ripple (away from the ends): resample_poly's Kaiser window, beta 5, gives by
    # Kaiser's formula A = 5 / 0.1102 + 8.7 = 54 dB, a ripple of 10^(-A/20) = 2e-3 of the amplitude
    direct, twice = tone(1, 0, 0, SR, 0.25, noise=0), tone(1, 0, 0, 2 * SR, 0.25, noise=0)
    assert np.abs(resample(twice, 2 * SR, SR) - direct)[200:-200].max() < 0.4 * 2e-3
    loud = np.asarray(raw.x)[[2, 3], 0][:, :, 2:-2]         # class 1's two files (away from the edges)
    strong = loud[0] > loud[0].max() - 20                    # bands within 20 dB of the peak
    assert np.abs(loud[0] - loud[1])[strong].max() < 0.1     # dB


# --------------------------------------------------------------------------- the cache
def test_decode_cache_is_keyed_by_file_content_and_options(tmp_path, monkeypatch):
    root = write_tones(tmp_path / "w", takes=2)
    calls = []
    real = folder.decode
    monkeypatch.setattr(folder, "decode", lambda plan, paths: calls.append(len(paths)) or real(plan, paths))
    cfg = cfg_for(tmp_path, pattern=PATTERN)
    first = load_folder(spec(root), cfg)
    assert calls == [24]
    again = load_folder(spec(root), cfg)                            # unchanged files: read back
    assert calls == [24] and isinstance(again.x, np.memmap)
    np.testing.assert_array_equal(np.asarray(again.x), np.asarray(first.x))
    p = root / "2_cy_1.wav"
    p.touch()                                                        # a new mtime, the same bytes
    load_folder(spec(root), cfg)
    assert calls == [24]
    load_folder(spec(root, classes="2,1,0"), cfg)                    # labels only: the items are the same
    assert calls == [24]
    sf.write(str(p), tone(2, 2, 1) * 0.5, SR, subtype="PCM_16")      # one file's content changes
    changed = load_folder(spec(root), cfg)
    assert calls == [24, 24]
    k = sorted(x.name for x in root.iterdir()).index(p.name)
    assert not np.array_equal(changed.x[k], first.x[k]) and np.array_equal(changed.x[0], first.x[0])
    fp = load_modality(spec(root), cfg).fingerprint
    load_folder(spec(root, n_mels=16), cfg)                          # an option of the reader
    assert calls == [24, 24, 24]
    assert load_modality(spec(root, n_mels=16), cfg).fingerprint != fp
    assert len(list((tmp_path / "cache" / "folders").glob("w-*.npz"))) == 3


def test_folder_options_key_runs_only_through_the_fingerprint(wavs, tmp_path):
    a = RunConfig()
    b = RunConfig()
    b.data.folder = FolderConfig(n_mels=16)
    assert run_key(a) == run_key(b) and "folder" not in key_config(a)["data"]
    cfg = cfg_for(tmp_path, pattern=PATTERN)
    fp = load_modality(spec(wavs), cfg).fingerprint
    assert fp["recipe"]["folder"]["options"]["pattern"] == PATTERN and fp["recipe"]["folder"]["reader"] == "audio"
    other = load_modality(spec(wavs), dataclasses.replace(cfg, folder=FolderConfig(pattern=PATTERN, crop="start")))
    assert other.fingerprint["recipe"] != fp["recipe"]


# --------------------------------------------------------------------------- options and errors
def test_spec_options_are_typed_and_validated():
    s = parse_spec("folder:d/x?pattern={label}_{*}.wav&sample_rate=16000&classes=a,b&image_size=null&mono=false",
                   FolderConfig(n_mels=20))
    o = s.options
    assert (o.pattern, o.sample_rate, o.classes, o.image_size, o.mono, o.n_mels) == \
           ("{label}_{*}.wav", 16000, ("a", "b"), None, False, 20)
    assert str(s.path) == "d/x" and s.label("n_mels") == "data.folder.n_mels"
    assert s.label("mono") == f"{s.text}: option mono"
    assert parse_spec("folder:x?extensions=[.wav,.flac]&pattern=a%26b_{label}.wav").options.extensions == (".wav", ".flac")
    for bad, match in (("n_mels=0", r"folder:x\?n_mels=0: option n_mels: expected a value >= 1, got 0"),
                       ("crop=middle", r"option crop: unknown value 'middle'; choose one of centre, start"),
                       ("nmels=3", r"unknown option 'nmels'; known options: pattern"),
                       ("mono", r"option 'mono' is not of the form key=value"),
                       ("sample_rate=fast", r"option sample_rate: expected an integer")):
        with pytest.raises(ConfigError, match=match):
            parse_spec(f"folder:x?{bad}")
    with pytest.raises(ConfigError, match="data.folder.n_mels: expected a value >= 1"):
        parse_spec("folder:x", FolderConfig(n_mels=0))
    with pytest.raises(ConfigError, match="no folder path"):
        parse_spec("folder:?n_mels=3")


def test_config_section_errors_name_the_field():
    cfg = load_config(RunConfig, None, ['data.folder.pattern="{label}_{*}.wav"', "data.folder.sample_rate=16000"])
    assert cfg.data.folder.pattern == "{label}_{*}.wav" and cfg.data.folder.sample_rate == 16000
    with pytest.raises(ConfigError, match="data.folder.crop: unknown value 'middle'"):
        load_config(RunConfig, None, ["data.folder.crop=middle"])
    with pytest.raises(ConfigError, match="data.folder.duration: expected a value > 0.0"):
        load_config(RunConfig, None, ["data.folder.duration=0"])
    with pytest.raises(ConfigError, match="unknown field 'data.folder.nmels'"):
        load_config(RunConfig, None, ["data.folder.nmels=3"])


def test_patterns_compile_to_anchored_regexes():
    rx = compile_pattern("{label}_{group}_{*}.wav", "p")
    assert rx.fullmatch("3_jackson_12.wav").group("label", "group") == ("3", "jackson")
    assert rx.fullmatch("3_george_w_1.wav").group("group") == "george"       # as few characters as possible
    assert rx.fullmatch("3_jackson_12.wav.bak") is None and rx.fullmatch("3-jackson.wav") is None
    assert compile_pattern("a.b{label}", "p").fullmatch("aXbc") is None          # '.' is literal
    for bad, match in (("{speaker}_{*}.wav", "unknown placeholder {speaker}"), ("{label}_{label}.wav", "at most once"),
                       ("x/{label}.wav", "without folders"), ("{label.wav", "unbalanced")):
        with pytest.raises(ConfigError, match=match):
            compile_pattern(bad, "data.folder.pattern")


def test_errors_name_the_file_or_folder(tmp_path, wavs):
    cfg = cfg_for(tmp_path)
    # corrupt file
    bad = write_tones(tmp_path / "bad", takes=1)
    (bad / "1_bob_9.wav").write_bytes(b"RIFF not a wav at all")
    with pytest.raises(DataError, match=f"{bad / '1_bob_9.wav'}: cannot read as audio"):
        load_folder(spec(bad, pattern=PATTERN), cfg)
    # a file the pattern does not match; unmatched=skip reads the rest
    (bad / "1_bob_9.wav").unlink()
    (bad / "take7.wav").write_bytes(b"")
    with pytest.raises(DataError, match=r"1 file\(s\) do not match .*option pattern '\{label\}_\{group\}_\{\*\}\.wav'.*take7\.wav"):
        load_folder(spec(bad, pattern=PATTERN), cfg)
    assert len(load_folder(spec(bad, pattern=PATTERN, unmatched="skip"), cfg).y) == 12
    # empty class folder
    tree = write_digit_pngs(tmp_path / "tree", per_class=3)
    (tree / "3").mkdir()
    (tree / "3" / "notes.txt").write_text("-")
    with pytest.raises(DataError, match=f"{tree / '3'}: empty class folder"):
        load_folder(spec(tree), cfg)
    (tree / "3" / "notes.txt").unlink()
    (tree / "3").rmdir()
    # a file outside every class folder
    (tree / "loose.png").write_bytes((tree / "0" / "000.png").read_bytes())
    with pytest.raises(DataError, match=f"{tree / 'loose.png'}: not in a class folder"):
        load_folder(spec(tree), cfg)
    (tree / "loose.png").unlink()
    # images of different sizes, without image_size; with it they are resized
    from PIL import Image
    Image.new("L", (12, 10)).save(tree / "1" / "big.png")
    with pytest.raises(DataError, match=r"big\.png: 12x10 pixels, but .*8x8.*data\.folder\.image_size"):
        load_folder(spec(tree), cfg)
    assert load_folder(spec(tree, image_size=8), cfg).x.shape == (10, 1, 8, 8)
    # mixed file kinds
    sf.write(str(tree / "1" / "x.wav"), np.zeros(100), SR)
    with pytest.raises(DataError, match=r"mixes image files .* and audio files .*x\.wav"):
        load_folder(spec(tree), cfg)
    assert load_folder(spec(tree, extensions=".png", image_size=8), cfg).x.shape == (10, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"option extensions: no reader takes '\.mp4'"):
        load_folder(spec(tree, extensions=".mp4"), cfg)
    # no files at all, a missing folder, groups that the layout does not have
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("-")
    with pytest.raises(DataError, match=r"no files found under .*empty.*skipped files: \{'\.txt': 1\}"):
        load_folder(spec(tmp_path / "empty"), cfg)
    with pytest.raises(DataError, match="folder not found"):
        load_folder(spec(tmp_path / "nowhere"), cfg)
    with pytest.raises(DataError, match=r"000\.png: no group folder .*<class>/<group>/<file>"):
        load_folder(spec(tree, group_from="parent", extensions=".png", image_size=8), cfg)
    with pytest.raises(ConfigError, match=r"option group_from: 'pattern' needs a pattern with \{group\}"):
        load_folder(spec(wavs, pattern="{label}_{*}.wav", group_from="pattern"), cfg)


def test_class_sets_that_differ_between_folders_are_named(wavs, tmp_path):
    cfg = cfg_for(tmp_path)
    pngs = write_digit_pngs(tmp_path / "p", per_class=8, classes=("0", "1", "3"))
    student = load_modality(spec(wavs, pattern=PATTERN), cfg)
    teacher = load_modality(spec(pngs), cfg)
    with pytest.raises(DataError) as ei:
        check_compatible(student, teacher)
    msg = str(ei.value)
    assert f"folder:{wavs}" in msg and f"folder:{pngs}" in msg
    assert "only in the student: ['2']; only in the teacher: ['3']" in msg and "'classes' option" in msg


# --------------------------------------------------------------------------- the spoken digits keep their bits
def _log_mel_before_the_move(audio, cfg):
    """spoken.log_mel as it was before the front end moved to ucmkd.data.audio (frozen copy)."""
    fb = torch.from_numpy(spoken.mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels))
    window = torch.hann_window(cfg.n_fft, periodic=True)
    out = []
    with torch.no_grad():
        for i in range(0, len(audio), 256):
            x = torch.as_tensor(np.asarray(audio[i: i + 256], dtype=np.float32))
            spec_ = torch.stft(x, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.n_fft, window=window,
                               center=True, pad_mode="constant", return_complex=True)
            mel = torch.matmul(fb, spec_.abs() ** 2)
            db = 10.0 * torch.log10(mel.clamp_min(1e-10))
            db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - 80.0)
            out.append(db.numpy())
    return np.concatenate(out).astype(np.float32)


def _render_before_the_move(raw, cfg, rng):
    """spoken.render's clip as it was before (frozen copy)."""
    length = spoken.clip_samples(cfg)
    x = raw.astype(np.float64) / 32768.0
    a, b = spoken.speech_bounds(x, cfg.sample_rate)
    seg = x[a:b]
    trimmed = max(0, len(seg) - length)
    if trimmed:
        seg = seg[trimmed // 2: trimmed // 2 + length]
    seg = seg * (spoken.PEAK / np.abs(seg).max())
    clip = np.zeros(length)
    off = (length - len(seg)) // 2
    clip[off: off + len(seg)] = seg
    p_speech = float((seg ** 2).mean())
    if cfg.snr_db is not None:
        noise = rng.standard_normal(length)
        noise *= np.sqrt(p_speech / 10 ** (cfg.snr_db / 10) / (noise ** 2).mean())
        clip = clip + noise
    peak = np.abs(clip).max()
    if peak > 0.99:
        clip *= 0.99 / peak
    return np.round(clip * 32767).astype(np.int16), {"trimmed_samples": int(trimmed), "offset": int(off)}


def test_spoken_digits_front_end_is_bit_identical_to_before():
    cfg = SpokenDigitsConfig(n_mels=24, duration=0.3)
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal((3, spoken.clip_samples(cfg)))).astype(np.float32)
    want = _log_mel_before_the_move(audio, cfg)
    np.testing.assert_array_equal(spoken.log_mel(audio, cfg), want)
    np.testing.assert_array_equal(spoken.front_end(cfg).log_mel(audio[:, None])[:, 0], want)
    for n_speech, snr in ((2000, 20.0), (9000, None)):           # shorter and longer than the 6615-sample clip
        raw = np.zeros(12000, np.int16)
        raw[1500: 1500 + n_speech] = (8000 * np.sin(np.arange(n_speech) * 0.05)).astype(np.int16)
        got, info = spoken.render(raw, dataclasses.replace(cfg, snr_db=snr), np.random.default_rng(3))
        ref, ref_info = _render_before_the_move(raw, dataclasses.replace(cfg, snr_db=snr), np.random.default_rng(3))
        np.testing.assert_array_equal(got, ref)
        assert {k: info[k] for k in ref_info} == ref_info
    # the cache keys of the WAVs and spectrograms (platform-independent hashes of the recipe)
    assert (spoken.recipe_hash(SpokenDigitsConfig()), spoken.spectrogram_hash(SpokenDigitsConfig())) == \
           ("90a6dd8abf", "f9b048c289")


# --------------------------------------------------------------------------- runs
def _tiny_run(cfg: RunConfig) -> RunConfig:
    cfg.pairing.label_budget = None
    cfg.model.teacher_width = cfg.model.student_width = 4
    cfg.model.teacher_feat_dim = cfg.model.student_feat_dim = 8
    cfg.optim.epochs, cfg.optim.steps_per_epoch, cfg.optim.batch_size, cfg.optim.warmup_epochs = 2, 2, 16, 1
    cfg.teacher.epochs = 2
    cfg.method.name = "kd"
    return cfg


@pytest.mark.slow
def test_run_with_folder_student_audio_and_folder_teacher_images(wavs, pngs, tmp_path):
    from ucmkd.api import run

    cfg = _tiny_run(RunConfig())
    cfg.data = cfg_for(tmp_path, pattern=PATTERN)        # the section applies to both; the PNGs lack .wav: no
    cfg.data.student = spec(wavs)                        # pattern for the teacher, cleared in its spec
    cfg.data.teacher = spec(pngs, pattern="null")
    cfg.teacher.epochs, cfg.teacher.batch_size, cfg.teacher.lr = 25, 24, 1e-2     # 75 steps: a teacher that learned
    res = run(cfg, run_dir=tmp_path / "run")
    assert res["student"] == spec(wavs) and res["teacher"] == spec(pngs, pattern="null")
    assert 0.0 <= res["test_acc"] <= 1.0 and math.isfinite(res["teacher_test_acc"])
    assert res["teacher_test_acc"] > 0.5                  # 3 digit classes from 8x8 PNGs: learnable


@pytest.mark.slow
def test_cli_train_with_a_folder_student(wavs, pngs, tmp_path, capsys):
    from ucmkd.cli import main

    args = ["train", "--run-dir", str(tmp_path / "r"), "--no-progress", f"data.cache_dir={tmp_path / 'cache'}",
            f"data.student=folder:{wavs}?pattern={PATTERN}&n_mels=16", f"data.teacher=folder:{pngs}",
            "optim.epochs=1", "optim.steps_per_epoch=2", "teacher.epochs=1", "method.name=ce",
            "model.student_width=4", "model.teacher_width=4", "pairing.label_budget=null"]
    assert main(args) == 0
    assert '"test_acc"' in capsys.readouterr().out
    assert (tmp_path / "r" / "best.pt").is_file()
    assert len(list((tmp_path / "cache" / "folders").glob("*.npz"))) == 2
