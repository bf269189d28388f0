"""Audio-visual datasets of the paper, read from the on-disk layouts of its preprocessing.

Four families, two modalities each (``<family>/audio`` and ``<family>/visual``):

- ``ravdess``: ``data_file/spa_{dl,val,test}.csv`` rows ``audio_name,image_name,label``;
  audio ``aud_features/<audio_name>`` (.npy log-mel); visual ``vid_features/<image_name>``
  (one face image, or a folder of frames);
- ``cremad``: ``train.csv``/``test.csv`` rows ``id,class`` (``stat.csv``: the class list);
  audio ``Audio-1004/<id>.pkl`` (pickled filterbank); visual ``Image-01-FPS/<id>/`` frames;
- ``ave`` and ``vggsound``: ``trainSet.txt``/``valSet.txt``/``testSet.txt`` lines
  ``class&id&...``; audio ``Audio-1004-SE/<id>.pkl``; visual ``Image-01-FPS-SE/<id>/`` frames.

The families differ only in a :class:`Layout` (how the clip index is found and how one
audio file is read); everything else is one shared core: the index is checked (unknown
classes, malformed rows, missing files and empty frame folders are :class:`DataError` s
naming the file and line), audio becomes ``image`` inputs ``[N, C, F, T]`` (``C`` = 1 for
2-D features) with the time axis cropped/padded to one length (optionally resized to a
square, ``data.av.audio_size``), visual becomes ``image``
inputs ``[N, C * frames, S, S]`` (Pillow; no torchvision), and the decoded tensors are
cached as uncompressed ``.npz`` under ``cache_dir(cfg)/av/``, written one clip at a time and
memory-mapped when read, so a dataset larger than memory (VGGSound) is decoded and read
lazily (``data.storage``, docs/data.md). Both modalities of a family share
``pair_id`` (the clip index), the family's own split and its class list, so paired mode and
every unpaired preset work on them. See ``docs/datasets.md`` for the layouts in full.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..cache import get_or_write, open_npz_member, write_npz_rows
from ..config import DataConfig, check_ranges
from ..errors import ConfigError, DataError
from .base import RawModality, cache_dir, register_dataset

MODALITIES = ("audio", "visual")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_CACHE_VERSION = 1
_HEADER_LABELS = ("label", "class")


# --------------------------------------------------------------------------- the clip index
@dataclass(frozen=True)
class Clip:
    """One audio-visual clip: its split, class name, feature file, frame file/folder, and
    the index entry it came from (``file:line``, for error messages)."""

    split: str
    label: str
    audio: Path
    visual: Path
    where: str


@dataclass
class Index:
    """What a layout's ``find`` returns: the clips (file order) and the class list.

    ``classes`` is ``None`` to mean "the sorted labels of the ``train`` clips" (numerically
    sorted when all labels are integers); ``class_source`` names where the list came from.
    """

    clips: list
    classes: Optional[list]
    class_source: str


@dataclass(frozen=True)
class Layout:
    """One on-disk layout: ``find(root) -> Index`` and ``read_audio(path) -> array``."""

    name: str
    title: str
    find: Callable[[Path], Index]
    read_audio: Callable[[Path], np.ndarray]


def _rows(path: Path, sep: str, n_fields: int, what: str):
    """Yield ``(line_number, fields)`` of a delimited list file, blank lines skipped.

    ``sep`` ``","`` uses the csv module (quoted fields allowed); other separators split the
    line. A row with fewer than ``n_fields`` non-empty leading fields is a DataError naming
    the file and line; a first row whose label field reads ``label``/``class`` is a header.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the {what}: {getattr(e, 'strerror', None) or e}") from None
    if sep == ",":
        parsed = csv.reader(lines)
    else:
        parsed = (line.split(sep) for line in lines)
    first = True
    for lineno, fields in enumerate(parsed, start=1):
        fields = [s.strip() for s in fields]
        if not any(fields):
            continue
        if len(fields) < n_fields or not all(fields[:n_fields]):
            raise DataError(f"{path}:{lineno}: malformed row {sep.join(fields)!r}: expected "
                            f"{n_fields} {sep!r}-separated fields ({what})")
        if first and fields[n_fields - 1].lower() in _HEADER_LABELS:
            first = False
            continue
        first = False
        yield lineno, fields


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def _ravdess_find(root: Path) -> Index:
    """The authors' RAVDESS loader: ``data_file/spa_dl.csv`` (train), ``spa_val.csv`` (val,
    optional here), ``spa_test.csv`` (test); rows ``audio_name,image_name,label`` without a
    header; classes = sorted labels."""
    lists = root / "data_file"
    clips = []
    for split, fname in (("train", "spa_dl.csv"), ("val", "spa_val.csv"), ("test", "spa_test.csv")):
        path = lists / fname
        if split == "val" and not path.exists():
            continue
        _require(path, f"RAVDESS {split} list")
        for lineno, (audio, image, label, *_) in _rows(path, ",", 3, "audio_name,image_name,label"):
            clips.append(Clip(split, label, root / "aud_features" / audio, root / "vid_features" / image,
                              f"{path}:{lineno}"))
    return Index(clips, None, str(lists / "spa_dl.csv"))


