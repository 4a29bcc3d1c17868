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


def _jpeg_folder(root, sizes=((64, 80),), classes=("n01", "n02"), per_class=4, extra=()):
    """A tiny generated ImageFolder of smooth random RGB JPEGs (train/ and val/ alike), plus ``extra`` files
    (name, PIL image, format) in the first class."""
    for split in ("train", "val"):
        generator = torch.Generator().manual_seed(0)  # the same files in both
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                w, h = sizes[i % len(sizes)]
                low = torch.randint(0, 256, (h // 8, w // 8, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(low.numpy()).resize((w, h), Image.BICUBIC).save(root / split / cls / f"{i}.jpg",
                                                                                quality=90)
        for name, image, fmt in extra:
            image.save(root / split / classes[0] / name, fmt)
    return root


def test_imagenet_augment_false_gives_the_evaluation_crop_of_training_images(tmp_path):
    """bnstats reads training images without augmentation (augment=False): the deterministic resize + center
    crop, not RandomResizedCrop."""
    _jpeg_folder(tmp_path)
    loader = data.make_loader("imagenet", "train", 8, root=tmp_path, shuffle=False, augment=False)
    first, second = next(iter(loader))[0], next(iter(loader))[0]
    assert torch.equal(first, second)
    val = next(iter(data.make_loader("imagenet", "test", 8, root=tmp_path)))[0]
    assert torch.equal(first, val)  # train/ and val/ hold the same generated files


def _odd_files():
    """Files the GPU decoder does not take or may reject: a PNG, a grayscale JPEG and a CMYK JPEG."""
    gradient = Image.linear_gradient("L").resize((72, 60))
    return [("png.png", Image.merge("RGB", (gradient, gradient.rotate(90), gradient)), "PNG"),
            ("gray.jpg", gradient, "JPEG"), ("cmyk.jpg", Image.new("CMYK", (70, 66), (10, 200, 30, 40)), "JPEG")]


def _batches(loader):
    return [(images.clone(), labels.clone()) for images, labels in loader]


@pytest.mark.parametrize("split, augment", [("test", None), ("train", False)])
def test_device_decoding_gives_the_cpu_paths_evaluation_images(tmp_path, split, augment):
    """decode='gpu' run on the CPU: the same uint8 images as PIL's path, pixel for pixel (both decode with
    libjpeg-turbo, and torch's uint8 antialiased resize reproduces PIL's on these upscaled images), a PNG, a
    grayscale and a CMYK JPEG included. On CUDA, nvJPEG's IDCT may differ from libjpeg-turbo by a few levels."""
    _jpeg_folder(tmp_path, sizes=((64, 80), (80, 64)), extra=_odd_files())
    kwargs = dict(root=tmp_path, shuffle=False, augment=augment)
    cpu = _batches(data.make_loader("imagenet", split, 4, **kwargs))
    device = _batches(data.make_loader("imagenet", split, 4, decode="gpu", device="cpu", **kwargs))
    assert len(cpu) == len(device) == (3 if split == "test" else 2)  # 11 files; training drops the partial batch
    for (x_cpu, y_cpu), (x_dev, y_dev) in zip(cpu, device):
        assert x_dev.dtype == torch.uint8 and x_dev.shape == x_cpu.shape and x_dev.shape[1:] == (3, 224, 224)
        assert torch.equal(y_cpu, y_dev)
        assert torch.equal(x_cpu, x_dev)


def test_device_decoding_falls_back_to_pil_per_image(tmp_path, monkeypatch):
    """PNG and CMYK files never reach the JPEG decoder; a JPEG it rejects (nvJPEG may reject some) fails the
    batched call, is retried alone, and is decoded by PIL: the images stay those of the CPU path."""
    _jpeg_folder(tmp_path, per_class=2, extra=_odd_files())
    seen, real = [], data.decode_jpeg

    def picky_decoder(encoded, **kwargs):
        files = encoded if isinstance(encoded, list) else [encoded]
        seen.extend(data.jpeg_components(f) for f in files)
        if any(data.jpeg_components(f) == 1 for f in files):
            raise RuntimeError("simulated nvJPEG failure on a grayscale JPEG")
        return real(encoded, **kwargs)

    monkeypatch.setattr(data, "decode_jpeg", picky_decoder)
    cpu = _batches(data.make_loader("imagenet", "test", 7, root=tmp_path))
    device = _batches(data.make_loader("imagenet", "test", 7, root=tmp_path, decode="gpu", device="cpu"))
    assert set(seen) == {1, 3}  # the grayscale JPEG was tried, the CMYK JPEG and the PNG were not
    assert seen.count(1) == 2  # once in the batch, once alone
    assert all(torch.equal(a[0], b[0]) for a, b in zip(cpu, device))


def test_jpeg_components_reads_the_frame_header():
    import io

    def encode(image, fmt="JPEG", **kwargs):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kwargs)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    assert data.jpeg_components(encode(Image.new("RGB", (9, 9)), progressive=True)) == 3
    assert data.jpeg_components(encode(Image.new("L", (9, 9)))) == 1
    assert data.jpeg_components(encode(Image.new("CMYK", (9, 9)))) == 4
    assert data.jpeg_components(encode(Image.new("RGB", (9, 9)), "PNG")) is None
    assert data.jpeg_components(encode(Image.new("RGB", (9, 9)))[:40]) is None  # truncated before the frame


