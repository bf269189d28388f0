"""Augmentation policies (ucmkd.augment): shapes and kinds, determinism under a seed, the
registry, and the spoken-digit spectrograms' declared kind."""
import pytest
import torch

from ucmkd.augment import AUGMENTATIONS, Policy, batch_generator, get_policy, register_augmentation, resolve_policy
from ucmkd.data import RawModality
from ucmkd.data.base import finalize
from ucmkd.config import DataConfig
from ucmkd.errors import ConfigError, DataError

SHAPES = {"image": (16, 1, 8, 8), "signal": (16, 2, 40), "spectrogram": (16, 1, 32, 40), "vector": (16, 12)}


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize("level", ["weak", "strong"])
def test_policies_keep_shape_and_dtype_and_repeat_under_a_seed(kind, level):
    x = torch.randn(SHAPES[kind], generator=torch.Generator().manual_seed(0))
    before = x.clone()
    p = get_policy(kind)
    a = p.apply(level, x, batch_generator(5, 1, "cpu"))
    b = p.apply(level, x, batch_generator(5, 1, "cpu"))
    c = p.apply(level, x, batch_generator(6, 1, "cpu"))
    d = p.apply(level, x, batch_generator(5, 2, "cpu"))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
    assert torch.equal(a, b)                       # same seed and stream: bit-identical
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert not torch.equal(a, x)                   # it does something
    assert torch.equal(x, before)                  # the input is never edited in place
    assert torch.equal(p.apply("none", x, batch_generator(5, 1, "cpu")), x)


def test_strong_departs_further_than_weak():
    for kind, shape in SHAPES.items():
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        p = get_policy(kind)
        weak = (p.apply("weak", x, batch_generator(0, 0, "cpu")) - x).abs().mean()
        strong = (p.apply("strong", x, batch_generator(0, 0, "cpu")) - x).abs().mean()
        assert strong >= 0.5 * weak, kind   # loosely: strong views are not milder


def test_image_weak_is_a_small_translation():
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    out = get_policy("image").apply("weak", x, batch_generator(0, 0, "cpu"))
    # each item equals its input shifted by at most 1 px (interior rows/cols agree with a shift)
    for i in range(len(x)):
        ok = any(torch.equal(out[i, :, 1:-1, 1:-1], x[i, :, 1 - dy:7 - dy, 1 - dx:7 - dx])
                 for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        assert ok, i


def test_spectrogram_strong_masks_whole_bands():
    x = torch.randn(32, 1, 32, 40, generator=torch.Generator().manual_seed(3)) + 10.0   # no natural zeros
    out = get_policy("spectrogram").apply("strong", x, batch_generator(0, 0, "cpu"))
    assert out.shape == x.shape
    # noise is added after masking: masked cells sit near 0, the rest near 10
    masked = out.abs() < 2.0
    assert masked.any() and not masked.all()


def test_unknown_policy_and_wrong_rank_are_named():
    with pytest.raises(ConfigError, match="'no-such-kind'"):
        resolve_policy("no-such-kind")
    with pytest.raises(ConfigError, match="augment.policy.*'nope'"):
        resolve_policy("image", "nope")
    with pytest.raises(DataError, match="'image' expects inputs of rank 4"):
        get_policy("image").apply("weak", torch.zeros(4, 10), batch_generator(0, 0, "cpu"))
    with pytest.raises(ConfigError, match="'medium'"):
        get_policy("vector").apply("medium", torch.zeros(4, 10), batch_generator(0, 0, "cpu"))


def test_a_plugin_registers_its_own_policy():
    name = "test-flip-sign"
    if name not in AUGMENTATIONS:
        @register_augmentation(name, ndim=2)
        def _make():
            return (lambda x, g: -x), (lambda x, g: -2 * x)
    p = resolve_policy("vector", name)
    assert isinstance(p, Policy) and torch.equal(p.apply("strong", torch.ones(2, 3), None), -2 * torch.ones(2, 3))
    with pytest.raises(ConfigError, match="registered twice"):
        register_augmentation(name, ndim=2)(lambda: (None, None))


def test_a_dataset_declares_its_augmentation_kind_outside_the_fingerprint():
    y = torch.arange(40).numpy() % 2
    x = torch.randn(40, 1, 6, 5, generator=torch.Generator().manual_seed(0)).numpy()
    plain = finalize(RawModality(x=x, y=y, classes=["a", "b"], kind="image"), "t/plain", DataConfig())
    spec = finalize(RawModality(x=x, y=y, classes=["a", "b"], kind="image", augment="spectrogram"), "t/plain",
                    DataConfig())
    assert plain.augment_kind == "image" and spec.augment_kind == "spectrogram"
    assert plain.fingerprint == spec.fingerprint      # the items are the same: cached teachers stay valid
    with pytest.raises(DataError, match="augment"):
        finalize(RawModality(x=x, y=y, classes=["a", "b"], kind="image", augment=3), "t/bad", DataConfig())


def test_spoken_digits_declare_spectrogram():
    import inspect

    from ucmkd.data import spoken

    assert 'augment="spectrogram"' in inspect.getsource(spoken.spoken_digits_audio)


def test_an_npz_file_declares_its_augmentation_kind(tmp_path):
    import numpy as np

    from ucmkd.data import load_modality

    f = tmp_path / "spec.npz"
    rng = np.random.default_rng(0)
    np.savez(f, x=rng.random((60, 1, 6, 5)).astype(np.float32), y=np.arange(60) % 3, augment="spectrogram")
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    assert load_modality(f"npz:{f}", cfg).augment_kind == "spectrogram"
    np.savez(f, x=rng.random((60, 1, 6, 5)).astype(np.float32), y=np.arange(60) % 3)
    assert load_modality(f"npz:{f}", cfg).augment_kind == "image"
