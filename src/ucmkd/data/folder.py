"""Folder datasets: ``folder:PATH`` reads a folder of sound files, images or ``.npy`` arrays the
way users keep them (docs/data.md "Folder datasets").

Layouts (``data.folder``, :class:`~ucmkd.config.FolderConfig`; one dataset overrides options in
its name, ``folder:PATH?key=value&key=value``):

- class subfolders: ``PATH/<class>/<file>`` (files at any depth below the class folder);
- a file-name ``pattern`` such as ``{label}_{group}_{*}.wav``: ``{label}`` is the class,
  ``{group}`` the group (speaker, subject, session), ``{*}`` anything; a pattern without
  ``{label}`` takes the class from the subfolder;
- ``PATH/train``, ``PATH/val``, ``PATH/test`` (``split_folders``) hold the dataset's own split
  (:attr:`RawModality.split`), each in one of the layouts above;
- groups (``group_from``): the pattern's ``{group}``, or the folder holding each file
  (``PATH/<class>/<group>/<file>``); whole groups are then held out for the test split.

Hidden files and folders (``.name``) are skipped, as are files whose suffix no reader takes
(or not in ``extensions``). A reader (:data:`READERS`) turns the files into items: ``audio``
(log-mel through :mod:`ucmkd.data.audio`, kind ``image`` [N, C, n_mels, T], augmented as
``spectrogram``), ``image`` (Pillow, [N, C, H, W] in [0, 1]) or ``array`` (``.npy``, one item
per file, the kind by its dimensions).

Decoded items are cached (``<cache>/folders/<name>-<key>.npz``, uncompressed, memory-mapped
when read back) under a key of every file's relative path and SHA-256 of its bytes, the
reader, its version and the options that change its output: a changed file or option decodes
again, an unchanged folder is read back (its files are still hashed, at disk speed).
"""
from __future__ import annotations

import hashlib
import os
import re
import typing
import urllib.parse
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import yaml

from ..cache import content_key, entry, get_or_write, write_npz_rows
from ..config import DataConfig, FolderConfig, from_dict
from ..errors import ConfigError, DataError
from ..registry import Registry
from .audio import AUDIO_SUFFIXES, FrontEnd, audio_info, check_spectrogram, default_hop, default_n_fft, \
    resampled_length
from .base import RawModality, _mapped, cache_dir, register_scheme
from .standardize import chunk_rows

PREFIX = "folder:"
FOLDER_VERSION = 1                       # bump when the listing or the cache layout changes
SPLIT_NAMES = ("train", "val", "test")
PLACEHOLDERS = {"{label}": r"(?P<label>.+?)", "{group}": r"(?P<group>.+?)", "{*}": r".*?"}
KIND_BY_NDIM = {2: "vector", 3: "signal", 4: "image"}


# --------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class FolderSpec:
    """A parsed ``folder:PATH?key=value&...``: the folder, the options (``data.folder`` with the
    spec's overrides) and which options the spec set (for naming them in errors)."""

    text: str
    path: Path
    options: FolderConfig
    overridden: frozenset = frozenset()

    def label(self, name: str) -> str:
        """How errors name option ``name``: ``data.folder.<name>``, or the spec's own option."""
        return f"{self.text}: option {name}" if name in self.overridden else f"data.folder.{name}"


def _is_text(tp) -> bool:
    return tp is str or (typing.get_origin(tp) is typing.Union and str in typing.get_args(tp))


def _is_tuple(tp) -> bool:
    return tp is tuple or (typing.get_origin(tp) is typing.Union and tuple in typing.get_args(tp))


def _option_value(raw: str, tp, where: str):
    """One spec option's text -> a value for field type ``tp``: text fields literally (``null``:
    None), lists as ``a,b,c`` or a YAML list, everything else as YAML; ``%XX`` escapes decoded."""
    raw = urllib.parse.unquote(raw)
    if raw == "null":
        return None
    if _is_text(tp):
        return raw
    if _is_tuple(tp) and not raw.startswith("["):
        return [v for v in raw.split(",") if v]
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot parse the value {raw!r}: {e}") from None


