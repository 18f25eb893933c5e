"""Dataset loaders: CIFAR pickles, IDX files, list files, image folders, native LT registry."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from longtail.core.errors import LongtailError
from longtail.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    available_datasets,
    load_cifar,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_list_dataset,
    read_idx,
    read_list_file,
)
from longtail.data.loader import BatchLoader
from longtail.data.prepare import prepare_data
from longtail.data.user import save_user_split


# ------------------------------------------------------------------ helpers
def _dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_rows(rng: np.random.RandomState, n: int) -> np.ndarray:
    return rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)


def make_cifar10(root: Path, per_batch: int = 4, n_test: int = 5) -> dict:
    """The genuine ``cifar-10-batches-py`` layout with tiny batches; returns what was written."""
    rng = np.random.RandomState(0)
    base = root / "cifar-10-batches-py"
    names = [f"class{c}" for c in range(10)]
    _dump(
        {
            b"num_cases_per_batch": per_batch,
            b"label_names": [n.encode() for n in names],
            b"num_vis": 3072,
        },
        base / "batches.meta",
    )
    train_data, train_labels = [], []
    for i in range(1, 6):
        data = _cifar_rows(rng, per_batch)
        labels = [int(v) for v in rng.randint(0, 10, per_batch)]
        _dump(
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": labels,
                b"data": data,
                b"filenames": [b"x.png"] * per_batch,
            },
            base / f"data_batch_{i}",
        )
        train_data.append(data)
        train_labels += labels
    test_data = _cifar_rows(rng, n_test)
    test_labels = [int(v) for v in rng.randint(0, 10, n_test)]
    _dump(
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": test_labels,
            b"data": test_data,
            b"filenames": [b"y.png"] * n_test,
        },
        base / "test_batch",
    )
    return {
        "train": (np.concatenate(train_data), train_labels),
        "test": (test_data, test_labels),
        "names": names,
    }


def make_cifar100(root: Path, n_train: int = 7, n_test: int = 3) -> dict:
    rng = np.random.RandomState(1)
    base = root / "cifar-100-python"
    names = [f"fine{c:02d}" for c in range(100)]
    _dump(
        {
            b"fine_label_names": [n.encode() for n in names],
            b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)],
        },
        base / "meta",
    )
    out = {"names": names}
    for split, n in (("train", n_train), ("test", n_test)):
        data = _cifar_rows(rng, n)
        fine = [int(v) for v in rng.randint(0, 100, n)]
        fine[0] = 99
        _dump(
            {
                b"filenames": [b"z.png"] * n,
                b"batch_label": split.encode(),
                b"fine_labels": fine,
                b"coarse_labels": [f // 5 for f in fine],
                b"data": data,
            },
            base / split,
        )
        out[split] = (data, fine)
    return out


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def save_png(path: Path, mode: str, size: tuple[int, int], color) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


# ------------------------------------------------------------------ CIFAR
def test_cifar10_train_and_test(tmp_path):
    written = make_cifar10(tmp_path)
    ds = load_cifar(tmp_path, "train", 10)
    data, labels = written["train"]
    assert ds.images.shape == (20, 3, 32, 32)
    assert ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == labels
    assert ds.classes == written["names"]
    assert ds.num_classes == 10 and ds.in_memory and ds.channels == 3
    # row layout: 1024 red bytes, then 1024 green, then 1024 blue, each row-major 32 x 32
    img = ds.images.numpy()
    assert np.array_equal(img[:, 0], data[:, :1024].reshape(-1, 32, 32))
    assert np.array_equal(img[:, 1], data[:, 1024:2048].reshape(-1, 32, 32))
    assert np.array_equal(img[:, 2], data[:, 2048:].reshape(-1, 32, 32))
    assert img[3, 0, 0, 1] == data[3, 1]
    assert img[3, 0, 1, 0] == data[3, 32]
    assert img[3, 2, 31, 31] == data[3, 3071]
    # normalisation statistics come from the pixels
    mean = data.reshape(-1, 3, 1024).transpose(1, 0, 2).reshape(3, -1).mean(axis=1) / 255
    assert np.allclose(ds.mean, mean)

    test = load_dataset("cifar10", "test", root=str(tmp_path))
    t_data, t_labels = written["test"]
    assert test.images.shape == (5, 3, 32, 32)
    assert test.labels.tolist() == t_labels
    assert np.array_equal(test.images.numpy().reshape(5, -1), t_data)
    assert load_dataset("cifar10", "val", root=str(tmp_path)) is None


def test_cifar_red_channel_first(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    _dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, base / "batches.meta")
    row = np.zeros((1, 3072), dtype=np.uint8)
    row[0, :1024] = 255  # pure red in the original encoding
    row[0, 2048 + 5] = 7  # blue pixel (0, 5)
    _dump({b"data": row, b"labels": [4]}, base / "test_batch")
    ds = load_cifar(tmp_path, "test", 10)
    assert (ds.images[0, 0] == 255).all()
    assert (ds.images[0, 1] == 0).all()
    assert ds.images[0, 2, 0, 5] == 7 and int(ds.images[0, 2].sum()) == 7
    assert ds.labels.tolist() == [4]


def test_cifar_pickle_with_python2_numpy_module_names(tmp_path):
    """The official files name numpy.core.multiarray (NumPy 1 / Python 2 cPickle)."""
    base = tmp_path / "cifar-10-batches-py"
    _dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, base / "batches.meta")
    row = np.arange(3072, dtype=np.int64).astype(np.uint8)[None]
    data = pickle.dumps({b"data": row, b"labels": [4]}, protocol=2)
    py2 = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert py2 != data
    (base / "test_batch").write_bytes(py2)
    ds = load_cifar(tmp_path, "test", 10)
    assert np.array_equal(ds.images.numpy().reshape(1, -1), row)


def test_cifar100(tmp_path):
    written = make_cifar100(tmp_path)
    train = load_dataset("cifar100", "train", root=str(tmp_path))
    data, fine = written["train"]
    assert train.images.shape == (7, 3, 32, 32)
    assert train.labels.tolist() == fine
    assert train.classes == written["names"] and train.num_classes == 100
    assert np.array_equal(train.images.numpy().reshape(7, -1), data)
    assert train.counts().shape == (100,) and train.counts()[99] >= 1
    test = load_cifar(tmp_path, "test", 100)
    assert test.labels.tolist() == written["test"][1]
    assert test.name == "cifar100"


def test_cifar_missing_root_names_path(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(LongtailError, match="no-such-dir") as exc:
        load_dataset("cifar10", "train", root=str(missing))
    assert "data_batch_1" in str(exc.value)
    with pytest.raises(LongtailError, match="--root"):
        load_dataset("cifar100", "train")


def test_cifar_incomplete_folder(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(LongtailError, match="not found or incomplete"):
        load_cifar(tmp_path, "train", 10)
    # the test split does not need the training batches
    assert len(load_cifar(tmp_path, "test", 10)) == 5


def test_cifar_bad_files(tmp_path):
    make_cifar10(tmp_path)
    base = tmp_path / "cifar-10-batches-py"
    (base / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(LongtailError, match="test_batch.*not a readable CIFAR pickle"):
        load_cifar(tmp_path, "test", 10)
    _dump({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, base / "test_batch")
    with pytest.raises(LongtailError, match=r"N x 3072.*\(2, 3000\)"):
        load_cifar(tmp_path, "test", 10)
    _dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, base / "test_batch")
    with pytest.raises(LongtailError, match="matching the labels"):
        load_cifar(tmp_path, "test", 10)
    _dump({b"label_names": [b"a", b"b"]}, base / "batches.meta")
    with pytest.raises(LongtailError, match="expected 10 class names.*found 2"):
        load_cifar(tmp_path, "test", 10)


# ------------------------------------------------------------------ IDX / Fashion-MNIST
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.random.RandomState(0).randint(0, 256, (5, 28, 28)).astype(np.uint8)
    p = write_idx(tmp_path / "imgs-idx3-ubyte", arr, gz)
    got = read_idx(p)
    assert got.shape == (5, 28, 28) and got.dtype == np.uint8
    assert np.array_equal(got, arr)
    lab = write_idx(tmp_path / "labels-idx1-ubyte", np.array([3, 1, 4, 1, 5]), gz)
    assert read_idx(lab).tolist() == [3, 1, 4, 1, 5]


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated_body(tmp_path, gz):
    data = idx_bytes(np.ones((4, 28, 28), np.uint8))[:-100]
    p = tmp_path / ("t.gz" if gz else "t")
    p.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(LongtailError, match=r"\[4, 28, 28\] \(3136 bytes\).*3036 bytes"):
        read_idx(p)


def test_read_idx_truncated_gzip_stream(tmp_path):
    blob = gzip.compress(idx_bytes(np.random.RandomState(1).randint(0, 256, (50, 28, 28))))
    p = tmp_path / "cut.gz"
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(LongtailError, match="cannot read IDX file"):
        read_idx(p)


def test_read_idx_truncated_header(tmp_path):
    p = tmp_path / "short"
    p.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2]))
    with pytest.raises(LongtailError, match="truncated IDX header"):
        read_idx(p)


@pytest.mark.parametrize(
    "magic", [b"\x00\x00\x0d\x01", b"\x1f\x8b\x08\x00", b"PK\x03\x04", b"\x00"]
)
def test_read_idx_bad_magic(tmp_path, magic):
    p = tmp_path / "bad"
    p.write_bytes(magic + bytes(12))
    with pytest.raises(LongtailError, match="bad magic"):
        read_idx(p)


def _fashion_root(tmp_path: Path, n_train=6, n_test=4, gz_train=False, gz_test=True):
    rng = np.random.RandomState(2)
    out = {}
    for prefix, n, gz in (("train", n_train, gz_train), ("t10k", n_test, gz_test)):
        imgs = rng.randint(0, 256, (n, 28, 28)).astype(np.uint8)
        labs = (np.arange(n) * 3 % 10).astype(np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", imgs, gz)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labs, gz)
        out[prefix] = (imgs, labs)
    return out


def test_load_fashion_mnist_raw_and_gz(tmp_path):
    written = _fashion_root(tmp_path)
    train = load_fashion_mnist(tmp_path, "train")  # raw files
    test = load_dataset("fashion-mnist", "test", root=str(tmp_path))  # gzipped files
    for ds, (imgs, labs) in ((train, written["train"]), (test, written["t10k"])):
        assert ds.images.shape == (len(labs), 1, 28, 28)
        assert ds.images.dtype == torch.uint8
        assert np.array_equal(ds.images[:, 0].numpy(), imgs)
        assert ds.labels.tolist() == labs.tolist()
        assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
        assert len(ds.mean) == 1 and len(ds.std) == 1
    assert load_dataset("fashion-mnist", "val", root=str(tmp_path)) is None


def test_load_fashion_mnist_errors(tmp_path):
    with pytest.raises(LongtailError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path, "train")
    _fashion_root(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 10]), False)
    with pytest.raises(LongtailError, match="label 10 out of range"):
        load_fashion_mnist(tmp_path, "train")
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2]), False)
    with pytest.raises(LongtailError, match="do not match"):
        load_fashion_mnist(tmp_path, "train")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x00\x00\x08")
    with pytest.raises(LongtailError, match="t10k-images-idx3-ubyte.gz"):
        load_fashion_mnist(tmp_path, "test")


# ------------------------------------------------------------------ list files
def test_list_file_whitespace(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n\ntrain/a b/x.jpg 3\ntrain/y.JPEG   0\n  train/z.png\t2  \n")
    paths, labels = read_list_file(lst, tmp_path / "root", num_classes=4)
    root = tmp_path / "root"
    assert paths == [
        str(root / "train/a b/x.jpg"),
        str(root / "train/y.JPEG"),
        str(root / "train/z.png"),
    ]
    assert labels == [3, 0, 2]


def test_list_file_csv_with_header(tmp_path):
    lst = tmp_path / "list.csv"
    lst.write_text("path,label\nimgs/a.png,1\nimgs/b.png, 0\n")
    paths, labels = read_list_file(lst, tmp_path)
    assert paths == [str(tmp_path / "imgs/a.png"), str(tmp_path / "imgs/b.png")]
    assert labels == [1, 0]
    ds = load_list_dataset(lst, tmp_path, name="mine")
    assert ds.classes == ["0", "1"] and ds.paths == paths and not ds.in_memory
    assert ds.counts().tolist() == [1, 1]


def test_list_file_label_out_of_range_names_line(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("a.jpg 0\nb.jpg 1\n\nc.jpg 5\n")
    with pytest.raises(LongtailError, match=r"l\.txt:4: label 5 out of range \[0, 4\]"):
        read_list_file(lst, tmp_path, num_classes=5)
    lst.write_text("x,label\na.jpg,0\nb.jpg,-2\n")
    with pytest.raises(LongtailError, match=r":3: label -2 out of range"):
        read_list_file(lst, tmp_path)


def test_list_file_non_integer_label(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("a.jpg 0\nb.jpg cat\n")
    with pytest.raises(LongtailError, match=r"l\.txt:2: label 'cat' is not an integer"):
        read_list_file(lst, tmp_path)
    lst.write_text("a.jpg 0\nb.jpg 1.0\n")
    with pytest.raises(LongtailError, match=r":2: label '1.0'"):
        read_list_file(lst, tmp_path)
    lst.write_text("a.jpg 0\nlonelyfield\n")
    with pytest.raises(LongtailError, match=r":2: expected 'relative/path label'"):
        read_list_file(lst, tmp_path)


def test_list_file_missing_or_empty(tmp_path):
    with pytest.raises(LongtailError, match="nope.txt.*not found"):
        read_list_file(tmp_path / "nope.txt", tmp_path)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(LongtailError, match="holds no"):
        read_list_file(tmp_path / "empty.txt", tmp_path)


# ------------------------------------------------------------------ native LT registry
def test_imagenet_lt_lists(tmp_path):
    (tmp_path / "ImageNet_LT_train.txt").write_text(
        "train/n01440764/n01440764_1.JPEG 0\ntrain/n01443537/n01443537_2.JPEG 1\n"
        "train/n15075141/n15075141_3.JPEG 999\ntrain/n01440764/n01440764_4.JPEG 0\n"
    )
    (tmp_path / "ImageNet_LT_test.txt").write_text("val/n01440764/ILSVRC2012_val_1.JPEG 0\n")
    train = load_dataset("imagenet_LT", "train", root=str(tmp_path))
    assert train.name == "imagenet-lt"
    assert train.num_classes == 1000 and len(train) == 4
    assert train.labels.tolist() == [0, 1, 999, 0]
    assert train.paths[2] == str(tmp_path / "train/n15075141/n15075141_3.JPEG")
    assert train.counts()[[0, 1, 999]].tolist() == [2, 1, 1] and train.counts().sum() == 4
    test = load_dataset("imagenet-lt", "test", root=str(tmp_path))
    assert test.paths == [str(tmp_path / "val/n01440764/ILSVRC2012_val_1.JPEG")]
    assert load_dataset("imagenet-lt", "val", root=str(tmp_path)) is None


def test_native_lt_label_out_of_range_and_list_dir(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "Places_LT_train.txt").write_text("a.jpg 0\nb.jpg 364\nc.jpg 365\n")
    with pytest.raises(LongtailError, match=r"Places_LT_train\.txt:3: label 365 out of range"):
        load_dataset("places-lt", "train", root=str(tmp_path), list_dir=str(lists))
    with pytest.raises(LongtailError, match="Places_LT_train.txt") as exc:
        load_dataset("places-lt", "train", root=str(tmp_path))  # lists not in root
    assert str(tmp_path) in str(exc.value) and "--list-dir" in str(exc.value)


def test_native_lt_missing_root(tmp_path):
    missing = tmp_path / "imagenet"
    with pytest.raises(LongtailError, match=str(missing)):
        load_dataset("imagenet-lt", "train", root=str(missing))
    with pytest.raises(LongtailError, match="needs --root"):
        load_dataset("imagenet-lt", "train")


def _inat_json(path: Path, files: list[str], cats: list[int], num_categories: int) -> None:
    d = {
        "info": {"year": 2018},
        "images": [
            {"id": 100 + i, "file_name": f, "width": 8, "height": 8} for i, f in enumerate(files)
        ],
        "annotations": [
            {"id": i, "image_id": 100 + i, "category_id": c} for i, c in enumerate(cats)
        ],
        "categories": [{"id": i, "name": f"species{i}"} for i in range(num_categories)],
    }
    path.write_text(json.dumps(d))


def test_inat2018_json(tmp_path):
    files = ["train_val2018/Plantae/7/a.jpg", "train_val2018/Aves/2/b.jpg", "x/c.jpg"]
    _inat_json(tmp_path / "train2018.json", files, [7, 2, 7], 8)
    _inat_json(tmp_path / "val2018.json", ["v/d.jpg", "v/e.jpg"], [0, 5], 8)
    train = load_dataset("inat2018", "train", root=str(tmp_path))
    assert train.num_classes == 8 and train.name == "inat2018"
    assert train.labels.tolist() == [7, 2, 7]
    assert train.paths == [str(tmp_path / f) for f in files]
    assert train.counts().tolist() == [0, 0, 1, 0, 0, 0, 0, 2]
    # the community evaluates iNaturalist on its val split: it is the test set, and so never
    # the validation split too (prepare_data carves that from training)
    test = load_dataset("inat2018", "test", root=str(tmp_path))
    assert test.labels.tolist() == [0, 5]
    assert test.paths == [str(tmp_path / "v/d.jpg"), str(tmp_path / "v/e.jpg")]
    assert load_dataset("inat2018", "val", root=str(tmp_path)) is None


def test_inat2018_test_without_val_is_an_error(tmp_path):
    _inat_json(tmp_path / "train2018.json", ["a.jpg"], [0], 3)
    assert load_dataset("inat2018", "val", root=str(tmp_path)) is None
    with pytest.raises(LongtailError, match="iNaturalist18_test.txt"):
        load_dataset("inat2018", "test", root=str(tmp_path))


def test_inat2018_bad_json(tmp_path):
    (tmp_path / "train2018.json").write_text(json.dumps({"images": [], "annotation": []}))
    with pytest.raises(LongtailError, match="not an iNaturalist-2018 JSON.*KeyError"):
        load_dataset("inat2018", "train", root=str(tmp_path))
    (tmp_path / "train2018.json").write_text("{broken")
    with pytest.raises(LongtailError, match="not an iNaturalist-2018 JSON"):
        load_dataset("inat2018", "train", root=str(tmp_path))


# ------------------------------------------------------------------ registry
def test_unknown_dataset_lists_known_names():
    with pytest.raises(LongtailError, match="'mnist-lt'") as exc:
        load_dataset("mnist-lt")
    msg = str(exc.value)
    known = available_datasets()
    assert {
        "cifar10",
        "cifar100",
        "digits",
        "fashion-mnist",
        "folder",
        "imagenet-lt",
        "inat2018",
        "places-lt",
    } <= set(known)
    for name in known:
        assert name in msg


def test_unknown_split():
    with pytest.raises(LongtailError, match="'validation'"):
        load_dataset("digits", "validation")


def test_digits():
    test = load_dataset("digits", "test")
    train = load_dataset("digits", "train")
    assert test.images.dtype == torch.uint8 and train.images.dtype == torch.uint8
    assert test.images.shape == (300, 1, 8, 8)
    assert test.counts().tolist() == [30] * 10
    assert len(train) == 1797 - 300
    assert train.counts().sum() == 1497 and (train.counts() > 100).all()
    allowed = {round(k * 255 / 16) for k in range(17)}
    assert set(torch.unique(torch.cat([train.images, test.images])).tolist()) <= allowed
    assert int(test.images.max()) == 255
    # normalisation statistics are the training pool's, shared by the test split
    assert test.mean == train.mean
    assert abs(train.mean[0] - train.images.double().mean().item() / 255) < 1e-9
    assert load_dataset("digits", "val") is None


# ------------------------------------------------------------------ ImageDataset
def test_subset_and_counts_in_memory():
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 2).clone()
    ds = ImageDataset(
        labels=[0, 1, 1, 3, 3, 3],
        classes=["a", "b", "c", "d"],
        images=images,
        name="toy",
        mean=(0.5,),
        std=(0.25,),
    )
    assert ds.counts().tolist() == [1, 2, 0, 3]
    assert ds.counts().dtype == np.int64
    sub = ds.subset([5, 0, 3])
    assert sub.labels.tolist() == [3, 0, 3]
    assert sub.images[:, 0, 0, 0].tolist() == [5, 0, 3]
    assert sub.classes == ds.classes and sub.mean == (0.5,) and sub.name == "toy"
    assert sub.counts().tolist() == [1, 0, 0, 2]
    sub2 = ds.subset(torch.tensor([2, 2]))
    assert sub2.labels.tolist() == [1, 1] and sub2.images[:, 0, 0, 0].tolist() == [2, 2]
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0
    assert len(ds) == 6  # the original is untouched


def test_subset_file_backed():
    ds = ImageDataset(labels=[1, 0, 1], classes=["x", "y"], paths=["/p0", "/p1", "/p2"])
    sub = ds.subset(np.array([2, 1]))
    assert sub.paths == ["/p2", "/p1"] and sub.labels.tolist() == [1, 0]
    assert sub.images is None and not sub.in_memory
    assert ds.channels == 3  # from the (ImageNet) statistics of a file-backed set
    assert sub.counts().tolist() == [1, 1]


def test_image_dataset_validation():
    with pytest.raises(ValueError, match="exactly one"):
        ImageDataset(labels=[0], classes=["a"], images=torch.zeros(1, 1, 2, 2), paths=["/x"])
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        ImageDataset(labels=[0, 0, 0], classes=["a"], paths=["/x", "/y"])
    with pytest.raises(LongtailError, match=r"\[0, 1\], found 0\.\.2"):
        ImageDataset(labels=[0, 2], classes=["a", "b"], paths=["/x", "/y"])


# ------------------------------------------------------------------ image folders
# (mode, size, fill) per file; the loader converts everything to RGB over a white background
FOLDER = {
    "cat": [("RGB", (40, 48), (10, 20, 30)), ("L", (33, 33), 100)],
    "dog": [("RGBA", (36, 36), (200, 0, 0, 255)), ("RGBA", (32, 50), (0, 0, 0, 0))],
    "emu": [("P", (34, 34), 0)],
}
EXPECTED_RGB = [(10, 20, 30), (100, 100, 100), (200, 0, 0), (255, 255, 255), (0, 0, 0)]


def make_folder(root: Path) -> Path:
    for cname, specs in FOLDER.items():
        for i, (mode, size, fill) in enumerate(specs):
            save_png(root / cname / f"img{i}.png", mode, size, fill)
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder(tmp_path):
    root = make_folder(tmp_path / "data")
    ds = load_image_folder(root)
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2]
    assert ds.paths[0] == str(root / "cat" / "img0.png")
    assert all(p.endswith(".png") for p in ds.paths)
    assert ds.counts().tolist() == [2, 2, 1]


def test_image_folder_empty_class(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "zebra").mkdir()
    (root / "zebra" / "readme.md").write_text("no pictures yet")
    with pytest.raises(LongtailError, match="no images: zebra"):
        load_image_folder(root)


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(LongtailError, match="nowhere"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    save_png(tmp_path / "flat" / "a.png", "RGB", (4, 4), (0, 0, 0))
    with pytest.raises(LongtailError, match="one sub-folder per class"):
        load_image_folder(tmp_path / "flat")


def test_folder_registry(tmp_path):
    make_folder(tmp_path / "train")
    ds = load_dataset("folder", "train", root=str(tmp_path))
    assert ds.classes == ["cat", "dog", "emu"] and len(ds) == 5
    assert load_dataset("folder", "val", root=str(tmp_path)) is None
    # a missing test folder is an error, not a silent None
    with pytest.raises(LongtailError, match=str(tmp_path / "test")):
        load_dataset("folder", "test", root=str(tmp_path))
    make_folder(tmp_path / "test")
    assert len(load_dataset("folder", "test", root=str(tmp_path))) == 5
    with pytest.raises(LongtailError, match=str(tmp_path / "missing" / "train")):
        load_dataset("folder", "train", root=str(tmp_path / "missing"))


# ------------------------------------------------------------------ streaming batches
def _expected_normalised(rgb) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - mean) / std


def test_batch_loader_file_backed_eval(tmp_path):
    ds = load_image_folder(make_folder(tmp_path / "data"))
    loader = BatchLoader(ds, batch_size=3, train=False, image_size=32, num_workers=0)
    batches = list(loader.batches())
    assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 32, 32), (2, 3, 32, 32)]
    assert loader.num_batches(len(ds)) == 2
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [0, 0, 1, 1, 2]
    # solid-colour images: every pixel is the normalised colour (grayscale -> gray RGB,
    # transparent RGBA -> white, opaque RGBA -> its colour, palette -> RGB)
    tol = 1.01 / 255 / min(IMAGENET_STD)
    for i, rgb in enumerate(EXPECTED_RGB):
        expected = _expected_normalised(rgb).view(3, 1, 1).expand(3, 32, 32)
        assert torch.allclose(x[i], expected, atol=tol), (i, x[i].mean(dim=(1, 2)))


def test_batch_loader_file_backed_train(tmp_path):
    ds = load_image_folder(make_folder(tmp_path / "data"))
    loader = BatchLoader(
        ds, batch_size=2, train=True, image_size=32, num_workers=0, channels_last=True
    )
    order = np.array([4, 1, 3, 0])
    out = list(loader.batches(order, drop_last=True))
    assert len(out) == 2
    for x, _ in out:
        assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(x).all()
    assert torch.cat([y for _, y in out]).tolist() == [2, 0, 1, 0]
    # random crops of solid images keep the colour: the grayscale image stays gray 100
    gray = out[0][0][1]
    assert torch.allclose(
        gray,
        _expected_normalised((100, 100, 100)).view(3, 1, 1).expand_as(gray),
        atol=1.01 / 255 / min(IMAGENET_STD),
    )


def test_batch_loader_unreadable_image(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "emu" / "img0.png").write_bytes(b"\x89PNG broken")
    ds = load_image_folder(root)
    loader = BatchLoader(ds, batch_size=5, image_size=32, num_workers=0)
    with pytest.raises(LongtailError, match="cannot read image.*emu"):
        list(loader.batches())


# ------------------------------------------------------------------ no split leaks into test
def _list_rows(prefix: str, n: int, classes: int) -> str:
    return "".join(
        f"{prefix}/{c}/{prefix}_{c}_{i}.jpg {c}\n" for c in range(classes) for i in range(n)
    )


def _genuine_root(name: str, root: Path) -> None:
    """Small files in ``name``'s genuine on-disk format: 10 classes x 8 training images."""
    rng = np.random.RandomState(3)
    if name == "fashion-mnist":
        for prefix, n in (("train", 80), ("t10k", 30)):
            write_idx(root / f"{prefix}-images-idx3-ubyte", rng.randint(0, 256, (n, 28, 28)), True)
            write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, True)
    elif name == "cifar10":
        make_cifar10(root, per_batch=16, n_test=20)
    elif name == "cifar100":
        make_cifar100(root, n_train=1500, n_test=50)
    elif name in ("imagenet-lt", "places-lt"):
        stem = {"imagenet-lt": "ImageNet_LT", "places-lt": "Places_LT"}[name]
        (root / f"{stem}_train.txt").write_text(_list_rows("train", 8, 10))
        (root / f"{stem}_val.txt").write_text(_list_rows("val", 2, 10))
        (root / f"{stem}_test.txt").write_text(_list_rows("test", 3, 10))
    elif name == "inat2018":  # the genuine release: train and val lists, no test list
        (root / "iNaturalist18_train.txt").write_text(_list_rows("train_val2018", 8, 10))
        (root / "iNaturalist18_val.txt").write_text(_list_rows("val2018", 3, 10))
    elif name == "user":  # what `longtail fit` materialises: ROOT/{train,val,test}.pt
        for split, n in (("train", 80), ("val", 10), ("test", 30)):
            images = torch.from_numpy(rng.randint(0, 256, (n, 1, 8, 8)).astype(np.uint8))
            ds = ImageDataset(
                labels=np.arange(n) % 10,
                classes=[str(c) for c in range(10)],
                images=images,
                name="user",
            )
            save_user_split(ds, root, split)
    elif name == "folder":
        for split, n in (("train", 8), ("test", 3)):
            for c in range(3):
                for i in range(n):
                    save_png(root / split / f"c{c}" / f"{i}.png", "L", (4, 4), 10 * c + i)


