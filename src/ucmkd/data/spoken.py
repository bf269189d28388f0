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

Log-mel spectrograms (``torch.stft`` power spectrum, a Slaney-style mel filter bank built here,
``10 log10``, floor at 80 dB below each clip's maximum) of all clips are cached in one ``.npz``
file: x [N, 1, n_mels, T] with T = 1 + duration * sample_rate // hop_length.

Cache layout under ``cache_dir(cfg)/spoken_digits/<recipe-hash>/``: ``manifest.json`` (written
last: the directory is complete), ``wav/<speaker>/<digit>_<word>_r<rate>_p<pitch>.wav`` and
``logmel_<spec-hash>.npz``. The recipe hash covers the synthesis fields only, so changing the
spectrogram settings (n_mels, n_fft, hop_length) recomputes spectrograms from the cached WAVs.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
import threading
import time
import weakref
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..cache import atomic_path, get_or_build
from ..config import DataConfig, SpokenDigitsConfig, config_hash
from ..errors import DataError
from .base import RawModality, cache_dir, register_dataset

DIGIT_CLASSES = [str(i) for i in range(10)]
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GENERATOR_VERSION = 1          # bump when the synthesis/rendering code changes its output
SPECTROGRAM_VERSION = 1
ESPEAK_SAMPLE_RATE = 22050     # eSpeak NG synthesises at this rate
SILENCE_DB = 40.0              # speech = frames within this many dB of the loudest frame
TOP_DB = 80.0                  # log-mel floor below each clip's maximum
PEAK = 0.5                     # speech peak level before the noise is added (full scale = 1)

# eSpeak NG C API constants (speak_lib.h)
AUDIO_OUTPUT_SYNCHRONOUS = 2
espeakINITIALIZE_DONT_EXIT = 0x8000   # return an error instead of calling exit()
espeakRATE, espeakPITCH = 1, 3
POS_CHARACTER = 1
espeakCHARS_UTF8 = 1
EE_OK, EE_INTERNAL_ERROR, EE_BUFFER_FULL, EE_NOT_FOUND = 0, -1, 1, 2
RATE_RANGE = (80, 450)         # espeakRATE_MINIMUM .. espeakRATE_MAXIMUM (words per minute)
PITCH_RANGE = (0, 99)

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)
_LOCK = threading.RLock()      # eSpeak NG is global state: one synthesis at a time per process


class _EspeakVoice(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p),
                ("identifier", ctypes.c_char_p), ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte),
                ("variant", ctypes.c_ubyte), ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int),
                ("spare", ctypes.c_void_p)]


def _declare(lib) -> None:
    """ctypes signatures of the eSpeak NG functions used here."""
    c = ctypes
    lib.espeak_Initialize.argtypes = [c.c_int, c.c_int, c.c_char_p, c.c_int]
    lib.espeak_Initialize.restype = c.c_int
    lib.espeak_Info.argtypes = [c.POINTER(c.c_char_p)]
    lib.espeak_Info.restype = c.c_char_p
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [c.c_char_p]
    lib.espeak_SetVoiceByName.restype = c.c_int
    lib.espeak_SetParameter.argtypes = [c.c_int, c.c_int, c.c_int]
    lib.espeak_SetParameter.restype = c.c_int
    lib.espeak_Synth.argtypes = [c.c_void_p, c.c_size_t, c.c_uint, c.c_int, c.c_uint, c.c_uint,
                                 c.c_void_p, c.c_void_p]
    lib.espeak_Synth.restype = c.c_int
    lib.espeak_Synchronize.restype = c.c_int
    lib.espeak_Terminate.restype = c.c_int
    lib.espeak_ListVoices.argtypes = [c.c_void_p]
    lib.espeak_ListVoices.restype = c.POINTER(c.POINTER(_EspeakVoice))
    if hasattr(lib, "espeak_ng_SetRandSeed"):
        lib.espeak_ng_SetRandSeed.argtypes = [c.c_long]
        lib.espeak_ng_SetRandSeed.restype = None


def _unload(handle: int) -> None:
    import _ctypes

    close = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
    if close is not None:
        close(handle)


def default_paths() -> tuple[str, str]:
    """(shared library, voice data directory) of the ``espeakng-loader`` package."""
    try:
        import espeakng_loader
    except ImportError:
        raise DataError("spoken-digits needs the eSpeak NG library of the 'espeakng-loader' package: "
                        "pip install espeakng-loader") from None
    try:
        return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except Exception as e:  # noqa: BLE001  (its data check raises RuntimeError)
        raise DataError(f"espeakng-loader: cannot locate the eSpeak NG library/data ({e})") from None


