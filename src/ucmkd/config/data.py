"""``data``: which datasets, their splits, standardisation and reading, and the options of the
built-in dataset families (a section each; a user family's typed options in ``data.options``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from .fields import ranged


@dataclass(frozen=True)
class SyntheticConfig:
    """Two views of one latent class structure (see :mod:`ucmkd.data.synthetic`)."""

    n_items: int = ranged(3000, 2)          # items per view (item i of view A and of view B share a latent)
    num_classes: int = ranged(10, 2)
    latent_dim: int = ranged(8, 1)
    class_sep: float = ranged(2.0, 0.0)       # distance scale between class means in latent space
    dim_a: int = ranged(16, 1)              # view A: near-linear map of the latent
    dim_b: int = ranged(32, 1)              # view B: nonlinear map + distractors
    noise: float = ranged(0.5, 0.0)           # view-B observation noise (std, in units of the latent scale)
    nonlinearity: float = ranged(1.0, 0.0)    # 0 = linear view B, larger = more tanh/sin warping
    distractors: int = ranged(16, 0)        # pure-noise dimensions appended to view B
    noise_a: float = ranged(0.1, 0.0)         # view-A observation noise
    seed: int = 0                # generation seed (fixed data, independent of run seeds)

@dataclass(frozen=True)
class TabularConfig:
    """Two tabular views of one latent class structure (see :mod:`ucmkd.data.tabular`)."""

    n_items: int = ranged(4000, 2)          # items per view (item i of both views share a latent)
    num_classes: int = ranged(6, 2)
    latent_dim: int = ranged(8, 2)          # informative latent dimensions
    clusters_per_class: int = ranged(2, 1)  # Gaussian clusters per class in the latent space
    class_sep: float = ranged(1.5, 0.0)     # make_classification's hypercube side / 2
    flip_y: float = ranged(0.01, 0.0, 1.0)  # fraction of labels re-drawn at random
    features_a: int = ranged(24, 4)         # view A (teacher-like): linear mixtures, redundant, ordinal, noise
    features_b: int = ranged(40, 4)         # view B (student-like): nonlinear, binary indicators, noise
    noise: float = ranged(0.5, 0.0)         # observation noise of view B (latent units)
    unscaled: bool = False                  # every column rescaled by 10^U(-3, 3) and shifted (raw units)
    seed: int = 0

@dataclass(frozen=True)
class SpokenDigitsConfig:
    """Recipe of the offline spoken-digits set (eSpeak NG synthesis, see ucmkd.data.spoken)."""

    voices: tuple = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
    variants: tuple = ("m1", "m3", "f1", "f3", "klatt")
    rates: tuple = (130, 160, 190)          # words per minute
    pitches: tuple = (35, 50, 65)           # eSpeak pitch, 0..99
    snr_db: Optional[float] = 20.0          # background noise SNR (dB); null = clean
    sample_rate: int = 22050                # Hz
    duration: float = 0.8                   # seconds per clip (padded / trimmed)
    n_mels: int = 32
    hop_length: int = 441                   # 20 ms at 22,050 Hz
    n_fft: int = 1024
    seed: int = 0

@dataclass(frozen=True)
class AVConfig:
    """Options of the audio-visual dataset adapters (RAVDESS, CREMA-D, AVE, VGGSound)."""

    image_size: int = ranged(64, 1)          # face/scene frames are resized to image_size x image_size
    frames: int = ranged(1, 1)               # frames per clip (evenly spaced), stacked as channels
    grayscale: bool = False
    audio_length: int = ranged(0, 0)         # time steps of audio features (crop/pad); 0 = the dataset's own
    audio_size: int = ranged(0, 0)           # >0: resize audio features to audio_size x audio_size (bilinear, e.g. 224 for a ViT)

@dataclass(frozen=True)
class FolderConfig:
    """Options of ``folder:PATH`` datasets: a folder of sound files, images or ``.npy`` arrays
    (:mod:`ucmkd.data.folder`, docs/data.md "Folder datasets"). One dataset overrides them in
    its name: ``folder:PATH?key=value&key=value``."""

    # layout: PATH/<class>/<file> (class subfolders, at any depth below), or a file-name pattern;
    # optional PATH/train, PATH/val, PATH/test folders hold the dataset's own split
    pattern: Optional[str] = None       # file names, e.g. "{label}_{group}_{*}.wav": {label} the class, {group} the speaker/subject/session, {*} anything; None: the class is the subfolder
    group_from: str = "auto"            # auto: the pattern's {group} if it has one, else none | pattern | parent: the folder holding each file (PATH/<class>/<group>/<file>) | none
    split_folders: Optional[bool] = None   # top folders train/val/test are the dataset's split; null: when the top folders are train and test (and val)
    classes: Optional[tuple] = None     # class names in label order (each must have files); null: the names found, sorted
    extensions: Optional[tuple] = None  # file suffixes read (case-insensitive); null: every suffix a reader knows; other files are skipped
    unmatched: str = "error"            # error | skip: a file name the pattern does not match
    # sound files (.wav .flac .ogg .mp3 .aiff): log-mel x [N, C, n_mels, T], kind image, augmented as spectrogram
    sample_rate: Optional[int] = ranged(None, 1)   # Hz of the clips; null: the files' own (all must have one rate)
    resample: bool = True               # resample files of another rate (scipy resample_poly); false: such a file is an error
    mono: bool = True                   # mix the channels down to one (their mean); false: keep C channels (all files must have C)
    trim_db: Optional[float] = ranged(None, 0.0, lo_open=True)   # cut leading/trailing 5 ms frames more than trim_db below the loudest; null: keep
    duration: Optional[float] = ranged(None, 0.0, lo_open=True)  # seconds per clip (cut / zero-padded); null: the longest file
    crop: str = "centre"                # centre: keep a longer clip's middle, pad a shorter one on both sides | start: keep the beginning, pad at the end
    peak_normalize: bool = True         # scale each clip to peak 1 (after the crop)
    n_mels: int = ranged(32, 1)
    hop_length: Optional[int] = ranged(None, 1)   # samples; null: 20 ms (441 at 22,050 Hz)
    n_fft: Optional[int] = ranged(None, 1)        # samples; null: the smallest power of two >= 2 hop_length (1024 at 22,050 Hz)
    # images (.png .jpg .jpeg .bmp .gif .tif .tiff .webp): x [N, C, H, W] in [0, 1]
    image_mode: str = "auto"            # L (C=1) | RGB (C=3) | auto: L when every image is grayscale, else RGB
    image_size: Optional[int] = ranged(None, 1)   # resize to image_size x image_size; null: keep (all images must have one size)
    image_resample: str = "bilinear"    # Pillow's resampling filter: nearest | bilinear | bicubic | lanczos
    # .npy files: one item each, [D] vector, [C, L] signal or [C, H, W] image (all of one shape)

    CHOICES: ClassVar[dict] = {"group_from": ("auto", "pattern", "parent", "none"), "unmatched": ("error", "skip"),
                               "crop": ("centre", "start"), "image_mode": ("auto", "L", "RGB"),
                               "image_resample": ("nearest", "bilinear", "bicubic", "lanczos")}

@dataclass
class DataConfig:
    teacher: str = "digits/image"     # modality dataset name (registry ``ucmkd.data.DATASETS``)
    student: str = "digits/signal"
    split_seed: int = 0               # fixed splits: the same for every run seed
    test_frac: float = ranged(0.25, 0.0, 1.0, lo_open=True, hi_open=True)
    val_frac: float = ranged(0.2, 0.0, 1.0, lo_open=True, hi_open=True)             # carved from the training part
    val_by: str = "auto"              # validation of datasets with groups (speakers...): groups (whole ones held out) | items | auto: groups when there are enough (docs/data.md)
    cache_dir: Optional[str] = None   # default: $UCMKD_CACHE or ~/.cache/ucmkd
    mnist1d_samples: int = ranged(4000, 10)       # size of the generated digits/signal set
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    tabular: TabularConfig = field(default_factory=TabularConfig)
    spoken: SpokenDigitsConfig = field(default_factory=SpokenDigitsConfig)
    roots: dict = field(default_factory=dict)   # dataset family -> directory, e.g. {ravdess: /data/ravdess}
    options: dict = field(default_factory=dict)  # dataset family -> its typed options (a user dataset's ``register_dataset(options=...)``)
    av: AVConfig = field(default_factory=AVConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)   # folder:PATH datasets (docs/data.md)
    standardize: str = "auto"         # auto (per_feature for vectors, global otherwise) | per_feature | global | none (docs/data.md)
    storage: str = "auto"             # memory | mmap (read lazily from a memory-mapped file) | auto: mmap for files above mmap_above_mb
    mmap_above_mb: float = ranged(2048.0, 0.0)   # storage=auto: a file-backed modality larger than this (MiB of float32) is read lazily
    workers: int = ranged(0, 0)       # DataLoader processes reading the batches of lazy modalities (0: the training process reads them)
    prefetch: int = ranged(2, 1)      # batches each worker reads ahead

    CHOICES: ClassVar[dict] = {"standardize": ("auto", "per_feature", "global", "none"),
                               "storage": ("auto", "memory", "mmap"), "val_by": ("auto", "items", "groups")}
    #: fields that change how the inputs are read, never their values (left out of run keys: the
    #: data's content fingerprint is in the key)
    IO_FIELDS: ClassVar[tuple] = ("storage", "mmap_above_mb", "workers", "prefetch")
    #: where files are, never what they hold (left out of run keys: the content fingerprints are in)
    PATH_FIELDS: ClassVar[tuple] = ("cache_dir", "roots")
    #: the sections one dataset family reads (``register_dataset(reads=...)``): a run's key holds
    #: those of its two datasets only (the others at their defaults)
    SECTIONS: ClassVar[tuple] = ("mnist1d_samples", "synthetic", "tabular", "spoken", "av")
    #: sections whose effect reaches run keys only through the data's fingerprint (they are part
    #: of a folder dataset's fingerprint; left out of run keys, so they key only runs that use one)
    FINGERPRINT_FIELDS: ClassVar[tuple] = ("folder",)
