"""The one audio front end of ucmkd: sound files -> fixed-length clips -> log-mel spectrograms.

Shared by the spoken digits (:mod:`ucmkd.data.spoken`) and folder datasets
(:mod:`ucmkd.data.folder`). A clip goes through, in this order (:meth:`FrontEnd.clip`):

1. read with ``soundfile`` as float (full scale 1), channels first [C, L];
2. ``mono``: mixed down to one channel (the mean of the channels);
3. brought to ``sample_rate`` (``scipy.signal.resample_poly``, polyphase with its default
   Kaiser-windowed anti-aliasing filter; up/down reduced by their gcd);
4. ``trim_db``: leading and trailing 5 ms frames quieter than ``trim_db`` below the loudest cut
   (:func:`speech_bounds`);
5. brought to ``length`` samples (:func:`fit_length`): ``crop="centre"`` keeps the middle of a
   longer clip and zero-pads a shorter one equally on both sides (the extra sample at the
   end); ``crop="start"`` keeps the beginning and zero-pads at the end;
6. ``peak_normalize``: scaled to peak 1 (a silent clip stays 0).

Log-mel (:func:`log_mel`): ``torch.stft`` power spectrum (periodic Hann window of ``n_fft``,
centred, zero padding), a Slaney-style mel filter bank built here (:func:`mel_filterbank`),
``10 log10``, floored at :data:`TOP_DB` below each clip's maximum: [N, n_mels, T] with
T = 1 + L // hop_length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError

TOP_DB = 80.0                  # log-mel floor below each clip's maximum
SILENCE_DB = 40.0              # speech = frames within this many dB of the loudest frame
CROPS = ("centre", "start")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


# --------------------------------------------------------------------------- files
def audio_info(path: Path) -> tuple[int, int, int]:
    """(sample rate Hz, channels, frames) of a sound file from its header; DataError naming it."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as e:  # noqa: BLE001 - soundfile raises several kinds
        raise DataError(f"{path}: cannot read as audio ({e})") from None
    return int(info.samplerate), int(info.channels), int(info.frames)


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """A sound file as float64 [C, L] (full scale 1) and its sample rate; DataError naming it."""
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float64", always_2d=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read as audio ({e})") from None
    if data.shape[0] == 0:
        raise DataError(f"{path}: the sound file holds no samples")
    return data.T, int(sr)