class ESpeakNG:
    """ctypes binding to one eSpeak NG shared library (synchronous output, 16-bit, 22,050 Hz).

    The library is copied to a private temporary file and loaded afresh for every utterance
    (about 1 ms): eSpeak NG keeps global synthesis state between utterances, and another user
    of the same library in this process (e.g. a phonemiser) must neither see nor disturb ours.

    Raises :class:`DataError` naming the library path if it cannot be loaded or initialised,
    and naming the voice or variant if it does not exist.
    """

    def __init__(self, library: str | None = None, data_path: str | None = None):
        if library is None or data_path is None:
            lib_default, data_default = default_paths()
            library, data_path = library or lib_default, data_path or data_default
        self.library, self.data_path = str(library), str(data_path)
        if not Path(self.library).is_file():
            raise DataError(f"eSpeak NG library not found: {self.library}")
        if not Path(self.data_path, "phontab").is_file():
            raise DataError(f"eSpeak NG data directory {self.data_path} has no 'phontab' file")
        self._tmpdir = tempfile.mkdtemp(prefix="ucmkd-espeak-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        self._private = os.path.join(self._tmpdir, "libespeak-ng-private" + Path(self.library).suffix)
        shutil.copyfile(self.library, self._private)
        self._voices: dict | None = None
        self._variants: list | None = None
        with self._session() as lib:
            p = ctypes.c_char_p()
            self.version = (lib.espeak_Info(ctypes.byref(p)) or b"?").decode(errors="replace")
            self._seedable = hasattr(lib, "espeak_ng_SetRandSeed")

    def close(self) -> None:
        self._finalizer()

    # ---------------------------------------------------------------- library sessions
    def _session(self):
        engine = self

        class _Session:
            def __enter__(self):
                _LOCK.acquire()
                try:
                    self.lib = ctypes.CDLL(engine._private)
                except OSError as e:
                    _LOCK.release()
                    raise DataError(f"cannot load the eSpeak NG library {engine.library}: {e}") from None
                try:
                    _declare(self.lib)
                except AttributeError as e:
                    _unload(self.lib._handle)
                    _LOCK.release()
                    raise DataError(f"{engine.library} is not an eSpeak NG library: {e}") from None
                try:
                    rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, engine.data_path.encode(),
                                                      espeakINITIALIZE_DONT_EXIT)
                except Exception:
                    self.__exit__(None, None, None)
                    raise
                if rate != ESPEAK_SAMPLE_RATE:
                    self.__exit__(None, None, None)
                    raise DataError(f"eSpeak NG library {engine.library} failed to initialise with data "
                                    f"{engine.data_path} (espeak_Initialize returned {rate})")
                return self.lib

            def __exit__(self, *exc):
                try:
                    try:
                        self.lib.espeak_Terminate()
                    finally:
                        _unload(self.lib._handle)
                finally:
                    _LOCK.release()
                return False

        return _Session()

    # ---------------------------------------------------------------- voices
    def voices(self) -> dict:
        """Voice name -> eSpeak identifier, for every file name, language code and voice name."""
        if self._voices is None:
            out = {}
            with self._session() as lib:
                arr = lib.espeak_ListVoices(None)
                i = 0
                while arr and arr[i]:
                    v = arr[i].contents
                    ident = (v.identifier or b"").decode()
                    names = {ident, ident.rsplit("/", 1)[-1], (v.name or b"").decode()}
                    p = v.languages or 0
                    while p and ctypes.string_at(p, 1) != b"\0":   # [priority byte, name, NUL]*, NUL
                        lang = ctypes.string_at(p + 1)
                        names.add(lang.decode())
                        p += len(lang) + 2
                    for n in names - {""}:
                        out.setdefault(n.lower(), ident)
                    i += 1
            self._voices = out
        return self._voices

    def variants(self) -> list[str]:
        """Names of the voice variants (files of ``voices/!v`` in the data directory)."""
        if self._variants is None:
            d = Path(self.data_path, "voices", "!v")
            self._variants = sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []
        return self._variants

    def check_voice(self, voice: str, variant: str | None = None) -> None:
        """:class:`DataError` naming ``voice`` / ``variant`` if eSpeak NG does not have it."""
        if voice.lower() not in self.voices():
            english = sorted(n for n in self.voices() if n.startswith("en") and "/" not in n)
            raise DataError(f"eSpeak NG has no voice {voice!r} (data {self.data_path}); "
                            f"English voices: {', '.join(english)}")
        # eSpeak NG silently ignores an unknown variant, so check its file ourselves
        if variant is not None and variant not in self.variants():
            raise DataError(f"eSpeak NG has no voice variant {variant!r} (looked in "
                            f"{Path(self.data_path, 'voices', '!v')}); variants: {', '.join(self.variants())}")

    # ---------------------------------------------------------------- synthesis
    def synth(self, text: str, voice: str, rate: int = 175, pitch: int = 50, seed: int = 0) -> np.ndarray:
        """Synthesise ``text`` with ``voice`` (``"name"`` or ``"name+variant"``); int16 samples [L].

        A fresh library instance per call: the result depends only on the arguments.
        """
        name, _, variant = voice.partition("+")
        self.check_voice(name, variant or None)
        chunks: list[np.ndarray] = []

        def on_samples(wav, n, _events):
            if n > 0 and wav:
                chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
            return 0  # continue

        callback = _SYNTH_CALLBACK(on_samples)
        with self._session() as lib:
            lib.espeak_SetSynthCallback(callback)
            err = lib.espeak_SetVoiceByName(voice.encode())
            if err != EE_OK:
                raise DataError(f"eSpeak NG rejected voice {voice!r} (error {err})")
            for param, value in ((espeakRATE, rate), (espeakPITCH, pitch)):
                if lib.espeak_SetParameter(param, int(value), 0) != EE_OK:
                    raise DataError(f"eSpeak NG rejected parameter {param}={value} for voice {voice!r}")
            if self._seedable:
                lib.espeak_ng_SetRandSeed(int(seed) & 0x7FFFFFFF)
            buf = text.encode("utf-8") + b"\0"
            err = lib.espeak_Synth(buf, len(buf), 0, POS_CHARACTER, 0, espeakCHARS_UTF8, None, None)
            if err != EE_OK:
                raise DataError(f"eSpeak NG failed to synthesise {text!r} with voice {voice!r} (error {err})")
            lib.espeak_Synchronize()
        if not chunks:
            raise DataError(f"eSpeak NG produced no audio for {text!r} with voice {voice!r}")
        return np.concatenate(chunks).astype(np.int16, copy=False)