def _cremad_find(root: Path) -> Index:
    """The authors' CREMA-D loader: ``train.csv``/``test.csv`` rows ``id,class``;
    ``stat.csv`` (first column) lists the classes, used sorted; ``Audio-1004/<id>.pkl`` and
    ``Image-01-FPS/<id>/``. Without ``stat.csv`` the classes are the sorted train labels."""
    classes, source = None, str(root / "train.csv")
    stat = root / "stat.csv"
    if stat.exists():
        classes = sorted({fields[0] for _, fields in _rows(stat, ",", 1, "class list")})
        source = str(stat)
    clips = []
    for split in ("train", "test"):
        path = _require(root / f"{split}.csv", f"CREMA-D {split} list")
        for lineno, (cid, label, *_) in _rows(path, ",", 2, "id,class"):
            clips.append(Clip(split, label, root / "Audio-1004" / f"{cid}.pkl", root / "Image-01-FPS" / cid,
                              f"{path}:{lineno}"))
    return Index(clips, classes, source)


def _set_lists_find(root: Path) -> Index:
    """The authors' AVE / VGGSound loaders: ``trainSet.txt``, ``valSet.txt`` (optional here),
    ``testSet.txt`` with lines ``class&id&...``; ``Audio-1004-SE/<id>.pkl`` and
    ``Image-01-FPS-SE/<id>/``; classes in order of first appearance in ``testSet.txt``."""
    clips = []
    for split in ("train", "val", "test"):
        path = root / f"{split}Set.txt"
        if split == "val" and not path.exists():
            continue
        _require(path, f"{split} list")
        for lineno, (label, cid, *_) in _rows(path, "&", 2, "class&id&..."):
            clips.append(Clip(split, label, root / "Audio-1004-SE" / f"{cid}.pkl",
                              root / "Image-01-FPS-SE" / cid, f"{path}:{lineno}"))
    classes = list(dict.fromkeys(c.label for c in clips if c.split == "test"))
    return Index(clips, classes, str(root / "testSet.txt"))


def _read_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ValueError("not a .npy file (numpy.save format)")
    return np.load(path, allow_pickle=False)


