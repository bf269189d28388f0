"""Spoken digits (eSpeak NG, offline): synthesis, WAV/log-mel cache, SNR, speaker-held-out splits."""
import dataclasses
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from ucmkd.config import DataConfig, RunConfig, SpokenDigitsConfig, from_dict
from ucmkd.data import load_modality, spoken
from ucmkd.data.spoken import (
    ESpeakNG,
    clip_samples,
    load_spoken_digits,
    log_mel,
    mel_filterbank,
    num_frames,
    recipe,
    spectrogram_hash,
    spoken_root,
)
from ucmkd.errors import DataError

EPS32 = float(torch.finfo(torch.float32).eps)

# 2 voices x 2 variants = 4 speakers, x 2 rates x 10 digits = 80 clips (enough for a stratified val split)
TINY = SpokenDigitsConfig(voices=("en-us", "en-gb-scotland"), variants=("m3", "f3"), rates=(140, 180), pitches=(50,),
                          snr_db=20.0, n_mels=24)
CLEAN = dataclasses.replace(TINY, snr_db=None)


def data_cfg(tmp_path, spoken_cfg=TINY) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path), spoken=spoken_cfg, teacher="digits/image",
                      student="spoken-digits/audio")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("spoken-cache")


@pytest.fixture(scope="module")
def tiny(cache):
    return load_spoken_digits(TINY, cache)


@pytest.fixture(scope="module")
def clean(cache):
    return load_spoken_digits(CLEAN, cache)


def wav(d, i) -> np.ndarray:
    return sf.read(str(d.root / "wav" / d.manifest["clips"][i]["file"]), dtype="int16")[0].astype(np.float64)


def index(d, speaker, digit) -> int:
    return next(i for i, c in enumerate(d.manifest["clips"]) if c["speaker"] == speaker and c["digit"] == digit)


# --------------------------------------------------------------------------- generation and files
def test_wav_files_are_16bit_22050hz_with_the_clip_duration(tiny):
    files = sorted((tiny.root / "wav").rglob("*.wav"))
    assert len(files) == 80 == len(tiny.y)
    assert tiny.root == spoken_root(TINY, tiny.root.parents[1]) and tiny.root.parent.name == "spoken_digits"
    for f in files[:: 7]:
        info = sf.info(str(f))
        assert info.samplerate == 22050 and info.subtype == "PCM_16" and info.channels == 1
        assert info.frames == clip_samples(TINY) == round(0.8 * 22050)
        assert math.isclose(info.duration, TINY.duration)
    assert sorted(set(tiny.speaker)) == ["en-gb-scotland+f3", "en-gb-scotland+m3", "en-us+f3", "en-us+m3"]
    assert np.bincount(tiny.y).tolist() == [8] * 10
    assert not any(p.name.startswith(".") for p in tiny.root.parent.iterdir()), "temporary directory left behind"
    # the manifest names the synthesiser and the recipe
    m = json.loads((tiny.root / "manifest.json").read_text())
    assert m["espeak_ng_version"] and m["recipe"]["voices"] == list(TINY.voices)
    assert all(c["trimmed_samples"] == 0 for c in m["clips"])   # the speech fits in 0.8 s


def test_audio_not_silent_centred_and_differs_between_digits_and_speakers(clean):
    clips = np.stack([wav(clean, i) for i in range(len(clean.y))]) / 32768
    rms = np.sqrt((clips ** 2).mean(1))
    assert (rms > 0.02).all()
    for c in clips[::5]:   # clean clips: the speech is centred in zero padding
        nz = np.nonzero(c)[0]
        assert nz[0] > 0 and nz[-1] < len(c) - 1
        assert abs((nz[0] + nz[-1]) / 2 - len(c) / 2) < 0.01 * 22050

    def dist(i, j):
        return float(np.abs(clean.x[i] - clean.x[j]).mean())

    s = "en-us+m3"
    digits = [dist(index(clean, s, a), index(clean, s, b)) for a in range(10) for b in range(a + 1, 10)]
    speakers = [dist(index(clean, a, d), index(clean, b, d)) for d in range(10)
                for a, b in [("en-us+m3", "en-us+f3"), ("en-us+m3", "en-gb-scotland+m3")]]
    assert min(digits) > 1.0 and min(speakers) > 1.0   # dB


