"""Data sets: digits, the CIFAR-10 decode cache (ImageFolder and pickle roots), errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from wgates import data
from wgates.errors import WgatesError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
REAL_CIFAR = Path(os.environ.get("WGATES_CIFAR10_ROOT", "~/.cache/cifar10")).expanduser()


def test_digits_shapes_and_determinism():
    train, val = data.digits("train"), data.digits("val")
    assert len(train) + len(val) == 1797
    assert abs(len(val) - 0.2 * 1797) < 1
    x, y = train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(data.digits("train").tensors[0], train.tensors[0])
    assert not torch.equal(data.digits("train", seed=1).tensors[1], train.tensors[1])
    assert abs(train.tensors[0].mean().item()) < 1e-4
    assert data.digits("val", image_size=16)[0][0].shape == (1, 16, 16)


def test_make_loaders_digits_subset():
    train, val, info = data.make_loaders("digits", batch_size=8, subset=20)
    assert (info.num_classes, info.input_shape, info.name) == (10, (1, 32, 32), "digits")
    assert len(train.dataset) == 20 and len(val.dataset) == 20
    x, y = next(iter(train))
    assert x.shape == (8, 1, 32, 32) and y.shape == (8,)


def write_jpeg_tree(root: Path, split: str, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((32, 32, 3), label * 25, dtype=np.uint8)
            pixels[:4] = rng.integers(0, 255, (4, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=95)


@pytest.fixture
def jpeg_root(tmp_path):
    root = tmp_path / "cifar"
    write_jpeg_tree(root, "train")
    write_jpeg_tree(root, "test", per_class=1)
    return root


def test_cifar_folder_cache_created_and_reused(jpeg_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = data.cifar10(jpeg_root, "train", cache_dir=cache, augment=False)
    assert len(ds) == 30 and ds.classes == CLASSES
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    # sorted class folders map to labels 0..9; the flat part of each image encodes its class
    assert ds.targets.tolist() == [i // 3 for i in range(30)]
    assert abs(int(ds.images[4, 0, 20, 20]) - 25) <= 3  # second class, value 25
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.item() == 1

    def fail(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data, "_decode_folder", fail)
    again = data.cifar10(jpeg_root, "train", cache_dir=cache)
    assert torch.equal(again.images, ds.images) and again.classes == CLASSES
    assert again.augment  # train split augments by default


def test_cifar_augment_shapes_and_loaders(jpeg_root, tmp_path):
    train, val, info = data.make_loaders(
        f"cifar10:{jpeg_root}", batch_size=16, cache_dir=tmp_path / "c"
    )
    assert info.num_classes == 10 and info.input_shape == (3, 32, 32)
    assert info.classes == tuple(CLASSES)
    x, y = next(iter(train))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,) and y.dtype == torch.int64
    assert len(val.dataset) == 10 and not val.dataset.augment
    # augmentation changes the images (crop offsets and flips are random)
    torch.manual_seed(0)
    plain = train.dataset.__getitems__(list(range(30)))
    train.dataset.augment = False
    assert not all(
        torch.equal(a[0], b[0])
        for a, b in zip(plain, train.dataset.__getitems__(list(range(30))), strict=True)
    )


def test_cifar_crop_flip_is_a_crop():
    batch = (torch.arange(2 * 3 * 32 * 32) % 251).to(torch.uint8).view(2, 3, 32, 32)
    out = data._random_crop_flip(batch, pad=4)
    padded = torch.nn.functional.pad(batch, (4, 4, 4, 4))
    for i in range(2):
        crops = [padded[i, :, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in crops)


def _arrays(n: int, augment: bool) -> data.CifarArrays:
    rng = np.random.default_rng(1)
    return data.CifarArrays(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                            rng.integers(0, 10, n), CLASSES, augment)


def test_loader_on_a_device_gives_the_loaders_batches_in_its_order():
    arrays = _arrays(40, augment=False)
    loader = DataLoader(data.subset_of(arrays, 30), batch_size=8,
                        sampler=data.EpochShuffle(30, seed=3))
    held = data.loader_on(loader, "cpu")  # the same code path as on a GPU, on the CPU here
    assert isinstance(held, data.DeviceBatches) and len(held) == len(loader) == 4
    for epoch in (0, 1):  # `train` sets the epoch: the order follows it, as the loader's
        held.sampler.set_epoch(epoch)
        pairs = list(zip(loader, held, strict=True))
        for (x, y), (hx, hy) in pairs:
            assert torch.equal(x, hx) and torch.equal(y, hy)
    assert pairs[-1][1][0].shape == (6, 3, 32, 32)  # the last, short batch is kept


def test_loader_on_a_device_augments_there():
    arrays = _arrays(12, augment=True)
    held = data.loader_on(DataLoader(arrays, batch_size=12), "cpu")
    x, y = next(iter(held))
    images = (x * arrays.std + arrays.mean).round().to(torch.uint8)  # undo the normalising
    padded = torch.nn.functional.pad(arrays.images, (4, 4, 4, 4))
    for i in range(12):  # each one a crop (or its mirror) of its own source image
        crops = [padded[i, :, r : r + 32, c : c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(images[i], k) or torch.equal(images[i], k.flip(2)) for k in crops)
    assert not torch.equal(images, arrays.images)


def test_loader_on_leaves_other_data_sets_to_their_loader():
    loader, _, _ = data.make_loaders("digits", batch_size=8, subset=16)
    assert data.loader_on(loader, "cpu") is loader


def write_cifar_batches(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
            "labels": [0, 3, 9, 3],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)


def test_cifar_torchvision_root(tmp_path, monkeypatch):
    write_cifar_batches(tmp_path)
    with pytest.raises(WgatesError, match="cifar-10-batches-py.*re-download"):
        data.cifar10(tmp_path, "train")  # real torchvision checks md5s: fakes fail them
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    train = data.cifar10(tmp_path, "train", cache_dir=tmp_path / "cache")
    test = data.cifar10(tmp_path / "cifar-10-batches-py", "test")
    assert len(train) == 20 and len(test) == 4 and train.classes == CLASSES
    assert test.targets.tolist() == [0, 3, 9, 3]
    assert train[0][0].shape == (3, 32, 32)


def test_error_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(WgatesError, match=str(missing)):
        data.cifar10(missing)
    with pytest.raises(WgatesError, match=str(missing)):
        data.make_loaders(f"imagefolder:{missing}")


def test_error_empty_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(WgatesError, match="no class folders"):
        data.cifar10(tmp_path, cache_dir=tmp_path / "c")
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(WgatesError, match="no images"):
        data.cifar10(tmp_path, cache_dir=tmp_path / "c")
    with pytest.raises(WgatesError, match=str(tmp_path / "test")):
        data.cifar10(tmp_path, "test", cache_dir=tmp_path / "c")
    with pytest.raises(WgatesError, match="no usable images"):
        data.image_folder(tmp_path, "train")


def test_error_corrupt_jpeg(jpeg_root, tmp_path):
    bad = jpeg_root / "train" / "cat" / "0001.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(WgatesError, match=str(bad)):
        data.cifar10(jpeg_root, cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.npz"))  # no half-decoded cache left behind


def test_image_folder(tmp_path):
    write_jpeg_tree(tmp_path, "train", per_class=1)
    write_jpeg_tree(tmp_path, "val", per_class=1)
    train, val, info = data.make_loaders(f"imagefolder:{tmp_path}", batch_size=4, image_size=24)
    assert info.input_shape == (3, 24, 24) and info.num_classes == 10
    assert next(iter(train))[0].shape == (4, 3, 24, 24)
    assert next(iter(val))[0].shape == (4, 3, 24, 24)
    bad = tmp_path / "val" / "dog" / "0000.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(WgatesError, match=str(bad)):
        list(val)


def test_bad_specs():
    with pytest.raises(WgatesError, match="digits"):
        data.make_loaders("mnist")
    with pytest.raises(WgatesError, match="cifar10:<root>"):
        data.make_loaders("cifar10")
    with pytest.raises(WgatesError, match="splits"):
        data.digits("test")


@pytest.mark.skipif(not (REAL_CIFAR / "test").is_dir(), reason=f"{REAL_CIFAR} not unpacked")
def test_real_cifar10_test_split(tmp_path):
    ds = data.cifar10(REAL_CIFAR, "test", cache_dir=tmp_path)
    assert len(ds) == 10_000 and ds.classes == CLASSES
    assert torch.bincount(ds.targets).tolist() == [1000] * 10
    x = torch.stack([ds[i][0] for i in range(0, 10_000, 50)])
    assert abs(x.mean().item()) < 0.2 and 0.8 < x.std().item() < 1.2


def test_folder_of_files_that_are_not_images_is_refused_when_loading(tmp_path):
    """Files named like images that are not (an HTML page, a Git LFS pointer): refused when
    the loaders are made, naming a file and the folder, not when training draws them."""
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                (folder / f"{i}.jpg").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(WgatesError, match="not an image") as err:
        data.make_loaders(f"imagefolder:{tmp_path}")
    assert str(tmp_path / "train" / "cat" / "0.jpg") in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_cifar10_root_without_data_says_what_it_expected(tmp_path):
    (tmp_path / "cifar").mkdir()  # exists, but empty
    with pytest.raises(WgatesError, match="neither cifar-10-batches-py/ nor a train/") as err:
        data.make_loaders(f"cifar10:{tmp_path / 'cifar'}")
    assert str(tmp_path / "cifar" / "train") + "/<class>/<image>" in str(err.value)
    with pytest.raises(WgatesError, match="has no train/ folder"):
        data.make_loaders(f"imagefolder:{tmp_path / 'cifar'}")
