"""Data sets the pipeline trains, calibrates and evaluates on, named by one spec string.

`digits` (scikit-learn's bundled 8x8 digits) needs no files and drives the fast default;
`cifar10:<root>` decodes once into a uint8 array cache so epochs on 2 CPU cores are not
spent in JPEG decoding; `imagefolder:<root>` is the ordinary ImageNet-layout path.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    Subset,
    TensorDataset,
)
from tqdm import tqdm

from wgates import distributed
from wgates.errors import WgatesError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CIFAR_BATCHES = "cifar-10-batches-py"


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a data set: classes and the (C, H, W) it gets."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]


def digits(split: str = "train", image_size: int = 32, seed: int = 0) -> TensorDataset:
    """scikit-learn's 1,797 digits, a stratified 80/20 train/val split fixed by `seed`,
    upsampled to `image_size` so conv widths, not framework overhead, set latency."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
        raise WgatesError(f"digits has splits 'train' and 'val', not {split!r}")
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear")
    labels = torch.from_numpy(data.target.astype(np.int64))
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=seed, stratify=data.target
    )
    train = images[train_idx]  # normalise both splits with train statistics
    mean, std = train.mean(), train.std()
    idx = torch.from_numpy(train_idx if split == "train" else val_idx)
    return TensorDataset((images[idx] - mean) / std, labels[idx])


class CifarArrays(Dataset):
    """CIFAR-style uint8 images held in memory; normalised (and, for training, randomly
    cropped with 4-pixel padding and flipped) a whole batch at a time via `__getitems__`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], augment: bool):
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.classes = list(classes)
        self.augment = augment
        self.mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch = self.transform(self.images[indices], self.mean, self.std)
        return list(zip(batch.unbind(0), self.targets[indices].unbind(0), strict=True))

    def transform(self, batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        """uint8 images -> normalised float ones, augmented when training; on the images'
        own device (`mean` and `std` are on it too)."""
        if self.augment:
            batch = _random_crop_flip(batch, pad=4)
        return (batch.float() - mean) / std


def _random_crop_flip(batch: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad, random crop back to size and random horizontal flip, as one `gather`
    (several times faster than advanced indexing or per-image slicing), on `batch`'s device."""
    n, c, h, w = batch.shape
    on = {"device": batch.device}
    padded = F.pad(batch, (pad, pad, pad, pad)).view(n, c, -1)
    rows = torch.randint(0, 2 * pad + 1, (n, 1), **on) + torch.arange(h, **on)
    cols = torch.randint(0, 2 * pad + 1, (n, 1), **on) + torch.arange(w, **on)
    cols = torch.where(torch.rand(n, 1, **on) < 0.5, cols.flip(1), cols)
    index = rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]
    return padded.gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


class DeviceBatches:
    """A loader whose uint8 images live on `device` and are cropped, flipped and normalised
    there, batch by batch, in the order of `sampler` (an `EpochShuffle` or a
    `DistributedSampler`: `train` sets its epoch as for a DataLoader).

    Why: on a GPU the per-image work in CPU processes starves it. The 60-epoch ResNet-20
    training on an H100 ran at about 7,500 images/s, bound by the CPU augmentation of 6
    cores, not by the GPU. The whole CIFAR-10 training set is 150 MB of uint8."""

    def __init__(self, data: CifarArrays, indices: list[int] | None, sampler, batch_size: int,
                 device: torch.device | str) -> None:
        chosen = slice(None) if indices is None else torch.as_tensor(indices)
        self.data, self.device = data, torch.device(device)
        self.images = data.images[chosen].to(self.device)
        self.targets = data.targets[chosen].to(self.device)
        self.mean, self.std = data.mean.to(self.device), data.std.to(self.device)
        self.sampler, self.batch_size = sampler, batch_size

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        order = torch.as_tensor(list(self.sampler), device=self.device)
        for part in order.split(self.batch_size):
            yield self.data.transform(self.images[part], self.mean, self.std), self.targets[part]


def loader_on(loader: DataLoader, device: torch.device | str) -> DataLoader | DeviceBatches:
    """`loader` with its images moved to `device` and transformed there (`DeviceBatches`),
    when they are an in-memory uint8 set (CIFAR); any other loader is returned as it is."""
    data, indices = loader.dataset, None
    if isinstance(data, Subset):
        data, indices = data.dataset, list(data.indices)
    if not isinstance(data, CifarArrays):
        return loader
    return DeviceBatches(data, indices, loader.sampler, loader.batch_size, device)


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise WgatesError(f"{what} {path} does not exist: check the path")
    if not path.is_dir():
        raise WgatesError(f"{what} {path} is not a directory: give the folder that holds it")


