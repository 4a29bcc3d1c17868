"""Data sets: Fashion-MNIST (the embedded default), CIFAR-10 and ImageNet (an ImageFolder tree).

Every loader yields ``(images, labels)`` with images as uint8 tensors (N, C, H, W); :func:`to_device` moves a
batch to the device and scales it to [0, 1] there. Mean/std normalisation is the model's first layer
(:class:`advkit.models.Normalize`), so attacks work in pixel space.

Fashion-MNIST is prepared into ``<data root>/FashionMNIST/raw`` from the Debian package
``dataset-fashion-mnist`` (files under ``/usr/share/datasets/fashion-mnist``), else by torchvision's
downloader on machines with internet access. The data root is ``$ADVKIT_DATA`` or the repository's ``data/``.

ImageNet's JPEGs are decoded by the loader's workers with PIL (``decode='cpu'``, the default), or, with
``decode='gpu'``, read as bytes by the workers and decoded in batches on the GPU (torchvision's nvJPEG decoder),
where the augmentation runs too (:func:`decode_batch`); both yield the same uint8 (N, 3, 224, 224) batches.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets, transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as tv2

from .validate import check_choice, check_range

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SPLITS = ("train", "test")
DECODES = ("cpu", "gpu")  # where the ImageNet loader decodes JPEGs: PIL in the workers, or batched on the device
CROP, RESIZE = 224, 256  # ImageNet: training crops of CROP px; evaluation resizes to RESIZE, then center-crops


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": DatasetInfo(1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# images per split, known without reading the disk (ImageNet: whatever its folders hold)
SPLIT_SIZES: dict[str, dict[str, int]] = {"fashion-mnist": {"train": 60000, "test": 10000},
                                          "cifar10": {"train": 50000, "test": 10000}}


def default_root() -> Path:
    """``$ADVKIT_DATA`` if set, else the ``data/`` folder of the repository this package lives in."""
    return Path(os.environ.get("ADVKIT_DATA", Path(__file__).resolve().parents[1] / "data"))


def prepare_fashion_mnist(
    root: str | Path | None = None,
    system_dir: str | Path = FASHION_MNIST_SYSTEM_DIR,
    download: bool = True,
) -> Path:
    """Make ``<root>/FashionMNIST/raw`` hold the four uncompressed idx files; return that folder.

    Idempotent, and safe in several processes at once: each writes its own temporary file and renames it into
    place, so a reader sees no file or a complete one. Sources, in order: the Debian package's files in
    ``system_dir``, then torchvision's downloader (``download=True``). Raises FileNotFoundError naming both ways
    when neither works.
    """
    root = Path(root) if root is not None else default_root()
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in FASHION_MNIST_FILES):
        return raw
    system_dir = Path(system_dir)
    if all((system_dir / f"{name}.gz").is_file() for name in FASHION_MNIST_FILES):
        raw.mkdir(parents=True, exist_ok=True)
        for name in FASHION_MNIST_FILES:
            with gzip.open(system_dir / f"{name}.gz", "rb") as src, tempfile.NamedTemporaryFile(
                    dir=raw, prefix=f".{name}.", suffix=".partial", delete=False) as dst:
                try:
                    shutil.copyfileobj(src, dst)
                except BaseException:
                    os.unlink(dst.name)
                    raise
            os.chmod(dst.name, 0o644)  # a temporary file is private (0600); the data root may be shared
            os.replace(dst.name, raw / name)
        return raw
    error = None
    if download:
        try:
            datasets.FashionMNIST(str(root), train=True, download=True)
            datasets.FashionMNIST(str(root), train=False, download=True)
            return raw
        except Exception as exc:  # no network, blocked host, ...
            error = exc
    raise FileNotFoundError(
        f"Fashion-MNIST is not available: no idx files in {raw}, none in system_dir={str(system_dir)!r}"
        + (f", and torchvision's download failed ({error})" if error else " and download=False")
        + ". Either install the Debian package (apt-get install dataset-fashion-mnist) or run on a machine with"
          " internet access so that torchvision can download it (advkit.data.prepare_fashion_mnist(download=True))."
    )


DATA_NAMES = {"fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "imagenet": "ImageNet"}
DATA_HINTS = {"fashion-mnist": "run `advkit data` to prepare it there",
              "cifar10": "put the extracted python version of CIFAR-10 (cifar-10-batches-py) there",
              "imagenet": "it must hold train/ and val/ with one sub-folder per class"}


def check_available(name: str, root: str | Path | None = None) -> None:
    """Raise FileNotFoundError naming ``data_root`` when data set ``name`` is missing or unreadable under
    ``root`` (None: the default root). Cheap: the trainer calls it before it writes anything."""
    check_choice("dataset", name, list(DATASETS))
    base = Path(root) if root is not None else default_root() / ("imagenet" if name == "imagenet" else "")
    needed = {"fashion-mnist": [base / "FashionMNIST" / "raw" / f for f in FASHION_MNIST_FILES],
              "cifar10": [base / "cifar-10-batches-py"],
              "imagenet": [base / "train", base / "val"]}[name]
    missing = [path for path in needed if not os.access(path, os.R_OK)]
    from_system = name == "fashion-mnist" and all(
        (FASHION_MNIST_SYSTEM_DIR / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES)  # copied on first use
    if missing and not from_system:
        raise FileNotFoundError(
            f"data_root={None if root is None else str(root)!r} is not accepted for dataset={name!r}: "
            f"{DATA_NAMES[name]} is not readable in {base} ({missing[0]} is missing or unreadable); "
            f"{DATA_HINTS[name]}, or set data_root (or $ADVKIT_DATA) to the folder that holds it")


def _check_split(split: str) -> None:
    check_choice("split", split, SPLITS)


def load_tensors(
    name: str,
    split: str,
    root: str | Path | None = None,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole small data set in memory: uint8 images (N, C, H, W) and int64 labels."""
    check_choice("dataset", name, ["fashion-mnist", "cifar10"])
    _check_split(split)
    root = Path(root) if root is not None else default_root()
    train = split == "train"
    if name == "fashion-mnist":
        prepare_fashion_mnist(root, download=download)
        ds = datasets.FashionMNIST(str(root), train=train, download=False)
        return ds.data.unsqueeze(1).contiguous(), ds.targets.long()
    try:
        ds = datasets.CIFAR10(str(root), train=train, download=download)
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"CIFAR-10 is not in {root / 'cifar-10-batches-py'} ({exc}). Put the extracted python version of "
            "CIFAR-10 there, or pass download=True on a machine with internet access."
        ) from None
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long)