def _read_pickle(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        return np.asarray(pickle.load(f), dtype=np.float32)


LAYOUTS: dict = {
    "ravdess": Layout("ravdess", "RAVDESS", _ravdess_find, _read_npy),
    "cremad": Layout("cremad", "CREMA-D", _cremad_find, _read_pickle),
    "ave": Layout("ave", "AVE", _set_lists_find, _read_pickle),
    "vggsound": Layout("vggsound", "VGGSound", _set_lists_find, _read_pickle),
}


def _sort_labels(labels) -> list:
    labels = sorted(set(labels))
    if all(re.fullmatch(r"[+-]?\d+", s) for s in labels):
        labels.sort(key=int)
    return labels


def dataset_root(layout: Layout, cfg: DataConfig) -> Path:
    roots = cfg.roots or {}
    if not roots.get(layout.name):
        raise ConfigError(f"dataset {layout.title} needs its directory: set data.roots.{layout.name}=/path "
                          f"(a key of data.roots in the config)")
    root = Path(str(roots[layout.name])).expanduser()
    if not root.is_dir():
        raise DataError(f"{layout.title} root directory not found: {root} (data.roots.{layout.name})")
    return root.resolve()


def build_index(layout: Layout, root: Path) -> tuple[list, list]:
    """(clips, classes): the layout's index, checked. Duplicate clips within one split are
    kept once (as the authors' loaders do); a clip listed in two splits is an error."""
    idx = layout.find(root)
    classes = idx.classes if idx.classes is not None else _sort_labels(c.label for c in idx.clips
                                                                      if c.split == "train")
    if len(classes) < 2:
        raise DataError(f"{idx.class_source}: {layout.title} needs at least 2 classes, found {classes}")
    known = set(classes)
    seen: dict = {}
    clips = []
    for c in idx.clips:
        if c.label not in known:
            raise DataError(f"{c.where}: unknown class {c.label!r}; the classes (from {idx.class_source}) are "
                            f"{', '.join(map(repr, classes))}")
        key = (c.audio, c.visual)
        if key in seen:
            if seen[key].split != c.split:
                raise DataError(f"{c.where}: clip {c.audio.stem!r} is also listed at {seen[key].where} "
                                f"({seen[key].split} split): splits must be disjoint")
            continue
        seen[key] = c
        clips.append(c)
    if not any(c.split == "train" for c in clips) or not any(c.split == "test" for c in clips):
        raise DataError(f"{root}: the {layout.title} lists give no training or no test clip")
    return clips, classes


# --------------------------------------------------------------------------- decoding
def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def frame_files(path: Path) -> list:
    """An image file is a one-frame clip; a folder holds the frames (natural name order)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"visual frames not found: {path}")
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                   key=lambda p: _natural_key(p.name))
    if not files:
        raise DataError(f"clip folder has no frames ({'/'.join(IMAGE_EXTENSIONS)} files): {path}")
    return files


def pick_frames(n: int, k: int) -> list:
    """Indices of ``k`` evenly spaced frames out of ``n``: the centres of ``k`` equal segments
    (the middle frame for k = 1; frames repeat when n < k)."""
    return [((2 * i + 1) * n) // (2 * k) for i in range(k)]


def read_frame(path: Path, size: int, grayscale: bool) -> np.ndarray:
    """One frame as float32 [C, size, size] in [0, 1] (C = 1 grey or 3 RGB), bilinear resize."""
    from PIL import Image

    mode = "L" if grayscale else "RGB"
    try:
        with Image.open(path) as im:
            im.draft(mode, (size, size))   # JPEG: decode at a reduced scale when possible
            im = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image: {e}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_visual(path: Path, frames: int, size: int, grayscale: bool) -> np.ndarray:
    files = frame_files(path)
    return np.concatenate([read_frame(files[i], size, grayscale) for i in pick_frames(len(files), frames)])


def read_audio(layout: Layout, path: Path) -> np.ndarray:
    """One clip's features as float32 [C, F, T]: a 2-D [F, T] array gets C = 1; a 3-D array is
    channel-first [C, F, T] when its first axis is 1, else channel-last [F, T, 3] (an image
    written by OpenCV, BGR: flipped to RGB as in the authors' RAVDESS loader) or [F, T, 1]."""
    if not path.is_file():
        raise DataError(f"audio feature file not found: {path}")
    try:
        a = np.asarray(layout.read_audio(path), dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - numpy/pickle raise many kinds
        raise DataError(f"{path}: cannot read audio features: {e}") from None
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[0] == 1:
        pass
    elif a.ndim == 3 and a.shape[2] in (1, 3):
        a = a[:, :, ::-1].transpose(2, 0, 1)
    else:
        raise DataError(f"{path}: audio features must be [F, T], [1, F, T] or [F, T, 3], got {list(a.shape)}")
    if a.shape[1] == 0 or a.shape[2] == 0:
        raise DataError(f"{path}: empty audio features {list(a.shape)}")
    if not np.isfinite(a).all():
        raise DataError(f"{path}: audio features contain NaN or inf")
    return np.ascontiguousarray(a)


def fit_length(a: np.ndarray, length: int) -> np.ndarray:
    """Crop ([..., :length], the start is kept) or pad the last (time) axis to ``length``;
    padding repeats the clip from its start (wrap), so no artificial constant is introduced."""
    t = a.shape[-1]
    if t >= length:
        return a[..., :length]
    return np.take(a, np.arange(length) % t, axis=-1)


def resize_audio(a: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [C, F, T] features to [C, size, size] (as the authors feed a ViT)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(a))[None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0].numpy()


def audio_layout(layout: Layout, clips: list, audio_length: int) -> tuple[tuple, int]:
    """([C, F] of the clips' features, time length L): L = ``audio_length`` if > 0 (only the
    first clip is read), else the longest clip's T (every clip is read once, one at a time;
    clips with other [C, F] are an error here already)."""
    first = read_audio(layout, clips[0].audio)
    if audio_length > 0:
        return first.shape[:2], audio_length
    shapes = [first.shape] + [read_audio(layout, c.audio).shape for c in clips[1:]]   # every file readable first
    for c, shape in zip(clips, shapes):
        _same_bins(c, shape, clips[0], first.shape[:2])
    return first.shape[:2], max(shape[-1] for shape in shapes)


def _same_bins(clip: Clip, shape: tuple, first: Clip, ref: tuple) -> None:
    if shape[:2] != ref:
        raise DataError(f"{clip.audio}: audio features have [C, F] = {list(shape[:2])}, but "
                        f"{first.audio} has {list(ref)}: every clip needs the same channels and bins")



def audio_rows(layout: Layout, clips: list, ref: tuple, length: int, audio_size: int = 0):
    """Yield each clip's features as a [1, C, F, L] block (L = ``length``, fitted by
    :func:`fit_length`), or [1, C, audio_size, audio_size] when ``audio_size`` > 0: one clip in
    memory at a time."""
    for c in clips:
        a = read_audio(layout, c.audio)
        _same_bins(c, a.shape, clips[0], ref)
        a = fit_length(a, length)
        yield (resize_audio(a, audio_size) if audio_size > 0 else a)[None]


def visual_rows(clips: list, frames: int, size: int, grayscale: bool):
    """Yield each clip's frames as a [1, C * frames, size, size] block."""
    for clip in clips:
        yield read_visual(clip.visual, frames, size, grayscale)[None]


# --------------------------------------------------------------------------- cache + builder
def _stat(path: Path, what: str, where: str = "") -> list:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}" + (f" (listed at {where})" if where else "")) from None
    return [st.st_size if path.is_file() else 0, st.st_mtime_ns]


def cache_path(layout: Layout, modality: str, cfg: DataConfig, root: Path, clips: list, classes: list) -> Path:
    """``cache_dir/av/<family>-<modality>-<hash>``: the hash covers the root, the clip index,
    the list files' and this modality's feature files' size/mtime, and the options."""
    av = cfg.av
    opts = ({"audio_length": av.audio_length, "audio_size": av.audio_size} if modality == "audio" else
            {"image_size": av.image_size, "frames": av.frames, "grayscale": av.grayscale})
    list_files = sorted({c.where.rsplit(":", 1)[0] for c in clips})
    h = hashlib.sha256()
    h.update(json.dumps({"v": _CACHE_VERSION, "layout": layout.name, "modality": modality, "root": str(root),
                         "classes": classes, "opts": opts,
                         "lists": {f: _stat(Path(f), "list file") for f in list_files}}, sort_keys=True).encode())
    for c in clips:
        # every clip must have both files (pairs stay aligned), only this modality's stats are hashed
        a = _stat(c.audio, "audio feature file", c.where)
        v = _stat(c.visual, "visual frames", c.where)
        h.update(json.dumps([c.split, c.label, os.path.relpath(c.audio, root), os.path.relpath(c.visual, root),
                             a if modality == "audio" else v]).encode())
    return cache_dir(cfg) / "av" / f"{layout.name}-{modality}-{h.hexdigest()[:16]}.npz"


def _read_cached(path: Path, n: int) -> np.ndarray:
    """The decoded cache, memory-mapped (nothing read yet: :func:`ucmkd.data.base.finalize`
    reads it whole or lazily, ``data.storage``)."""
    x = open_npz_member(path, "x")
    if x is None:                       # not mappable (a compressed file written by hand): read whole
        with np.load(path, allow_pickle=False) as z:
            x = z["x"]
    if x.shape[0] != n or x.dtype != np.float32:
        raise DataError(f"{path}: the decoded cache holds {list(x.shape)} {x.dtype} for {n} clips; "
                        f"delete it to decode again")
    return x


def load_av(family: str, modality: str, cfg: DataConfig) -> RawModality:
    """Build modality ``modality`` (``audio``/``visual``) of dataset family ``family``."""
    if modality not in MODALITIES:
        raise ConfigError(f"unknown audio-visual modality {modality!r}; expected audio or visual")
    layout = LAYOUTS[family]
    av = cfg.av
    check_ranges(av, "data.av")
    root = dataset_root(layout, cfg)
    clips, classes = build_index(layout, root)
    path = cache_path(layout, modality, cfg, root, clips, classes)

    def decode(tmp: Path) -> None:     # streamed to the file: one clip in memory at a time
        if modality == "audio":
            ref, length = audio_layout(layout, clips, av.audio_length)
            c, f, t = (*ref, length) if av.audio_size == 0 else (ref[0], av.audio_size, av.audio_size)
            write_npz_rows(tmp, "x", (len(clips), c, f, t), np.float32,
                           audio_rows(layout, clips, ref, length, av.audio_size))
        else:
            ch = (1 if av.grayscale else 3) * av.frames
            write_npz_rows(tmp, "x", (len(clips), ch, av.image_size, av.image_size), np.float32,
                           visual_rows(clips, av.frames, av.image_size, av.grayscale))

    x = get_or_write(path, decode, lambda p: _read_cached(p, len(clips)), "audio-visual cache")
    cls_index = {c: i for i, c in enumerate(classes)}
    return RawModality(x=x, y=np.array([cls_index[c.label] for c in clips], dtype=np.int64),
                       classes=list(classes), kind="image", pair_id=np.arange(len(clips), dtype=np.int64),
                       source=f"{layout.title} {modality} ({root})",
                       split=np.array([c.split for c in clips]), fingerprint={"decoded": path.name})


def _register(family: str, modality: str) -> None:
    layout = LAYOUTS[family]

    def builder(cfg: DataConfig) -> RawModality:
        return load_av(family, modality, cfg)

    shape = "[N, C, F, T] audio features" if modality == "audio" else "[N, C*frames, S, S] frames"
    builder.__name__ = f"{family}_{modality}"
    builder.__doc__ = (f"{layout.title} {modality}: {shape} from data.roots.{family} "
                       f"(layout: docs/datasets.md); paired with {family}/"
                       f"{'visual' if modality == 'audio' else 'audio'} by clip.")
    register_dataset(f"{family}/{modality}", reads=("av",))(builder)   # and data.roots (a path: unkeyed)


for _family in LAYOUTS:
    for _modality in MODALITIES:
        _register(_family, _modality)