def test_same_seed_same_arrays_other_seed_other_noise(tiny, tmp_path):
    again = load_spoken_digits(TINY, tmp_path / "again")
    assert again.root != tiny.root
    np.testing.assert_array_equal(again.x, tiny.x)
    np.testing.assert_array_equal(again.y, tiny.y)
    for i in (0, 17, 79):
        np.testing.assert_array_equal(wav(again, i), wav(tiny, i))
    other = load_spoken_digits(dataclasses.replace(TINY, seed=1), tmp_path / "again")
    assert other.root != again.root
    assert not np.array_equal(wav(other, 3), wav(tiny, 3))


@pytest.mark.parametrize("snr", [20.0, 10.0])
def test_snr_is_honoured(clean, cache, snr):
    noisy = load_spoken_digits(dataclasses.replace(TINY, snr_db=snr), cache)
    for i in (0, 13, 46, 79):
        s, m = wav(clean, i), wav(noisy, i)
        noise = m - s
        nz = np.nonzero(s)[0]
        p_speech = (s[nz[0]: nz[-1] + 1] ** 2).mean()
        measured = 10 * np.log10(p_speech / (noise ** 2).mean())
        assert abs(measured - snr) < 0.2, (i, measured)
        assert abs(noise.mean()) < 0.05 * noise.std()   # zero-mean
        assert (noise[: nz[0]] != 0).mean() > 0.95       # noise spans the padding too


def test_spectrogram_shape_finite_and_modality(tiny, cache):
    t = num_frames(TINY)
    assert t == 1 + round(0.8 * 22050) // 441 == 41
    assert tiny.x.shape == (80, 1, 24, t) and tiny.x.dtype == np.float32
    assert np.isfinite(tiny.x).all()
    assert tiny.spec_path.name == f"logmel_{spectrogram_hash(TINY)}.npz"
    d = load_modality("spoken-digits/audio", data_cfg(cache))
    assert d.kind == "image" and d.input_shape == (1, 24, t)
    assert d.classes == [str(i) for i in range(10)] == load_modality("digits/image", data_cfg(cache)).classes
    assert torch.isfinite(d.x).all()


def test_test_speakers_are_held_out(tiny, cache):
    d = load_modality("spoken-digits/audio", data_cfg(cache))
    spk = {k: set(tiny.speaker[v.numpy()]) for k, v in d.splits.items()}
    assert spk["test"] and not spk["test"] & (spk["train"] | spk["val"])
    assert len(spk["test"]) == 1   # round(0.25 * 4 speakers)
    # data.val_by=auto: validation speakers are held out of training too (round(0.2 * 3), at least 1)
    assert d.meta["val_by"] == "groups" and len(spk["val"]) == 1 and not spk["val"] & spk["train"]
    assert sum(len(v) for v in d.splits.values()) == 80