def test_device_augmentation_crops_flips_and_is_reproducible(tmp_path):
    """Training batches of the device path: uint8 (N, 3, 224, 224) like the CPU path's; random crops and flips
    (a horizontal ramp stays monotone along each row, rising or falling); the same generator seed, the same
    batch; another seed, other crops."""
    ramp = torch.arange(200, dtype=torch.uint8).repeat(3, 150, 1)  # (3, 150, 200): value = column
    images = [ramp] * 32
    out = data.random_resized_crop_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == (32, 3, 224, 224) and out.dtype == torch.uint8
    rows = out[:, 0, 112].int()
    rising, falling = (rows.diff() >= 0).all(1), (rows.diff() <= 0).all(1)
    assert (rising | falling).all() and 4 <= falling.sum() <= 28  # flipped about half the time
    assert len({(r.min().item(), r.max().item()) for r in rows}) > 16  # different crops
    assert torch.equal(out, data.random_resized_crop_flip(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, data.random_resized_crop_flip(images, torch.Generator().manual_seed(1)))
    _jpeg_folder(tmp_path)
    cpu = next(iter(data.make_loader("imagenet", "train", 4, root=tmp_path)))
    device = next(iter(data.make_loader("imagenet", "train", 4, root=tmp_path, decode="gpu", device="cpu")))
    assert device[0].shape == cpu[0].shape and device[0].dtype == cpu[0].dtype
    assert torch.equal(device[1], cpu[1])  # the same sampler order


def test_the_trainer_reseeds_the_device_augmentation_every_epoch(tmp_path):
    from advkit import train

    _jpeg_folder(tmp_path)
    loader = data.make_loader("imagenet", "train", 8, root=tmp_path, decode="gpu", device="cpu", shuffle=False)
    epoch = {}
    for e in (0, 1, 0):
        train._set_epoch(loader, e, seed=3, rank=0)
        epoch.setdefault(e, []).append(next(iter(loader))[0])
    assert torch.equal(epoch[0][0], epoch[0][1]) and not torch.equal(epoch[0][0], epoch[1][0])


def test_device_decoding_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    _jpeg_folder(tmp_path)
    with pytest.raises(ValueError, match=r"decode='jpeg' is not accepted; choose one of \['cpu', 'gpu'\]"):
        data.make_loader("imagenet", "train", 4, root=tmp_path, decode="jpeg")
    with pytest.raises(ValueError, match="decode='gpu' is not accepted for dataset='fashion-mnist'"):
        data.make_loader("fashion-mnist", "train", 4, decode="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="decode='gpu' is not accepted: no CUDA device is visible"):
        data.make_loader("imagenet", "train", 4, root=tmp_path, decode="gpu")


@pytest.mark.parametrize("overrides, message", [
    (dict(decode="nvjpeg"), r"decode='nvjpeg' is not accepted; choose one of \['cpu', 'gpu'\]"),
    (dict(decode="gpu"), r"decode='gpu' is not accepted with dataset='fashion-mnist'"),
    (dict(decode="gpu", dataset="imagenet", arch="resnet50", device="cpu"),
     r"decode='gpu' is not accepted with device='cpu'"),
])
def test_the_config_refuses_device_decoding_where_it_cannot_run(overrides, message):
    from advkit.config import make_config

    with pytest.raises(ValueError, match=message):
        make_config("test", **overrides)
    assert make_config("test", dataset="imagenet", arch="resnet50", decode="gpu", device="auto").decode == "gpu"


def test_device_decoding_falls_back_to_the_cpu_path_with_a_warning_when_auto_finds_no_gpu():
    from advkit.config import make_config
    from advkit.device import resolve_decode

    cfg = make_config("test", dataset="imagenet", arch="resnet50", decode="gpu", device="auto")
    with pytest.warns(RuntimeWarning, match="decode='gpu' falls back to decode='cpu'"):
        assert resolve_decode(cfg, torch.device("cpu")) == "cpu"
    assert resolve_decode(cfg, torch.device("cuda", 0)) == "gpu"  # only names the device: nothing runs on it
    assert resolve_decode(make_config("test"), torch.device("cpu")) == "cpu"


def test_a_resumed_run_may_change_where_it_decodes():
    """decode is a hardware choice, like device and num_workers: a run started on a GPU server may resume on a
    machine whose GPU path is not available, and the other way round."""
    from advkit import config

    gpu = config.make_config("test", dataset="imagenet", arch="resnet50", decode="gpu")
    assert config.resume_conflicts(gpu.to_dict(), config.make_config(None, **gpu.to_dict() | {"decode": "cpu"})) == []


def test_an_epochs_worker_augmentations_do_not_depend_on_the_epochs_before_it(tmp_path):
    """ImageNet with worker processes: epoch 2 of a loader that ran epochs 0-1 gives the same random crops as a
    fresh loader (a resumed run) set to epoch 2. Before the loaders had their own generator, reseeded per epoch,
    workers were seeded from the global random state and kept alive across epochs, so the two differed."""
    from advkit import train

    _jpeg_folder(tmp_path, sizes=((96, 120), (130, 90)))
    make = lambda: data.make_loader("imagenet", "train", 4, root=tmp_path, num_workers=2, seed=3)
    ongoing = make()
    for epoch in range(3):
        train._set_epoch(ongoing, epoch, seed=3, rank=0)
        torch.rand(5)  # the trainer draws from the global random state in between
        batches = [images for images, _ in ongoing]
    resumed = make()
    train._set_epoch(resumed, 2, seed=3, rank=0)
    again = [images for images, _ in resumed]
    assert all(torch.equal(a, b) for a, b in zip(batches, again)) and len(again) == 2
    train._set_epoch(resumed, 1, seed=3, rank=0)
    assert not all(torch.equal(a, b) for a, b in zip(batches, [images for images, _ in resumed]))  # epochs differ


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_loader_workers_draw_their_own_crops(monkeypatch, workers):
    """CIFAR-10's crops: every image is the same ramp, so two batches are equal only where their crop and flip
    draws are. Before, the augmenter was reseeded without the rank (rank 1 repeated rank 0's draws) and loader
    workers forked one generator (consecutive batches repeated each other's)."""
    from advkit import train

    ramp = (torch.arange(32, dtype=torch.uint8) * 8).repeat(3, 32, 1)
    monkeypatch.setattr(data, "load_tensors", lambda *args, **kwargs: (ramp.repeat(64, 1, 1, 1),
                                                                        torch.zeros(64, dtype=torch.long)))

    def batches(rank):
        loader = data.make_loader("cifar10", "train", 8, world_size=2, rank=rank, num_workers=workers, seed=3)
        train._set_epoch(loader, 1, seed=3, rank=rank)
        return [images for images, _ in loader]

    rank0, rank1 = batches(0), batches(1)
    assert len(rank0) == 4 and not any(torch.equal(a, b) for a, b in zip(rank0, rank1))
    assert len({b.numpy().tobytes() for b in rank0}) == 4  # no batch repeats another's crops
    assert all(torch.equal(a, b) for a, b in zip(rank0, batches(0)))  # and a rank's epoch is reproducible


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 on purpose, on 2 cores
def test_an_epochs_crops_do_not_depend_on_the_number_of_loader_workers(monkeypatch, tmp_path):
    """num_workers may change on a resume (it is where-and-how, config.WHERE_AND_HOW): before, each worker drew
    from its own seeded generator (CIFAR-10) or global state (ImageNet), so 0, 1 or 3 workers gave other crops."""
    from advkit import train

    ramp = (torch.arange(32, dtype=torch.uint8) * 8).repeat(3, 32, 1)
    monkeypatch.setattr(data, "load_tensors", lambda *args, **kwargs: (ramp.repeat(64, 1, 1, 1),
                                                                        torch.zeros(64, dtype=torch.long)))
    _jpeg_folder(tmp_path, sizes=((96, 120), (130, 90)))

    def batches(name, workers):
        loader = data.make_loader(name, "train", 4, root=tmp_path, num_workers=workers, seed=3)
        train._set_epoch(loader, 1, seed=3, rank=0)
        return [images.numpy().tobytes() for images, _ in loader]

    for name in ("cifar10", "imagenet"):
        alone = batches(name, 0)
        assert len(set(alone)) == len(alone) > 1  # crops vary from batch to batch
        assert batches(name, 1) == alone and batches(name, 3) == alone, name


def _prepare(root, system, barrier):
    barrier.wait()
    data.prepare_fashion_mnist(root, system_dir=system, download=False)


def test_concurrent_preparers_of_a_fresh_root_both_succeed_with_complete_files(tmp_path):
    """Every process wrote the same '<name>.partial' and renamed it: the second one died (FileNotFoundError) or
    a reader saw a file another process was still writing."""
    import multiprocessing

    system = tmp_path / "system"
    _write_fake_fashion_mnist(system, n=3000)
    expected = {name: gzip.decompress((system / f"{name}.gz").read_bytes()) for name in data.FASHION_MNIST_FILES}
    ctx = multiprocessing.get_context("fork")
    for attempt in range(4):
        root = tmp_path / f"root{attempt}"
        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=_prepare, args=(root, system, barrier)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0], f"attempt {attempt}"
        raw = root / "FashionMNIST" / "raw"
        assert sorted(p.name for p in raw.iterdir()) == sorted(data.FASHION_MNIST_FILES)  # no temporary left
        assert {name: (raw / name).read_bytes() for name in data.FASHION_MNIST_FILES} == expected
        assert all((raw / name).stat().st_mode & 0o444 == 0o444 for name in data.FASHION_MNIST_FILES)


def test_a_subset_larger_than_the_split_names_the_runs_parameters():
    with pytest.raises(ValueError, match=r"n=20000 is not accepted for the test split of Fashion-MNIST \(10000 "
                                         r"images; a run's n_test, sanity_n or eval_autoattack_n\)"):
        data.make_loader("fashion-mnist", "test", 8, n=20000)
    with pytest.raises(ValueError, match=r"n=70000 is not accepted for the training split .*n_train"):
        data.make_loader("fashion-mnist", "train", 8, n=70000)
