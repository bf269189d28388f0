"""A ``ctypes`` binding of the eSpeak NG speech synthesiser (its shared library and voice data
shipped by the PyPI package ``espeakng-loader``), in synchronous mode (22,050 Hz, 16-bit): what
the spoken digits dataset (:mod:`ucmkd.data.spoken`) synthesises its clips with."""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np

from ..errors import DataError

ESPEAK_SAMPLE_RATE = 22050     # eSpeak NG synthesises at this rate

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