def subset_indices(total: int, n: int | None, seed: int) -> torch.Tensor:
    """The first ``n`` of a seeded permutation of ``range(total)`` (all of them, in order, when n is None)."""
    if n is None:
        return torch.arange(total)
    check_range("n", n, 1, total, integer=True)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def _check_subset_size(name: str, split: str, n: int | None, total: int) -> None:
    """A subset larger than the split, named with the run parameters that set ``n``."""
    if isinstance(n, int) and not isinstance(n, bool) and n > total:
        params = "n_train" if split == "train" else "n_test, sanity_n or eval_autoattack_n"
        raise ValueError(f"n={n} is not accepted for the {'training' if split == 'train' else 'test'} split of "
                         f"{DATA_NAMES[name]} ({total} images; a run's {params}): it must lie in [1, {total}]")


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop after zero padding plus random horizontal flip, on a uint8 batch."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def draw_seed(epoch_seed: int, index: int) -> int:
    """The seed of the random augmentation of the sample (or batch) at ``index``: a function of the epoch's seed
    (per run seed, epoch and rank: the trainer sets it) and the index alone, so the crops do not depend on which
    loader worker draws them, on how many there are, or on whether the run was resumed."""
    return (epoch_seed * 1_000_003 + index) % 2**63


class TensorImages(Dataset):
    """uint8 images and labels in memory, indexed by a whole list of indices at once (one gather per batch); with
    ``crop_padding``, each batch's crops and flips are seeded by :func:`draw_seed` of its first index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, crop_padding: int = 0, seed: int = 0) -> None:
        self.images, self.labels, self.crop_padding = images, labels, crop_padding
        self.epoch_seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[index]
        if self.crop_padding:
            generator = torch.Generator().manual_seed(draw_seed(self.epoch_seed, int(index[0])))
            images = random_crop_flip(images, self.crop_padding, generator)
        return images, self.labels[index]


class SeededDraws(Dataset):
    """A data set whose per-sample transforms draw from torch's global random state (torchvision's), each sample
    seeded by :func:`draw_seed` of its index (the global state outside is left as it was)."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.epoch_seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed(self.epoch_seed, index))
            return self.dataset[index]


def _imagenet_folder(root: str | Path, split: str) -> Path:
    _check_split(split)
    folder = Path(root) / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ImageNet folder {folder} does not exist: data_root must hold train/ and val/ with one sub-folder per class")
    return folder