_ENGINE: ESpeakNG | None = None


def get_engine() -> ESpeakNG:
    """The process-wide binding to espeakng-loader's library (created on first use)."""
    global _ENGINE
    with _LOCK:
        if _ENGINE is None:
            _ENGINE = ESpeakNG()
        return _ENGINE


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
    for name in SPEC_FIELDS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"{where}.{name} must be a positive integer, got {v!r}")
    if cfg.hop_length > cfg.n_fft:
        raise DataError(f"{where}.hop_length ({cfg.hop_length}) must be <= n_fft ({cfg.n_fft})")
    if cfg.n_mels > cfg.n_fft // 2 + 1:
        raise DataError(f"{where}.n_mels ({cfg.n_mels}) must be <= n_fft // 2 + 1 ({cfg.n_fft // 2 + 1})")


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
def speech_bounds(x: np.ndarray, sample_rate: int, silence_db: float = SILENCE_DB) -> tuple[int, int]:
    """[start, end) of the speech in ``x``: 5 ms frames within ``silence_db`` of the loudest."""
    frame = max(1, sample_rate // 200)
    n = len(x) // frame
    if n == 0:
        return 0, len(x)
    rms = np.sqrt((x[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(1))
    if rms.max() <= 0:
        return 0, 0
    active = np.nonzero(rms >= rms.max() * 10 ** (-silence_db / 20))[0]
    return int(active[0] * frame), int(min(len(x), (active[-1] + 1) * frame))


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
    if trimmed:
        seg = seg[trimmed // 2: trimmed // 2 + length]
    seg = seg * (PEAK / np.abs(seg).max())
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
def hz_to_mel(f):
    """Slaney's auditory-toolbox mel scale: linear below 1 kHz (3 mels per 200 Hz), log above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    lin = m * (200.0 / 3)
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
    return np.where(m >= 15.0, log, lin)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Triangular mel filters [n_mels, n_fft // 2 + 1] on the Slaney mel scale, area-normalised
    (each filter scaled by 2 / its bandwidth in Hz), as in Slaney's toolbox."""
    fmax = sample_rate / 2 if fmax is None else fmax
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lo) / (mid - lo)
    falling = (hi - freqs[None]) / (hi - mid)
    w = np.maximum(0.0, np.minimum(rising, falling))
    return (w * (2.0 / (hi - lo))).astype(np.float32)


def log_mel(audio: np.ndarray, cfg: SpokenDigitsConfig, batch: int = 256) -> np.ndarray:
    """Clips [N, L] (float, full scale 1) -> log-mel dB [N, n_mels, T] (float32).

    ``torch.stft`` (periodic Hann window of n_fft, centred, zero padding) power spectrum,
    mel filter bank, ``10 log10(max(., 1e-10))``, floored at ``TOP_DB`` below each clip's max.
    """
    import torch

    fb = torch.from_numpy(mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels))
    window = torch.hann_window(cfg.n_fft, periodic=True)
    out = []
    with torch.no_grad():
        for i in range(0, len(audio), batch):
            x = torch.as_tensor(np.asarray(audio[i: i + batch], dtype=np.float32))
            spec = torch.stft(x, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.n_fft, window=window,
                              center=True, pad_mode="constant", return_complex=True)
            mel = torch.matmul(fb, spec.abs() ** 2)
            db = 10.0 * torch.log10(mel.clamp_min(1e-10))
            db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - TOP_DB)
            out.append(db.numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, cfg.n_mels, num_frames(cfg)), np.float32)


def compute_logmel(cfg: SpokenDigitsConfig, root: Path, manifest: dict) -> np.ndarray:
    """Log-mel spectrograms of every cached WAV, [N, 1, n_mels, T]."""
    wav_dir = root / "wav"
    audio = np.stack([read_wav(wav_dir / c["file"], cfg) for c in manifest["clips"]]).astype(np.float32)
    return log_mel(audio / 32768.0, cfg)[:, None]


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