def _keys(ds) -> set:
    """One key per image: its path, or the hash of its pixels for an in-memory dataset."""
    if ds.paths is not None:
        return set(ds.paths)
    return {hash(row.numpy().tobytes()) for row in ds.images}


@pytest.mark.parametrize("name", available_datasets())
def test_every_dataset_keeps_validation_and_training_out_of_the_test_set(tmp_path, name):
    """Guards the iNaturalist-2018 leak: its val list was both the test and the validation split,
    so tau, alpha and every temperature were chosen on the test images."""
    _genuine_root(name, tmp_path)
    root = None if name == "digits" else str(tmp_path)
    imbalance = None if name in ("imagenet-lt", "places-lt", "inat2018", "folder", "user") else 2.0
    s = prepare_data(name, root=root, imbalance=imbalance, val_per_class=1)
    assert s.val is not None and len(s.val) > 0, "every dataset gets a validation split"
    test = _keys(s.test)
    assert len(test) == len(s.test)  # the keys identify images one to one
    assert not _keys(s.train) & test
    assert not _keys(s.val) & test
    assert not _keys(s.train) & _keys(s.val)


def test_inat2018_validation_is_carved_from_training(tmp_path):
    _genuine_root("inat2018", tmp_path)
    assert load_dataset("inat2018", "val", root=str(tmp_path)) is None
    s = prepare_data("inat2018", root=str(tmp_path), imbalance=None, val_per_class=1)
    assert all("/train_val2018/" in p for p in s.val.paths)
    assert all("/val2018/" in p and "train_val" not in p for p in s.test.paths)
    assert s.val.counts().tolist() == [1] * 10


def test_a_test_list_that_repeats_training_images_is_refused(tmp_path):
    (tmp_path / "ImageNet_LT_train.txt").write_text(_list_rows("train", 8, 10))
    (tmp_path / "ImageNet_LT_test.txt").write_text("train/4/train_4_2.jpg 4\n")
    with pytest.raises(LongtailError, match=r"1 test image\(s\) are also in the training split"):
        prepare_data("imagenet-lt", root=str(tmp_path), imbalance=None, val_per_class=1)