def imagenet_dataset(root: str | Path, split: str, augment: bool | None = None) -> datasets.ImageFolder:
    """ImageNet as an ImageFolder (``<root>/train``, ``<root>/val``), decoded by PIL, uint8 output: the standard
    augmentation (RandomResizedCrop 224 and a horizontal flip) when ``augment`` (default: the training split),
    else resize to 256 and center-crop 224."""
    folder = _imagenet_folder(root, split)
    if split == "train" if augment is None else augment:
        tf = transforms.Compose([transforms.RandomResizedCrop(CROP), transforms.RandomHorizontalFlip(),
                                 transforms.PILToTensor()])
    else:
        tf = transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(CROP), transforms.PILToTensor()])
    return datasets.ImageFolder(str(folder), transform=tf)


def read_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 tensor: all that the workers of a ``decode='gpu'`` loader do per image."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def encoded_imagenet(root: str | Path, split: str) -> datasets.ImageFolder:
    """ImageNet's files (the same ImageFolder samples as :func:`imagenet_dataset`) as undecoded bytes."""
    return datasets.ImageFolder(str(_imagenet_folder(root, split)), loader=read_bytes)


def collate_encoded(samples: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A batch of files of different lengths: the list of byte tensors and the labels."""
    return [file for file, _ in samples], torch.tensor([label for _, label in samples])


def jpeg_components(encoded: torch.Tensor) -> int | None:
    """The number of colour components a JPEG's frame header declares (1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK), or
    None when ``encoded`` is not a JPEG or its header cannot be read."""
    data = encoded.numpy().tobytes()
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 9 < len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):  # SOFn
            return data[pos + 9]
        pos += 2 + length
    return None


def _quietly(fn, *args, **kwargs):
    """Call a torchvision decoder without its deprecation warning (torchvision 0.29 points to TorchCodec, which
    the kit does not depend on); one warning per image would drown a training log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                                DeprecationWarning)
        return fn(*args, **kwargs)


def _pil_decode(encoded: torch.Tensor) -> torch.Tensor:
    """What the CPU path decodes (ImageFolder's PIL loader: any format, converted to RGB), as a (3, H, W) tensor."""
    with Image.open(io.BytesIO(encoded.numpy().tobytes())) as image:
        return transforms.functional.pil_to_tensor(image.convert("RGB"))


def decode_images(encoded: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Decode files' bytes to RGB uint8 (3, H, W) tensors on ``device``.

    JPEGs with 1 or 3 components go through one batched call of torchvision's ``decode_jpeg`` (nvJPEG on CUDA).
    The batched call returns nothing if one image fails, so then each is retried alone. What that decoder does
    not take (PNG and other formats, CMYK JPEGs, JPEGs it rejects) is decoded by PIL on the CPU, as the CPU path
    decodes it, and moved to ``device``."""
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, file in enumerate(encoded) if jpeg_components(file) in (1, 3)]
    if jpegs:
        try:
            decoded = _quietly(decode_jpeg, [encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one_jpeg(encoded[i], device) for i in jpegs]
        for i, image in zip(jpegs, decoded):
            out[i] = image
    return [image if image is not None else _pil_decode(file).to(device) for image, file in zip(out, encoded)]


def _decode_one_jpeg(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return _quietly(decode_jpeg, encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def resize_center_crop(image: torch.Tensor) -> torch.Tensor:
    """The evaluation transform of :func:`imagenet_dataset` on a (3, H, W) tensor: shorter side to 256, center
    224 x 224."""
    return tv2.center_crop(tv2.resize(image, [RESIZE], antialias=True), [CROP])


def random_resized_crop_flip(images: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """The training augmentation of :func:`imagenet_dataset` (torchvision's RandomResizedCrop to 224 with its
    default scale and ratio ranges, and a horizontal flip with probability 1/2) on each (3, H, W) tensor, on its
    device, stacked. The draws come from ``generator`` (torchvision draws from the global RNG: it is forked,
    seeded from ``generator`` and left as it was), so an epoch's crops are reproducible."""
    crop = transforms.RandomResizedCrop(CROP)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**63 - 1, (), generator=generator)))
        boxes = [crop.get_params(image, crop.scale, crop.ratio) for image in images]
        flip = torch.rand(len(images)) < 0.5
    out = torch.stack([tv2.resized_crop(image, *box, [CROP, CROP], antialias=True)
                       for image, box in zip(images, boxes)])
    return torch.where(flip.to(out.device)[:, None, None, None], out.flip(-1), out)


def decode_batch(encoded: list[torch.Tensor], device: torch.device | str, augment: bool,
                 generator: torch.Generator) -> torch.Tensor:
    """A batch of files decoded and transformed on ``device`` into uint8 (N, 3, 224, 224): the same images as
    :func:`imagenet_dataset` gives (``augment``: random crops drawn from ``generator``; else the center crop).
    Device-agnostic: on the CPU it runs the same code, which is how the tests check it."""
    images = decode_images(encoded, device)
    if augment:
        return random_resized_crop_flip(images, generator)
    return torch.stack([resize_center_crop(image) for image in images])


