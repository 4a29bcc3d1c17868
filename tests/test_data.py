import gzip
import struct

import pytest
import torch
from PIL import Image

from advkit import data


def _write_fake_fashion_mnist(folder, n=20):
    """A valid idx-format Fashion-MNIST in gzip files, as the Debian package ships them (n images per split)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for prefix in ("train", "t10k"):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.numpy().tobytes())


def test_prepare_from_the_debian_package_layout_is_idempotent(tmp_path):
    system = tmp_path / "system"
    _write_fake_fashion_mnist(system)
    raw = data.prepare_fashion_mnist(tmp_path / "root", system_dir=system, download=False)
    assert sorted(p.name for p in raw.iterdir()) == sorted(data.FASHION_MNIST_FILES)
    stamps = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    data.prepare_fashion_mnist(tmp_path / "root", system_dir=tmp_path / "gone", download=False)  # nothing to redo
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == stamps
    images, labels = data.load_tensors("fashion-mnist", "test", root=tmp_path / "root")
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 10 for i in range(20)]


def test_missing_fashion_mnist_names_both_ways(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*internet"):
        data.prepare_fashion_mnist(tmp_path, system_dir=tmp_path / "nothing", download=False)


def test_missing_cifar10_and_imagenet_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        data.load_tensors("cifar10", "train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        data.make_loader("imagenet", "train", 4, root=tmp_path)


@pytest.mark.parametrize("kwargs, param", [
    (dict(name="mnist", split="train", batch_size=8), "dataset='mnist'"),
    (dict(name="fashion-mnist", split="validation", batch_size=8), "split='validation'"),
    (dict(name="fashion-mnist", split="train", batch_size=0), "batch_size=0"),
    (dict(name="fashion-mnist", split="train", batch_size=8, n=10**6), "n=1000000"),
])
def test_bad_data_arguments(kwargs, param):
    with pytest.raises(ValueError, match=param):
        data.make_loader(**kwargs)


def test_subsets_are_seeded():
    a = data.subset_indices(1000, 50, seed=3)
    assert torch.equal(a, data.subset_indices(1000, 50, seed=3))
    assert not torch.equal(a, data.subset_indices(1000, 50, seed=4))
    assert len(set(a.tolist())) == 50
    assert torch.equal(data.subset_indices(5, None, 0), torch.arange(5))


def test_fashion_mnist_loaders_yield_uint8_and_keep_every_test_image():
    test = data.make_loader("fashion-mnist", "test", 64, n=1000, seed=0)
    batches = list(test)
    assert sum(len(b[1]) for b in batches) == 1000
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (64, 1, 28, 28)
    x, y = data.to_device((images, labels), "cpu")
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.max() > 0.5
    train = data.make_loader("fashion-mnist", "train", 64, n=1000, seed=0)
    assert len(list(train)) == 1000 // 64  # training drops the last partial batch
    train.sampler.sampler.set_epoch(0)
    first = next(iter(train))[1]
    train.sampler.sampler.set_epoch(1)
    assert not torch.equal(first, next(iter(train))[1])  # a new order each epoch


def test_random_crop_flip_shifts_and_flips():
    img = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = data.random_crop_flip(img, 2, torch.Generator().manual_seed(0))
    assert out.shape == img.shape and out.dtype == torch.uint8
    assert any(torch.equal(o[0], img[0, 0].flip(-1)) for o in out)  # some are flipped without shift
    assert sum(not torch.equal(o, img[0]) for o in out) > 32
    assert torch.equal(data.random_crop_flip(img, 0, torch.Generator().manual_seed(1))[0].sum(), img[0].sum())


def test_imagenet_imagefolder_pipeline(tmp_path):
    """A pipeline test on a tiny generated ImageFolder (not ImageNet): standard transforms, uint8 out."""
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (300, 260), (i * 40, 100, 200)).save(tmp_path / split / cls / f"{i}.png")
    train = data.make_loader("imagenet", "train", 4, root=tmp_path)
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 224, 224) and images.dtype == torch.uint8
    val = data.make_loader("imagenet", "test", 4, root=tmp_path)
    assert sum(len(b[1]) for b in val) == 6