def parse_spec(spec: str, base: FolderConfig | None = None) -> FolderSpec:
    """``folder:PATH?key=value&key=value`` -> :class:`FolderSpec`. ``base`` (``data.folder``) is
    validated with errors naming ``data.folder.<field>``, the spec's options with errors naming
    the spec and the option."""
    if not spec.startswith(PREFIX):
        raise ConfigError(f"{spec!r} is not a folder dataset (folder:PATH)")
    path_text, sep, query = spec[len(PREFIX):].partition("?")
    if not path_text:
        raise ConfigError(f"{spec!r}: no folder path; write folder:PATH or folder:PATH?key=value&...")
    base_dict = asdict(from_dict(FolderConfig, asdict(base or FolderConfig()), "data.folder"))
    hints = typing.get_type_hints(FolderConfig)
    known = [f.name for f in fields(FolderConfig)]
    overrides: dict = {}
    for part in query.split("&") if sep else []:
        if not part:
            continue
        key, eq, raw = part.partition("=")
        if not eq or not key:
            raise ConfigError(f"{spec}: option {part!r} is not of the form key=value")
        if key not in known:
            raise ConfigError(f"{spec}: unknown option {key!r}; known options: {', '.join(known)}")
        overrides[key] = _option_value(raw, hints[key], f"{spec}: option {key}")
    try:
        options = from_dict(FolderConfig, {**base_dict, **overrides}, "")
    except ConfigError as e:
        raise ConfigError(f"{spec}: option {e}") from None
    return FolderSpec(text=spec, path=Path(path_text).expanduser(), options=options,
                      overridden=frozenset(overrides))


def compile_pattern(pattern: str, where: str) -> re.Pattern:
    """A file-name pattern -> a regex matched against whole file names: ``{label}`` and
    ``{group}`` (each at most once) capture as few characters as the rest allows, ``{*}``
    matches anything; all other characters match themselves."""
    pieces = re.split(r"(\{[^{}]*\})", pattern)
    out, seen = [], Counter()
    for p in pieces:
        if p in PLACEHOLDERS:
            seen[p] += 1
            out.append(PLACEHOLDERS[p])
        elif p.startswith("{") and p.endswith("}"):
            raise ConfigError(f"{where}: unknown placeholder {p} in {pattern!r}; use {{label}}, {{group}}, {{*}}")
        else:
            if "{" in p or "}" in p:
                raise ConfigError(f"{where}: unbalanced brace in {pattern!r}")
            out.append(re.escape(p))
    for p in ("{label}", "{group}"):
        if seen[p] > 1:
            raise ConfigError(f"{where}: {p} appears {seen[p]} times in {pattern!r} (at most once)")
    if "/" in pattern or os.sep in pattern:
        raise ConfigError(f"{where}: {pattern!r} must match file names, without folders")
    return re.compile("".join(out), re.DOTALL)


# --------------------------------------------------------------------------- readers
@dataclass(frozen=True)
class Plan:
    """What a reader will make of a list of files: the item ``shape`` and ``decode(paths) ->
    float32 [n, *shape]``."""

    shape: tuple
    decode: Callable[[list], np.ndarray]


@dataclass(frozen=True)
class Reader:
    """One kind of file: its suffixes, the options that change its output, an output version
    (part of the cache key: bump it when the decoding changes), the augmentation kind of its
    items (None: the layout kind) and ``plan(paths, spec) -> Plan``, which reads the files'
    headers and checks that they make one array (DataError naming a file)."""

    suffixes: tuple
    options: tuple
    version: int
    plan: Callable[[list, FolderSpec], Plan]
    augment: Optional[str] = None


READERS: Registry[Reader] = Registry("folder reader")


def _first(paths: list, values: list, value) -> Path:
    return next(p for p, v in zip(paths, values) if v == value)


def _audio_plan(paths: list, spec: FolderSpec) -> Plan:
    o = spec.options
    infos = [audio_info(p) for p in paths]
    rates = [i[0] for i in infos]
    sr = o.sample_rate
    if sr is None:
        if len(set(rates)) > 1:
            ex = ", ".join(f"{r} Hz ({_first(paths, rates, r)})" for r in sorted(set(rates)))
            raise DataError(f"{spec.text}: the files have different sample rates: {ex}; set "
                            f"{spec.label('sample_rate')} to bring them to one")
        sr = rates[0]
    elif not o.resample:
        for p, r in zip(paths, rates):
            if r != sr:
                raise DataError(f"{p}: sample rate {r} Hz, but {spec.label('sample_rate')} is {sr} Hz and "
                                f"{spec.label('resample')} is off")
    chans = [i[1] for i in infos]
    if not o.mono and len(set(chans)) > 1:
        ex = ", ".join(f"{c} ({_first(paths, chans, c)})" for c in sorted(set(chans)))
        raise DataError(f"{spec.text}: the files have different channel counts: {ex}; set {spec.label('mono')}")
    length = (round(o.duration * sr) if o.duration is not None
              else max(resampled_length(i[2], i[0], sr) for i in infos))
    if length < 1:
        raise DataError(f"{spec.text}: clips of {length} samples at {sr} Hz; set {spec.label('duration')}")
    hop = o.hop_length or default_hop(sr)
    n_fft = o.n_fft or default_n_fft(hop)
    check_spectrogram(n_fft, hop, o.n_mels, spec.label)
    fe = FrontEnd(sample_rate=sr, length=length, n_mels=o.n_mels, hop_length=hop, n_fft=n_fft, mono=o.mono,
                  resample=o.resample, trim_db=o.trim_db, crop=o.crop, peak_normalize=o.peak_normalize)
    return Plan(shape=(1 if o.mono else chans[0], o.n_mels, fe.frames), decode=fe.features)