class DecodingLoader:
    """A DataLoader of files' bytes (``decode='gpu'``) whose batches are decoded and augmented on ``device`` as
    they are drawn: ``(uint8 images on device, labels)``. ``sampler``, ``dataset`` and ``len`` are the inner
    loader's; ``generator`` draws the crops (the trainer reseeds it every epoch, as TensorImages' generator)."""

    def __init__(self, loader: DataLoader, device: torch.device, augment: bool, seed: int) -> None:
        self.loader, self.device, self.augment = loader, device, augment
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler, self.dataset = loader.sampler, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for encoded, labels in self.loader:
            yield decode_batch(encoded, self.device, self.augment, self.generator), labels


def _decode_device(name: str, decode: str, device: torch.device | str | None) -> torch.device | None:
    """Where the loader decodes: None (the workers, PIL) for ``decode='cpu'``, else the device (default cuda)."""
    check_choice("decode", decode, DECODES)
    if decode == "cpu":
        return None
    if name != "imagenet":
        raise ValueError(f"decode='gpu' is not accepted for dataset={name!r}: it decodes ImageNet's JPEG files, "
                         f"and {DATA_NAMES[name]} is held in memory already decoded; use decode='cpu'")
    device = torch.device(device if device is not None else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("decode='gpu' is not accepted: no CUDA device is visible; use decode='cpu' (the default)")
    return device


def make_loader(
    name: str,
    split: str,
    batch_size: int,
    *,
    n: int | None = None,
    seed: int = 0,
    root: str | Path | None = None,
    shuffle: bool | None = None,
    augment: bool | None = None,
    drop_last: bool | None = None,
    num_workers: int = 0,
    world_size: int = 1,
    rank: int = 0,
    download: bool = False,
    decode: str = "cpu",
    device: torch.device | str | None = None,
    persistent_workers: bool = False,
) -> DataLoader | DecodingLoader:
    """A DataLoader of uint8 batches for ``name`` in DATASETS.

    Training loaders shuffle (seeded; call ``loader.sampler.set_epoch(e)`` for a new order each epoch, as with
    DistributedSampler) and drop the last partial batch; test loaders keep order and every image. ``n`` takes
    a seeded subset. ``world_size``/``rank`` shard the data for distributed training. ImageNet only:
    ``decode='gpu'`` has the workers read bytes and decodes and augments each batch on ``device`` (default
    cuda; a ValueError when no CUDA device is visible; ``device='cpu'`` runs the same code on the CPU, as the
    tests do), yielding the same uint8 batches, already on ``device``. Workers start afresh each epoch, seeded
    from the loader's generator (the trainer reseeds it per epoch), so an epoch's augmentations do not depend on
    the epochs before it; ``persistent_workers`` keeps them alive instead (throughput benchmarks; their crops keep
    the first epoch's seed).
    """
    check_choice("dataset", name, list(DATASETS))
    _check_split(split)
    check_range("batch_size", batch_size, 1, integer=True)
    decode_device = _decode_device(name, decode, device)
    train = split == "train"
    shuffle = train if shuffle is None else shuffle
    augment = train if augment is None else augment
    drop_last = train if drop_last is None else drop_last
    if name == "imagenet":
        root = root if root is not None else default_root() / "imagenet"
        ds = imagenet_dataset(root, split, augment) if decode_device is None else encoded_imagenet(root, split)
        if n is not None:
            _check_subset_size(name, split, n, len(ds))
            ds = Subset(ds, subset_indices(len(ds), n, seed).tolist())
        if decode_device is None and augment:
            ds = SeededDraws(ds, seed)
        sampler = DistributedSampler(ds, world_size, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                            pin_memory=torch.cuda.is_available() and decode_device is None,
                            persistent_workers=persistent_workers and num_workers > 0,
                            generator=torch.Generator().manual_seed(seed),
                            collate_fn=None if decode_device is None else collate_encoded)
        return loader if decode_device is None else DecodingLoader(loader, decode_device, augment, seed)
    images, labels = load_tensors(name, split, root, download=download)
    _check_subset_size(name, split, n, len(labels))
    keep = subset_indices(len(labels), n, seed)
    ds = TensorImages(images[keep], labels[keep], crop_padding=4 if (augment and name == "cifar10") else 0, seed=seed)
    sampler = DistributedSampler(ds, world_size, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(ds, sampler=BatchSampler(sampler, batch_size, drop_last), batch_size=None,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed))


def to_device(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device | str,
              channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a uint8 batch to ``device`` and scale it to float [0, 1] there."""
    images, labels = batch
    images = images.to(device, non_blocking=True).float().div_(255)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)
