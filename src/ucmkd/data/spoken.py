"""Offline spoken digits: "zero" .. "nine" synthesised with eSpeak NG, cached as WAV + log-mel.

The speech synthesiser is the eSpeak NG shared library and voice data shipped by the PyPI
package ``espeakng-loader``, driven through ``ctypes`` in synchronous mode (22,050 Hz, 16-bit).

Recipe (:class:`~ucmkd.config.SpokenDigitsConfig`, ``data.spoken``): every combination of
``voices`` x ``variants`` x ``rates`` x ``pitches`` says each of the 10 digit words once. A
*speaker* is one ``voice+variant`` pair (e.g. ``en-us+f3``): it is the group id, so whole
speakers are held out for the test split (speaker-independent evaluation). Each clip is

1. synthesised from a freshly loaded library instance (eSpeak NG keeps synthesis state, e.g.
   its pitch-flutter phase, across utterances; a fresh instance per clip and a per-clip
   ``espeak_ng_SetRandSeed`` make every clip a function of its own recipe entry only);
2. cut to its speech (frames within 40 dB of the loudest), then zero-padded / trimmed to
   ``duration`` seconds, centred on the speech;
3. peak-normalised, mixed with seeded white Gaussian noise at ``snr_db`` (power of the noise
   over the whole clip vs. power of the speech segment; ``snr_db: null`` = clean);
4. written as 16-bit PCM WAV.

Log-mel spectrograms (the audio front end shared with folder datasets, :mod:`ucmkd.data.audio`:
``torch.stft`` power spectrum, a Slaney-style mel filter bank, ``10 log10``, floor at 80 dB below
each clip's maximum) of all clips are cached in one ``.npz`` file: x [N, 1, n_mels, T] with
T = 1 + duration * sample_rate // hop_length.

Cache layout under ``cache_dir(cfg)/spoken_digits/<recipe-hash>/``: ``manifest.json`` (written
last: the directory is complete), ``wav/<speaker>/<digit>_<word>_r<rate>_p<pitch>.wav`` and
``logmel_<spec-hash>.npz``. The recipe hash covers the synthesis fields only, so changing the
spectrogram settings (n_mels, n_fft, hop_length) recomputes spectrograms from the cached WAVs.
"""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..cache import atomic_path, get_or_build
from ..config import DataConfig, SpokenDigitsConfig, config_hash
from ..errors import DataError
from .audio import (SILENCE_DB, TOP_DB, FrontEnd, check_spectrogram, fit_length, hz_to_mel, log_mel,  # noqa: F401
                    mel_filterbank, mel_to_hz, speech_bounds)
from .base import RawModality, cache_dir, register_dataset
from .espeak import (ESPEAK_SAMPLE_RATE, PITCH_RANGE, RATE_RANGE, ESpeakNG, default_paths,  # noqa: F401
                     get_engine)

DIGIT_CLASSES = [str(i) for i in range(10)]
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GENERATOR_VERSION = 1          # bump when the synthesis/rendering code changes its output
SPECTROGRAM_VERSION = 1
PEAK = 0.5                     # speech peak level before the noise is added (full scale = 1)

# --------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class Clip:
    """One recipe entry: ``speaker`` (= ``voice+variant``) says digit ``digit`` at rate/pitch."""

    voice: str
    variant: str
    rate: int
    pitch: int
    digit: int

    @property
    def speaker(self) -> str:
        return f"{self.voice}+{self.variant}"

    @property
    def word(self) -> str:
        return DIGIT_WORDS[self.digit]

    @property
    def file(self) -> str:
        """Path of the WAV relative to the ``wav/`` directory."""
        return f"{self.speaker}/{self.digit}_{self.word}_r{self.rate}_p{self.pitch}.wav"

    def seed(self, base: int) -> int:
        """Per-clip seed: depends on the base seed and this entry only (not on the grid)."""
        return zlib.crc32(f"{base}|{self.speaker}|{self.rate}|{self.pitch}|{self.digit}".encode())


SYNTH_FIELDS = ("voices", "variants", "rates", "pitches", "snr_db", "sample_rate", "duration", "seed")
SPEC_FIELDS = ("n_mels", "n_fft", "hop_length")