def _class_files(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class folders and (image path, class index) pairs of an ImageFolder split."""
    _require_dir(split_dir, "data folder")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise WgatesError(
            f"{split_dir} has no class folders: lay images out as {split_dir}/<class>/<image>"
        )
    files = [
        (Path(entry.path), label)
        for label, name in enumerate(classes)
        for entry in sorted(os.scandir(split_dir / name), key=lambda e: e.name)
        if entry.name.lower().endswith(IMAGE_EXTENSIONS)
    ]
    if not files:
        raise WgatesError(
            f"{split_dir} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)}): "
            "check the folder is fully unpacked"
        )
    return classes, files


def _open_rgb(path: str | Path) -> Image.Image:
    """PIL RGB image; a corrupt file becomes a WgatesError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise WgatesError(f"cannot read image {path} ({err}): delete or replace the file") from err


def _decode_folder(split_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes, files = _class_files(split_dir)
    images = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(tqdm(files, desc=f"decoding {split_dir}", unit="img")):
        img = _open_rgb(path)
        if img.size != (32, 32):
            img = img.resize((32, 32), Image.BILINEAR)
        images[i] = np.asarray(img)
    return images, np.array([label for _, label in files], dtype=np.int64), classes


def _load_cifar_batches(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=split == "train", download=False)
    except RuntimeError as err:
        raise WgatesError(
            f"{root / _CIFAR_BATCHES} is incomplete or corrupted ({err}): "
            "re-download the CIFAR-10 python version (torchvision.datasets.CIFAR10(root, "
            "download=True)) or use the JPEG ImageFolder copy"
        ) from err
    return ds.data, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)


def default_cache_dir() -> Path:
    """Where decoded arrays go unless told otherwise: $XDG_CACHE_HOME/wgates or ~/.cache/wgates."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "wgates"


def _cached_folder(split_dir: Path, cache_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode an ImageFolder split once; later calls read the .npz (delete it to re-decode)."""
    key = hashlib.sha256(str(split_dir.resolve()).encode()).hexdigest()[:16]
    cache = cache_dir / f"cifar10-{split_dir.name}-{key}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return z["images"], z["labels"], [str(c) for c in z["classes"]]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # an unreadable cache (disk trouble, old format) is simply rebuilt
    images, labels, classes = _decode_folder(split_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, classes=np.array(classes))
        os.replace(tmp, cache)  # atomic: a concurrent reader never sees half a file
    except OSError as err:  # the data is decoded: losing only the cache is worth a warning
        warnings.warn(
            f"cannot write the decode cache in {cache_dir} ({err}); the next run decodes "
            "again: pass a writable cache_dir",
            stacklevel=3,
        )
    return images, labels, classes


def cifar10(
    root: str | Path,
    split: str = "train",
    cache_dir: str | Path | None = None,
    augment: bool | None = None,
) -> CifarArrays:
    """CIFAR-10 from an ImageFolder tree (`root/train/<class>/*.jpg`, `root/test/...`) or a
    torchvision root holding `cifar-10-batches-py`. `augment` defaults to True for train."""
    if split not in ("train", "test"):
        raise WgatesError(f"cifar10 has splits 'train' and 'test', not {split!r}")
    root = Path(root).expanduser()
    _require_dir(root, "CIFAR-10 root")
    if root.name == _CIFAR_BATCHES:
        root = root.parent
    if (root / _CIFAR_BATCHES).is_dir():
        images, labels, classes = _load_cifar_batches(root, split)
    elif not (root / split).exists():
        raise WgatesError(
            f"CIFAR-10 root {root} holds neither {_CIFAR_BATCHES}/ nor a {split}/ folder: give "
            f"the folder that holds {_CIFAR_BATCHES} (torchvision's download) or an ImageFolder "
            f"tree {root / split}/<class>/<image>"
        )
    else:
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        images, labels, classes = _cached_folder(root / split, cache)
    return CifarArrays(images, labels, classes, split == "train" if augment is None else augment)


def image_folder(
    root: str | Path, split: str = "train", image_size: int = 224, augment: bool | None = None
) -> Dataset:
    """ImageNet-layout folder (`root/train/<class>/...`, `root/val/<class>/...`) with the
    standard random-resized-crop (train) or resize + center-crop (val) transforms."""
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    root = Path(root).expanduser()
    _require_dir(root, "image folder root")
    split_dir = root / split
    if not split_dir.exists():
        raise WgatesError(f"image folder root {root} has no {split}/ folder: lay images out as "
                          f"{split_dir}/<class>/<image>")
    _require_dir(split_dir, "data folder")
    augment = split == "train" if augment is None else augment
    if augment:
        resize = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        resize = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
    transform = T.Compose([*resize, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        folder = ImageFolder(str(split_dir), transform=transform, loader=_open_rgb)
    except FileNotFoundError as err:  # no class folders, or no images in them
        raise WgatesError(
            f"{split_dir} holds no usable images ({err}): "
            f"lay them out as {split_dir}/<class>/<image>"
        ) from err
    _check_first_images(folder.samples)
    return folder


def _check_first_images(samples: list[tuple[str, int]]) -> None:
    """Open the header of the first file of each class, so that a folder of files that are
    not images (an HTML error page or a Git LFS pointer saved as .jpg) is refused before
    training rather than when its first batch is drawn. Images are otherwise decoded as
    training reads them: a later bad file stops training with its name."""
    seen: set[int] = set()
    for path, label in samples:
        if label in seen:
            continue
        seen.add(label)
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError, SyntaxError) as err:
            raise WgatesError(
                f"cannot read image {path} ({err}): not an image; delete or replace the files "
                f"that are not images in {Path(path).parent}"
            ) from None


def subset_of(ds: Dataset, n: int | None) -> Dataset:
    """`n` samples spread evenly over `ds` (so every class of a sorted folder shows up)."""
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise WgatesError(f"subset must be a positive number of samples, got {n}")
    return Subset(ds, np.linspace(0, len(ds) - 1, n).round().astype(int).tolist())


class EpochShuffle(Sampler[int]):
    """A fresh permutation each epoch, drawn from (seed, epoch) alone: a run resumed at epoch
    k sees the same order as one that never stopped. `train` calls `set_epoch`, as it does
    for torch's DistributedSampler."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


def make_loaders(
    spec: str,
    batch_size: int = 128,
    workers: int = 0,
    subset: int | None = None,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    augment: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[DataLoader | DeviceBatches, DataLoader | DeviceBatches, DataInfo]:
    """Train and validation loaders for `digits`, `cifar10:<root>` or `imagefolder:<root>`.

    `batch_size` is the global batch: under torchrun each rank loads its share of it from
    its own shard of the training set (`DistributedSampler`, seeded; `train` sets its epoch).
    Every rank validates on the whole validation set (the same weights give the same figure).
    `image_size` applies to digits (default 32) and imagefolder (default 224); CIFAR is 32.
    `subset` keeps that many samples of each split, for quick runs and tests.
    On a CUDA `device`, CIFAR's images are held and augmented on the GPU (`loader_on`).
    """
    kind, _, root = spec.partition(":")
    if kind == "digits" and not root:
        size = image_size or 32
        train, val = digits("train", size, seed), digits("val", size, seed)
        classes = tuple(str(i) for i in range(10))
        shape = (1, size, size)
    elif kind == "cifar10" and root:
        train = cifar10(root, "train", cache_dir, augment)
        val = cifar10(root, "test", cache_dir, augment=False)
        classes, shape = tuple(train.classes), (3, 32, 32)
    elif kind == "imagefolder" and root:
        size = image_size or 224
        train = image_folder(root, "train", size, augment)
        val = image_folder(root, "val", size, augment=False)
        classes, shape = tuple(train.classes), (3, size, size)
    else:
        raise WgatesError(
            f"unknown data spec {spec!r}: use 'digits', 'cifar10:<root>' or 'imagefolder:<root>'"
        )
    ranks = distributed.world_size()
    if batch_size % ranks:
        raise WgatesError(f"batch size {batch_size} is the global batch: it must divide "
                          f"evenly over the {ranks} ranks")
    common = {"batch_size": batch_size // ranks, "num_workers": workers,
              "persistent_workers": workers > 0}
    train = subset_of(train, subset)
    sampler = (DistributedSampler(train, ranks, distributed.rank(), shuffle=True, seed=seed)
               if ranks > 1 else EpochShuffle(len(train), seed))
    train_loader = DataLoader(train, sampler=sampler, **common)
    val_loader = DataLoader(subset_of(val, subset), shuffle=False, **common)
    if device is not None and torch.device(device).type == "cuda":
        train_loader, val_loader = loader_on(train_loader, device), loader_on(val_loader, device)
    return train_loader, val_loader, DataInfo(kind, len(classes), shape, classes)