READERS.register("audio")(Reader(
    suffixes=AUDIO_SUFFIXES, version=1, augment="spectrogram", plan=_audio_plan,
    options=("sample_rate", "resample", "mono", "trim_db", "duration", "crop", "peak_normalize", "n_mels",
             "hop_length", "n_fft")))

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _open_image(path: Path):
    from PIL import Image

    try:
        return Image.open(path)
    except Exception as e:  # noqa: BLE001 - Pillow raises several kinds
        raise DataError(f"{path}: cannot read as an image ({e})") from None


def _image_plan(paths: list, spec: FolderSpec) -> Plan:
    from PIL import Image

    o = spec.options
    heads = []
    for p in paths:
        with _open_image(p) as im:
            heads.append((im.size, im.mode))
    mode = o.image_mode if o.image_mode != "auto" else (
        "L" if all(m in GRAY_MODES for _, m in heads) else "RGB")
    if o.image_size is not None:
        size = (o.image_size, o.image_size)
    else:
        sizes = [s for s, _ in heads]
        size = sizes[0]
        for p, s in zip(paths, sizes):
            if s != size:
                raise DataError(f"{p}: {s[0]}x{s[1]} pixels, but {paths[0]} is {size[0]}x{size[1]} (width x "
                                f"height); set {spec.label('image_size')} to resize them to one size")
    flt = getattr(Image.Resampling, o.image_resample.upper())

    def decode(block: list) -> np.ndarray:
        out = []
        for p in block:
            try:
                with _open_image(p) as im:
                    im = im.convert(mode)
                    if im.size != size:
                        im = im.resize(size, flt)
                    a = np.asarray(im, dtype=np.float32) / 255.0
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - a truncated file fails only when decoded
                raise DataError(f"{p}: cannot decode the image ({e})") from None
            out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        return np.stack(out)

    return Plan(shape=(1 if mode == "L" else 3, size[1], size[0]), decode=decode)


READERS.register("image")(Reader(suffixes=IMAGE_SUFFIXES, version=1, plan=_image_plan,
                                 options=("image_mode", "image_size", "image_resample")))


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read as .npy ({e})") from None
    if not isinstance(a, np.ndarray) or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise DataError(f"{path}: expected a numeric array, got {getattr(a, 'dtype', type(a).__name__)}")
    return a


def _array_plan(paths: list, spec: FolderSpec) -> Plan:
    shape = None
    for p in paths:
        a = _load_npy(p, mmap=True)
        if not 1 <= a.ndim <= 3:
            raise DataError(f"{p}: an item must be [D], [C, L] or [C, H, W], got {list(a.shape)}")
        if shape is None:
            shape, first = a.shape, p
        elif a.shape != shape:
            raise DataError(f"{p}: shape {list(a.shape)}, but {first} has {list(shape)} (one shape for all)")

    def decode(block: list) -> np.ndarray:
        return np.stack([_load_npy(p, mmap=False).astype(np.float32) for p in block])

    return Plan(shape=tuple(shape), decode=decode)


READERS.register("array")(Reader(suffixes=(".npy",), version=1, plan=_array_plan, options=()))


def reader_suffixes() -> dict:
    """Suffix -> reader name, over every registered reader."""
    return {s: name for name in READERS for s in READERS.get(name).suffixes}


# --------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class Item:
    """One file: its path, its path relative to the dataset folder ('/'-separated), its class
    name, group (or None) and split (``train``/``val``/``test``, or None)."""

    path: Path
    rel: str
    label: str
    group: Optional[str] = None
    split: Optional[str] = None


@dataclass
class Listing:
    items: list
    classes: list
    reader: str
    skipped: dict = field(default_factory=dict)     # suffix -> files skipped


def _walk(d: Path) -> list:
    """Visible files below ``d`` (hidden files and folders skipped), sorted, links followed."""
    out = []
    for top, dirs, files in os.walk(d, followlinks=True):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [Path(top, f) for f in sorted(files) if not f.startswith(".")]
    return out