def validate(cfg: SpokenDigitsConfig) -> None:
    """:class:`DataError` naming the ``data.spoken`` field that cannot work."""
    where = "data.spoken"
    for name in ("voices", "variants", "rates", "pitches"):
        v = getattr(cfg, name)
        if not isinstance(v, (tuple, list)) or len(v) == 0:
            raise DataError(f"{where}.{name} must be a non-empty list, got {v!r}")
        if len(set(v)) != len(v):
            raise DataError(f"{where}.{name} has duplicates: {list(v)}")
    for name in ("voices", "variants"):
        for v in getattr(cfg, name):
            if not isinstance(v, str) or not v.strip() or any(ch in v for ch in "+/\\"):
                raise DataError(f"{where}.{name}: invalid name {v!r} (a voice and a variant are listed "
                                f"separately, without '+' or '/')")
    for name, (lo, hi) in (("rates", RATE_RANGE), ("pitches", PITCH_RANGE)):
        for v in getattr(cfg, name):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise DataError(f"{where}.{name}: {v!r} is not an integer in {lo}..{hi}")
    if len(cfg.voices) * len(cfg.variants) < 2:
        raise DataError(f"{where}: need at least 2 speakers (voices x variants) for speaker-held-out "
                        f"test splits, got {len(cfg.voices)} x {len(cfg.variants)}")
    if cfg.sample_rate != ESPEAK_SAMPLE_RATE:
        raise DataError(f"{where}.sample_rate must be {ESPEAK_SAMPLE_RATE} (eSpeak NG's output rate), "
                        f"got {cfg.sample_rate}")
    if not cfg.duration > 0:
        raise DataError(f"{where}.duration must be > 0 seconds, got {cfg.duration}")
    if cfg.snr_db is not None and not np.isfinite(cfg.snr_db):
        raise DataError(f"{where}.snr_db must be a finite number or null, got {cfg.snr_db}")
    check_spectrogram(cfg.n_fft, cfg.hop_length, cfg.n_mels, where)


def recipe(cfg: SpokenDigitsConfig) -> list[Clip]:
    """All clips, ordered by speaker (voice, variant), rate, pitch, digit."""
    validate(cfg)
    return [Clip(v, var, int(r), int(p), d) for v in cfg.voices for var in cfg.variants
            for r in cfg.rates for p in cfg.pitches for d in range(10)]


def _fields(cfg: SpokenDigitsConfig, names) -> dict:
    d = asdict(cfg)
    return {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in names}


def recipe_hash(cfg: SpokenDigitsConfig) -> str:
    """Cache key of the WAVs: the synthesis fields of the recipe and the generator version."""
    return config_hash({"version": GENERATOR_VERSION, **_fields(cfg, SYNTH_FIELDS)})


def spectrogram_hash(cfg: SpokenDigitsConfig) -> str:
    return config_hash({"version": SPECTROGRAM_VERSION, **_fields(cfg, SPEC_FIELDS + ("sample_rate",))})


def clip_samples(cfg: SpokenDigitsConfig) -> int:
    return round(cfg.duration * cfg.sample_rate)


def num_frames(cfg: SpokenDigitsConfig) -> int:
    """Spectrogram frames T of one clip (centred STFT)."""
    return 1 + clip_samples(cfg) // cfg.hop_length