# --------------------------------------------------------------------------- cache
def test_second_load_uses_the_cache(tiny, cache, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("synthesised although the cache exists")

    monkeypatch.setattr(spoken.ESpeakNG, "synth", boom)
    monkeypatch.setattr(spoken, "synthesize_clips", boom)
    again = load_spoken_digits(TINY, cache)
    np.testing.assert_array_equal(again.x, tiny.x)
    assert again.seconds == {"synthesis": 0.0, "spectrograms": 0.0}
    # other spectrogram settings: recomputed from the cached WAVs, still no synthesis
    wider = load_spoken_digits(dataclasses.replace(TINY, n_mels=16), cache)
    assert wider.root == tiny.root and wider.x.shape == (80, 1, 16, 41)
    assert wider.seconds["synthesis"] == 0.0 and wider.seconds["spectrograms"] > 0
    # another recipe must be synthesised (and our stub refuses)
    with pytest.raises(AssertionError, match="synthesised"):
        load_spoken_digits(dataclasses.replace(TINY, rates=(170, 180)), cache)


def test_corrupt_or_missing_cache_files_are_data_errors(tmp_path):
    cfg = dataclasses.replace(TINY, voices=("en",), variants=("m1", "f1"))
    d = load_spoken_digits(cfg, tmp_path)
    d.spec_path.write_bytes(b"not an npz")
    with pytest.raises(DataError) as ei:
        load_spoken_digits(cfg, tmp_path)
    assert str(d.spec_path) in str(ei.value)
    d.spec_path.unlink()
    bad = d.root / "wav" / d.manifest["clips"][5]["file"]
    bad.write_bytes(b"RIFF garbage")
    with pytest.raises(DataError) as ei:
        load_spoken_digits(cfg, tmp_path)
    assert str(bad) in str(ei.value)
    bad.unlink()
    with pytest.raises(DataError, match="missing spoken-digits clip") as ei:
        load_spoken_digits(cfg, tmp_path)
    assert str(bad) in str(ei.value)
    assert not d.spec_path.exists()    # nothing half-written
    (d.root / "manifest.json").write_text("{broken")
    with pytest.raises(DataError) as ei:
        load_spoken_digits(cfg, tmp_path)
    assert str(d.root / "manifest.json") in str(ei.value)


# --------------------------------------------------------------------------- errors
def test_unknown_voice_or_variant_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="no voice 'en-xx'"):
        load_spoken_digits(dataclasses.replace(TINY, voices=("en-us", "en-xx")), tmp_path)
    with pytest.raises(DataError, match="no voice variant 'f99'"):
        load_spoken_digits(dataclasses.replace(TINY, variants=("m3", "f99")), tmp_path)
    assert not (tmp_path / "spoken_digits").exists() or not any((tmp_path / "spoken_digits").iterdir())


@pytest.mark.parametrize("change,match", [
    ({"rates": (20,)}, "data.spoken.rates"), ({"pitches": (120,)}, "data.spoken.pitches"),
    ({"sample_rate": 16000}, "data.spoken.sample_rate"), ({"variants": ("m3",), "voices": ("en",)}, "2 speakers"),
    ({"variants": ("m3+f3",)}, "data.spoken.variants"), ({"duration": 0.0}, "data.spoken.duration"),
])
def test_invalid_recipe(tmp_path, change, match):
    with pytest.raises(DataError, match=match):
        recipe(dataclasses.replace(TINY, **change))


def test_library_that_cannot_load_names_its_path(tmp_path):
    from ucmkd.data.spoken import default_paths

    _, data = default_paths()
    missing = tmp_path / "nope" / "libespeak-ng.so"
    with pytest.raises(DataError) as ei:
        ESpeakNG(library=str(missing), data_path=data)
    assert str(missing) in str(ei.value)
    junk = tmp_path / "libjunk.so"
    junk.write_bytes(b"\x7fELF this is not a shared library")
    with pytest.raises(DataError) as ei:
        ESpeakNG(library=str(junk), data_path=data)
    assert str(junk) in str(ei.value)


def test_snr_null_is_accepted_by_the_config():
    cfg = from_dict(DataConfig, {"spoken": {"snr_db": None, "voices": ["en", "en-us"]}})
    assert cfg.spoken.snr_db is None and cfg.spoken.voices == ("en", "en-us")