def _subdirs(d: Path) -> list:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _parts(spec: FolderSpec) -> list:
    """[(split name or None, folder)]: the split folders, or the whole folder."""
    root, want = spec.path, spec.options.split_folders
    names = {p.name for p in _subdirs(root)}
    is_split = bool(names) and names <= set(SPLIT_NAMES) and {"train", "test"} <= names
    if want is None and not is_split or want is False:
        return [(None, root)]
    if not is_split:
        stray = sorted(names - set(SPLIT_NAMES))
        raise DataError(f"{root}: {spec.label('split_folders')} is on, but the top folders are "
                        f"{sorted(names)}" + (f" ({stray} are not train/val/test)" if stray else
                                              " (need train and test)"))
    return [(s, root / s) for s in SPLIT_NAMES if s in names]


def _suffixes(spec: FolderSpec) -> dict:
    """Suffix -> reader name, of the files read."""
    known = reader_suffixes()
    if spec.options.extensions is None:
        return known
    out = {}
    for e in spec.options.extensions:
        s = "." + str(e).lower().lstrip(".")
        if s not in known:
            raise ConfigError(f"{spec.label('extensions')}: no reader takes {s!r} files; known: "
                              f"{', '.join(sorted(known))}")
        out[s] = known[s]
    return out


def list_files(spec: FolderSpec) -> Listing:
    """The items of a folder dataset, sorted by relative path, with their classes and reader;
    DataError naming the folder or file at fault."""
    o, root = spec.options, spec.path
    if not root.is_dir():
        raise DataError(f"{spec.text}: folder not found: {root}" if not root.exists() else
                        f"{spec.text}: {root} is not a folder")
    rx = compile_pattern(o.pattern, spec.label("pattern")) if o.pattern is not None else None
    label_from_name = rx is not None and "label" in rx.groupindex
    group_from = o.group_from
    if group_from == "auto":
        group_from = "pattern" if rx is not None and "group" in rx.groupindex else "none"
    if group_from == "pattern" and (rx is None or "group" not in rx.groupindex):
        raise ConfigError(f"{spec.label('group_from')}: 'pattern' needs a pattern with {{group}}, got {o.pattern!r}")
    suffixes = _suffixes(spec)
    items, unmatched, skipped = [], [], Counter()
    class_dirs, used = [], set()
    for split, d in _parts(spec):
        if not label_from_name:
            class_dirs += _subdirs(d)
        for f in _walk(d):
            s = f.suffix.lower()
            if s not in suffixes:
                skipped[s or "(no suffix)"] += 1
                continue
            rel = f.relative_to(d).parts
            m = None
            if rx is not None:
                m = rx.fullmatch(f.name)
                if m is None:
                    unmatched.append(f)
                    continue
            if label_from_name:
                label = m.group("label")
            elif len(rel) < 2:
                raise DataError(f"{f}: not in a class folder (layout {d}/<class>/<file>; or give a pattern "
                                f"with {{label}}, {spec.label('pattern')})")
            else:
                label = rel[0]
                used.add(d / label)
            group = None
            if group_from == "pattern":
                group = m.group("group")
            elif group_from == "parent":
                if len(rel) < (2 if label_from_name else 3):
                    want = f"{d}/<group>/<file>" if label_from_name else f"{d}/<class>/<group>/<file>"
                    raise DataError(f"{f}: no group folder ({spec.label('group_from')} is 'parent': {want})")
                group = rel[-2]
            items.append(Item(path=f, rel=f.relative_to(root).as_posix(), label=label, group=group, split=split))
    if unmatched and o.unmatched == "error":
        names = ", ".join(str(p) for p in unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        raise DataError(f"{len(unmatched)} file(s) do not match {spec.label('pattern')} {o.pattern!r} "
                        f"(as the regex {rx.pattern!r}): {names}; rename them, fix the pattern, or set "
                        f"{spec.label('unmatched')} to skip")
    if not items:
        other = f"; skipped files: {dict(sorted(skipped.items()))}" if skipped else ""
        raise DataError(f"{spec.text}: no files found under {root} (reading {', '.join(sorted(suffixes))}"
                        f"{other}{'; ' + str(len(unmatched)) + ' not matching the pattern' if unmatched else ''})")
    for c in class_dirs:
        if c not in used:
            raise DataError(f"{c}: empty class folder (no {', '.join(sorted(suffixes))} files)")
    kinds = {}
    for it in items:
        kinds.setdefault(suffixes[it.path.suffix.lower()], it.path)
    if len(kinds) > 1:
        ex = " and ".join(f"{k} files (e.g. {p})" for k, p in kinds.items())
        raise DataError(f"{root} mixes {ex}; choose one kind with {spec.label('extensions')}")
    found = sorted({it.label for it in items})
    if o.classes is None:
        classes = found
    else:
        classes = [str(c) for c in o.classes]
        dup = sorted(c for c, n in Counter(classes).items() if n > 1)
        if dup:
            raise ConfigError(f"{spec.label('classes')}: duplicate class names {dup}")
        for it in items:
            if it.label not in classes:
                raise DataError(f"{it.path}: class {it.label!r} is not in {spec.label('classes')} {classes}")
        empty = [c for c in classes if c not in found]
        if empty:
            raise DataError(f"{spec.text}: the classes {empty} of {spec.label('classes')} have no files under {root}")
    return Listing(items=sorted(items, key=lambda it: it.rel), classes=classes, reader=next(iter(kinds)),
                   skipped=dict(skipped))


# --------------------------------------------------------------------------- decoding and the cache
def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex, 32 digits); DataError naming an unreadable file."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()[:32]
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def decode(plan: Plan, paths: list) -> np.ndarray:
    """One block of files -> float32 [n, *plan.shape] (the one place files are decoded)."""
    x = np.asarray(plan.decode(paths), dtype=np.float32)
    if x.shape != (len(paths), *plan.shape):
        raise DataError(f"{paths[0]}: decoded to {list(x.shape)}, expected {[len(paths), *plan.shape]}")
    return x