# --------------------------------------------------------------------------- rendering
def render(raw: np.ndarray, cfg: SpokenDigitsConfig, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Synthesised int16 samples -> the clip (int16 [duration * sample_rate]) and its facts.

    Speech segment centred in a zero clip (trimmed symmetrically if longer), peak-normalised to
    ``PEAK``; white Gaussian noise scaled to exactly ``P_speech / 10^(snr_db/10)`` mean power,
    P_speech being the mean power of the speech segment; the mixture is scaled down as a whole
    (the SNR unchanged) if it would clip.
    """
    length = clip_samples(cfg)
    x = raw.astype(np.float64) / 32768.0
    a, b = speech_bounds(x, cfg.sample_rate)
    seg = x[a:b]
    if len(seg) == 0 or np.abs(seg).max() == 0:
        raise DataError("eSpeak NG produced a silent clip")
    trimmed = max(0, len(seg) - length)
    seg = fit_length(seg, min(len(seg), length), "centre")       # a longer segment: its middle
    seg = seg * (PEAK / np.abs(seg).max())
    off = (length - len(seg)) // 2
    clip = fit_length(seg, length, "centre")                       # centred in zeros
    p_speech = float((seg ** 2).mean())
    if cfg.snr_db is not None:
        noise = rng.standard_normal(length)
        noise *= np.sqrt(p_speech / 10 ** (cfg.snr_db / 10) / (noise ** 2).mean())
        clip = clip + noise
    peak = np.abs(clip).max()
    if peak > 0.99:
        clip *= 0.99 / peak
    pcm = np.round(clip * 32767).astype(np.int16)
    return pcm, {"speech_samples": int(b - a), "trimmed_samples": int(trimmed), "offset": int(off)}


# --------------------------------------------------------------------------- WAV cache
def spoken_root(cfg: SpokenDigitsConfig, cache: Path) -> Path:
    return Path(cache) / "spoken_digits" / recipe_hash(cfg)


def synthesize_clips(cfg: SpokenDigitsConfig, wav_dir: Path, engine: ESpeakNG | None = None) -> list[dict]:
    """Synthesise and render every clip of the recipe into ``wav_dir``; the manifest entries."""
    import soundfile as sf

    clips = recipe(cfg)
    engine = engine or get_engine()
    for v in cfg.voices:
        engine.check_voice(v)
    for var in cfg.variants:
        engine.check_voice(cfg.voices[0], var)
    entries = []
    for clip in clips:
        seed = clip.seed(cfg.seed)
        raw = engine.synth(clip.word, clip.speaker, clip.rate, clip.pitch, seed=seed)
        try:
            pcm, info = render(raw, cfg, np.random.default_rng([cfg.seed, seed]))
        except DataError as e:
            raise DataError(f"{clip.speaker} saying {clip.word!r}: {e}") from None
        path = wav_dir / clip.file
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), pcm, cfg.sample_rate, subtype="PCM_16", format="WAV")
        entries.append({"file": clip.file, "digit": clip.digit, "speaker": clip.speaker, "voice": clip.voice,
                        "variant": clip.variant, "rate": clip.rate, "pitch": clip.pitch, "seed": seed,
                        "raw_samples": len(raw), **info})
    return entries


def _read_manifest(path: Path, cfg: SpokenDigitsConfig) -> dict:
    try:
        m = json.loads(path.read_text())
        clips = m["clips"]
        if not isinstance(clips, list):
            raise TypeError("'clips' is not a list")
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: corrupt spoken-digits manifest ({e}); delete {path.parent} to "
                        f"regenerate it") from None
    want = [c.file for c in recipe(cfg)]
    if [c.get("file") for c in clips] != want:
        raise DataError(f"{path}: the manifest does not list this recipe's {len(want)} clips; "
                        f"delete {path.parent} to regenerate it")
    return m


def ensure_wavs(cfg: SpokenDigitsConfig, cache: Path, engine: ESpeakNG | None = None) -> tuple[Path, dict, float]:
    """The complete WAV cache of ``cfg`` (generated atomically if absent): (root, manifest, seconds).

    Clips are written into a private temporary directory, the manifest last, and the directory
    then renamed to ``root``; a directory that exists is complete, or not ours (a DataError).
    """
    root = spoken_root(cfg, cache)
    manifest = root / "manifest.json"
    if root.exists():
        if not manifest.is_file():
            raise DataError(f"{manifest}: missing spoken-digits manifest; delete {root} to regenerate it")
        return root, _read_manifest(manifest, cfg), 0.0
    t0 = time.perf_counter()
    with atomic_path(root) as tmp:     # a concurrent writer that completes first wins
        eng = engine or get_engine()
        entries = synthesize_clips(cfg, tmp / "wav", eng)
        seconds = time.perf_counter() - t0
        m = {"recipe": _fields(cfg, SYNTH_FIELDS), "recipe_hash": root.name, "generator_version": GENERATOR_VERSION,
             "espeak_ng_version": eng.version, "classes": DIGIT_CLASSES, "synthesis_seconds": seconds,
             "clips": entries}
        (tmp / "manifest.json").write_text(json.dumps(m, indent=1))
    return root, _read_manifest(manifest, cfg), seconds


def read_wav(path: Path, cfg: SpokenDigitsConfig) -> np.ndarray:
    """One cached clip as int16 [duration * sample_rate]; DataError naming a bad file."""
    import soundfile as sf

    if not path.is_file():
        raise DataError(f"{path}: missing spoken-digits clip; delete {path.parents[2]} to regenerate the set")
    try:
        info = sf.info(str(path))
        data, sr = sf.read(str(path), dtype="int16", always_2d=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: corrupt WAV ({e}); delete {path.parents[2]} to regenerate the set") from None
    n = clip_samples(cfg)
    if sr != cfg.sample_rate or info.subtype != "PCM_16" or data.ndim != 1 or len(data) != n:
        raise DataError(f"{path}: expected mono 16-bit PCM, {cfg.sample_rate} Hz, {n} samples; got "
                        f"{info.channels} channel(s) {info.subtype}, {sr} Hz, {info.frames} samples")
    return data


# --------------------------------------------------------------------------- log-mel
def front_end(cfg: SpokenDigitsConfig) -> FrontEnd:
    """The audio front end of the set: its clips are already rendered at ``sample_rate``,
    centred and peak-normalised (:func:`render`), so only the log-mel step applies."""
    return FrontEnd(sample_rate=cfg.sample_rate, length=clip_samples(cfg), n_mels=cfg.n_mels,
                    hop_length=cfg.hop_length, n_fft=cfg.n_fft, crop="centre", peak_normalize=False)


def compute_logmel(cfg: SpokenDigitsConfig, root: Path, manifest: dict) -> np.ndarray:
    """Log-mel spectrograms of every cached WAV, [N, 1, n_mels, T]."""
    wav_dir = root / "wav"
    audio = np.stack([read_wav(wav_dir / c["file"], cfg) for c in manifest["clips"]]).astype(np.float32)
    return front_end(cfg).log_mel(audio[:, None] / 32768.0)


@dataclass
class SpokenDigits:
    """The loaded set: x [N, 1, n_mels, T], y [N], speaker [N] (group ids), plus where and how long."""

    x: np.ndarray
    y: np.ndarray
    speaker: np.ndarray
    root: Path
    spec_path: Path
    manifest: dict
    seconds: dict = field(default_factory=dict)   # synthesis, spectrograms (0 when cached)


def load_spoken_digits(cfg: SpokenDigitsConfig, cache: Path, engine: ESpeakNG | None = None) -> SpokenDigits:
    """Load the spoken-digits set of recipe ``cfg`` from ``cache``, generating what is missing."""
    validate(cfg)
    root, manifest, synth_s = ensure_wavs(cfg, Path(cache), engine)
    clips = manifest["clips"]
    y = np.array([int(c["digit"]) for c in clips], dtype=np.int64)
    speaker = np.array([str(c["speaker"]) for c in clips])
    spec_path = root / f"logmel_{spectrogram_hash(cfg)}.npz"
    want = (len(clips), 1, cfg.n_mels, num_frames(cfg))
    spec_s = 0.0

    def read(p):
        with np.load(p, allow_pickle=False) as d:
            x, y_file = d["x"], d["y"]
        if x.shape != want or x.dtype != np.float32 or not np.array_equal(y_file, y):
            raise DataError(f"{p}: expected log-mel float32 {list(want)} matching the manifest, got "
                            f"{x.dtype} {list(x.shape)}; delete the file to recompute it")
        return x

    def compute():
        nonlocal spec_s
        t0 = time.perf_counter()
        x = compute_logmel(cfg, root, manifest)
        spec_s = time.perf_counter() - t0
        return x

    x = get_or_build(spec_path, compute, lambda x, tmp: np.savez(tmp, x=x, y=y, speaker=speaker), read,
                     "log-mel cache")
    return SpokenDigits(x=x, y=y, speaker=speaker, root=root, spec_path=spec_path, manifest=manifest,
                        seconds={"synthesis": synth_s, "spectrograms": spec_s})


@register_dataset("spoken-digits/audio", reads=("spoken",))
def spoken_digits_audio(cfg: DataConfig) -> RawModality:
    """Spoken digits (eSpeak NG, offline): log-mel x [N, 1, n_mels, T]; groups = speaker
    (``voice+variant``), so test speakers are never seen in training. Stored as ``image``,
    augmented as ``spectrogram`` (SpecAugment-style masks, :mod:`ucmkd.augment`)."""
    d = load_spoken_digits(cfg.spoken, cache_dir(cfg))
    return RawModality(x=d.x, y=d.y, classes=DIGIT_CLASSES, kind="image", source=str(d.spec_path),
                       groups=d.speaker, fingerprint={"spoken": asdict(cfg.spoken)}, augment="spectrogram")