# --------------------------------------------------------------------------- log-mel
def reference_mel_filterbank(sr, n_fft, n_mels):
    """Independent NumPy re-derivation (explicit loops) of the Slaney-scale, area-normalised bank."""
    def mel(f):
        return f * 3 / 200 if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)

    def hz(m):
        return m * 200 / 3 if m < 15 else 1000 * 6.4 ** ((m - 15) / 27)

    top = mel(sr / 2)
    pts = [hz(top * k / (n_mels + 1)) for k in range(n_mels + 2)]
    out = np.zeros((n_mels, n_fft // 2 + 1))
    for i in range(n_mels):
        left, centre, right = pts[i], pts[i + 1], pts[i + 2]
        for b in range(n_fft // 2 + 1):
            f = b * sr / n_fft
            if left < f <= centre:
                out[i, b] = (f - left) / (centre - left)
            elif centre < f < right:
                out[i, b] = (right - f) / (right - centre)
        out[i] *= 2 / (right - left)
    return out


@pytest.mark.parametrize("sr,n_fft,n_mels", [(22050, 1024, 32), (22050, 512, 40), (16000, 400, 20)])
def test_mel_filterbank_matches_independent_reference(sr, n_fft, n_mels):
    fb = mel_filterbank(sr, n_fft, n_mels)
    ref = reference_mel_filterbank(sr, n_fft, n_mels)
    assert fb.shape == ref.shape
    # two float64 derivations of the same filters (~1e-15 apart), ours rounded to float32 once
    np.testing.assert_allclose(fb, ref, rtol=EPS32, atol=1e-12)
    assert (fb.sum(1) > 0).all()   # no empty filter


def test_mel_filterbank_matches_librosa_when_installed():
    librosa = pytest.importorskip("librosa")
    for sr, n_fft, n_mels in [(22050, 1024, 32), (22050, 2048, 64)]:
        # both float64 formulas of the same filters rounded to float32: within an ulp of each other
        np.testing.assert_allclose(mel_filterbank(sr, n_fft, n_mels),
                                   librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels), rtol=2 * EPS32, atol=1e-12)


def test_log_mel_matches_a_numpy_stft():
    cfg = dataclasses.replace(TINY, n_mels=24)
    rng = np.random.default_rng(0)
    t = np.arange(clip_samples(cfg)) / cfg.sample_rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t) * np.hanning(len(t)) + 0.01 * rng.standard_normal(len(t))
    got = log_mel(x[None], cfg)[0]
    # reference: zero-padded frames, periodic Hann, |rfft|^2, mel, dB, 80 dB floor
    n, hop = cfg.n_fft, cfg.hop_length
    padded = np.pad(x, n // 2)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
    frames = np.stack([padded[k * hop: k * hop + n] * win for k in range(num_frames(cfg))])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    fb = reference_mel_filterbank(cfg.sample_rate, n, cfg.n_mels)
    mel = fb @ power.T
    db = 10 * np.log10(np.maximum(mel, 1e-10))
    db = np.maximum(db, db.max() - 80)
    assert got.shape == db.shape == (24, num_frames(cfg))
    # float32 bound: an FFT of n points errs by at most ~2 log2(n) eps32 ||X||_2 per bin
    # (||X||_2 = sqrt(n) ||frame||_2), so a mel band's power errs by 2 e sum w |X| + e^2 sum w;
    # relative to the band's power, through 10 log10, plus the float32 filter bank and log10
    amp = np.sqrt(power)
    e = 2 * math.log2(n) * EPS32 * math.sqrt(n) * np.linalg.norm(frames, axis=1)            # [T]
    dpow = (2 * e[None, :] * (fb @ amp.T) + e[None, :] ** 2 * fb.sum(1)[:, None]) / mel
    bound = 10 * np.log10(1 + dpow + 2 * EPS32) + 4 * EPS32 * np.abs(db)
    floor = db.max() - 80
    bound = np.where(db <= floor + bound, bound + (bound.max()), bound)   # floored cells follow the max
    assert (np.abs(got - db) <= bound).all(), float((np.abs(got - db) - bound).max())
    assert float(bound.max()) < 0.05       # the bound is tight enough to mean something
    assert got[:, 20].argmax() == np.argmax(reference_mel_filterbank(cfg.sample_rate, n, 24)[:, round(440 * n / 22050)])


# --------------------------------------------------------------------------- distillation
def test_image_teacher_to_audio_student_runs(cache, tiny):
    from ucmkd.api import run

    cfg = RunConfig()
    cfg.data = data_cfg(cache)
    cfg.pairing.label_budget = None
    cfg.model.teacher_width = cfg.model.student_width = 4
    cfg.model.teacher_feat_dim = cfg.model.student_feat_dim = 8
    cfg.optim.epochs, cfg.optim.steps_per_epoch, cfg.optim.batch_size, cfg.optim.warmup_epochs = 2, 2, 16, 1
    cfg.teacher.epochs = 1
    cfg.method.name = "kd"
    res = run(cfg)
    assert res["student"] == "spoken-digits/audio" and res["teacher"] == "digits/image"
    assert 0.0 <= res["test_acc"] <= 1.0 and math.isfinite(res["teacher_test_acc"])