def cache_key(listing: Listing, spec: FolderSpec) -> dict:
    """What the decoded items depend on: every file's relative path and content, the reader,
    its version and its options."""
    reader = READERS.get(listing.reader)
    o = asdict(spec.options)
    return {"v": FOLDER_VERSION, "reader": listing.reader, "reader_v": reader.version,
            "options": {k: list(o[k]) if isinstance(o[k], tuple) else o[k] for k in reader.options},
            "files": [[it.rel, file_digest(it.path)] for it in listing.items]}


def decoded(listing: Listing, spec: FolderSpec, cfg: DataConfig) -> tuple[np.ndarray, dict]:
    """The decoded items [N, *shape] (a memory map of the cache entry; decoded and written block
    by block if the entry is absent) and the cache key."""
    key = cache_key(listing, spec)
    e = entry(cache_dir(cfg), "folders", spec.path.resolve().name or "folder", key)
    path = e.with_name(e.name + ".npz")
    paths = [it.path for it in listing.items]

    def write(tmp: Path) -> None:
        plan = READERS.get(listing.reader).plan(paths, spec)
        shape = (len(paths), *plan.shape)
        step = chunk_rows(shape)
        write_npz_rows(tmp, "x", shape, np.float32, (decode(plan, paths[a:a + step]) for a in range(0, len(paths), step)))

    x = get_or_write(path, write, lambda p: _mapped(p, "x"), "decoded folder cache")
    if len(x) != len(paths) or x.ndim not in KIND_BY_NDIM:
        raise DataError(f"{path}: holds {list(x.shape)}, expected {len(paths)} items; delete it to rebuild")
    return x, key


@register_scheme("folder")
def load_folder_spec(path: str, cfg: DataConfig) -> RawModality:
    """``folder:PATH[?key=value&...]``; its options (``data.folder`` and the spec's own) reach
    run keys through the fingerprint (``DataConfig.FINGERPRINT_FIELDS``), so it declares no
    section read."""
    return load_folder(f"folder:{path}", cfg)


def load_folder(spec_text: str, cfg: DataConfig) -> RawModality:
    """``folder:PATH?key=value&...`` -> :class:`RawModality` (x [N, ...] float32, memory-mapped
    from the cache; classes; split from split folders; groups from the layout)."""
    spec = parse_spec(spec_text, cfg.folder)
    listing = list_files(spec)
    x, key = decoded(listing, spec, cfg)
    items = listing.items
    index = {c: i for i, c in enumerate(listing.classes)}
    y = np.array([index[it.label] for it in items], dtype=np.int64)
    split = np.array([it.split for it in items]) if items[0].split is not None else None
    groups = np.array([it.group for it in items]) if items[0].group is not None else None
    o = asdict(spec.options)
    fingerprint = {"folder": {"version": FOLDER_VERSION, "reader": listing.reader,
                              "options": {k: list(v) if isinstance(v, tuple) else v for k, v in o.items()},
                              "files": content_key(key["files"], n=16)}}
    return RawModality(x=x, y=y, classes=listing.classes, kind=KIND_BY_NDIM[x.ndim], source=str(spec.path),
                       split=split, groups=groups, fingerprint=fingerprint,
                       augment=READERS.get(listing.reader).augment)