# --------------------------------------------------------------------------- waveform steps
def resample(x: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """``x`` [..., L] at ``sr_from`` Hz -> [..., ceil(L sr_to / sr_from)] at ``sr_to`` Hz
    (``scipy.signal.resample_poly``); unchanged when the rates are equal."""
    if sr_from == sr_to:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(int(sr_from), int(sr_to))
    return resample_poly(x, int(sr_to) // g, int(sr_from) // g, axis=-1)


def resampled_length(n: int, sr_from: int, sr_to: int) -> int:
    """Samples of :func:`resample` of ``n`` samples."""
    g = math.gcd(int(sr_from), int(sr_to))
    up, down = int(sr_to) // g, int(sr_from) // g
    return -(-n * up // down)


def speech_bounds(x: np.ndarray, sample_rate: int, silence_db: float = SILENCE_DB) -> tuple[int, int]:
    """[start, end) of the sound in ``x`` [L]: 5 ms frames within ``silence_db`` of the loudest."""
    frame = max(1, sample_rate // 200)
    n = len(x) // frame
    if n == 0:
        return 0, len(x)
    rms = np.sqrt((x[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(1))
    if rms.max() <= 0:
        return 0, 0
    active = np.nonzero(rms >= rms.max() * 10 ** (-silence_db / 20))[0]
    return int(active[0] * frame), int(min(len(x), (active[-1] + 1) * frame))


def fit_length(x: np.ndarray, length: int, crop: str = "centre") -> np.ndarray:
    """``x`` [..., L] cut or zero-padded to [..., length] along the last axis. ``centre``: a
    longer clip keeps samples [(L - length) // 2, + length), a shorter one is placed at offset
    (length - L) // 2; ``start``: keeps the first ``length`` samples, pads at the end."""
    if crop not in CROPS:
        raise DataError(f"unknown crop {crop!r}; choose one of {', '.join(CROPS)}")
    n = x.shape[-1]
    if n >= length:
        a = (n - length) // 2 if crop == "centre" else 0
        return x[..., a: a + length]
    out = np.zeros(x.shape[:-1] + (length,), dtype=x.dtype)
    off = (length - n) // 2 if crop == "centre" else 0
    out[..., off: off + n] = x
    return out


def peak_normalize(x: np.ndarray, peak: float = 1.0) -> np.ndarray:
    """``x`` scaled so that max |x| = ``peak`` (exactly, for peak 1; all-zero input as is)."""
    m = np.abs(x).max() if x.size else 0.0
    return x / m * peak if m > 0 else x


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


def log_mel(audio: np.ndarray, cfg, batch: int = 256) -> np.ndarray:
    """Clips [N, L] (float, full scale 1) -> log-mel dB [N, n_mels, T] (float32), T = 1 + L // hop.

    ``cfg``: anything with ``sample_rate``, ``n_fft``, ``hop_length`` and ``n_mels`` (a
    :class:`FrontEnd`, :class:`~ucmkd.config.SpokenDigitsConfig`). ``torch.stft`` (periodic Hann
    window of n_fft, centred, zero padding) power spectrum, mel filter bank,
    ``10 log10(max(., 1e-10))``, floored at ``TOP_DB`` below each clip's max.
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
    if out:
        return np.concatenate(out).astype(np.float32)
    return np.zeros((0, cfg.n_mels, 1 + np.shape(audio)[-1] // cfg.hop_length), np.float32)


def default_hop(sample_rate: int) -> int:
    """20 ms in samples (441 at 22,050 Hz)."""
    return max(1, round(sample_rate / 50))


def default_n_fft(hop_length: int) -> int:
    """The smallest power of two >= 2 ``hop_length`` (1024 for a hop of 441)."""
    return 1 << max(0, (2 * hop_length - 1).bit_length())


def check_spectrogram(n_fft, hop_length, n_mels, where) -> None:
    """DataError naming the field for STFT / mel settings that cannot work: ``<where>.<field>``,
    or ``where(field)`` for a callable."""
    def name(f: str) -> str:
        return where(f) if callable(where) else f"{where}.{f}"

    for f, v in (("n_mels", n_mels), ("n_fft", n_fft), ("hop_length", hop_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"{name(f)} must be a positive integer, got {v!r}")
    if hop_length > n_fft:
        raise DataError(f"{name('hop_length')} ({hop_length}) must be <= n_fft ({n_fft})")
    if n_mels > n_fft // 2 + 1:
        raise DataError(f"{name('n_mels')} ({n_mels}) must be <= n_fft // 2 + 1 ({n_fft // 2 + 1})")


# --------------------------------------------------------------------------- the chain
@dataclass(frozen=True)
class FrontEnd:
    """Typed settings of the chain of the module docstring: files -> clips [C, length] at
    ``sample_rate`` -> log-mel [C, n_mels, 1 + length // hop_length] (dB)."""

    sample_rate: int                     # Hz of the clips
    length: int                          # samples per clip
    n_mels: int = 32
    hop_length: int = 441                # samples
    n_fft: int = 1024                    # samples
    mono: bool = True
    resample: bool = True                # False: a file at another rate is an error
    trim_db: Optional[float] = None      # None: no silence trimming
    crop: str = "centre"                 # centre | start (:func:`fit_length`)
    peak_normalize: bool = True

    @property
    def frames(self) -> int:
        """Spectrogram frames T of one clip (centred STFT)."""
        return 1 + self.length // self.hop_length

    def clip(self, path: Path) -> np.ndarray:
        """One file -> float64 [C, length] (C = 1 with ``mono``); DataError naming the file."""
        x, sr = read_audio(path)
        if self.mono:
            x = x.mean(0, keepdims=True)
        if sr != self.sample_rate:
            if not self.resample:
                raise DataError(f"{path}: sample rate {sr} Hz, expected {self.sample_rate} Hz (resampling is off)")
            x = resample(x, sr, self.sample_rate)
        if self.trim_db is not None:
            a, b = speech_bounds(np.abs(x).max(0), self.sample_rate, self.trim_db)
            x = x[:, a:b]
        x = fit_length(x, self.length, self.crop)
        return peak_normalize(x) if self.peak_normalize else x

    def log_mel(self, clips: np.ndarray) -> np.ndarray:
        """Clips [N, C, L] -> log-mel dB [N, C, n_mels, T] (float32)."""
        n, c = clips.shape[:2]
        return log_mel(clips.reshape(n * c, -1), self).reshape(n, c, self.n_mels, -1)

    def features(self, paths: list) -> np.ndarray:
        """Files -> log-mel [N, C, n_mels, T] (float32)."""
        clips = [self.clip(p) for p in paths]
        chans = {c.shape[0] for c in clips}
        if len(chans) > 1:
            raise DataError(f"{paths[0]}: the files have {sorted(chans)} channels; mix them down (mono)")
        return self.log_mel(np.stack(clips)) if clips else np.zeros((0, 1, self.n_mels, self.frames), np.float32)
