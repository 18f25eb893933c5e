"""Datasets behind one interface: images, integer labels, class names, per-class counts.

Small datasets (digits, Fashion-MNIST, CIFAR) live in memory as ``uint8`` tensors of shape
``(N, C, H, W)`` so whole batches can be indexed and augmented on the training device. Large
datasets (ImageNet-LT, Places-LT, iNaturalist-2018, a user's folders) keep file paths and are
decoded lazily with PIL by :mod:`longtail.data.streaming`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import pickletools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from longtail.core.errors import LongtailError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass
class ImageDataset:
    """A labelled image set, in memory (``images``) or on disk (``paths``).

    Attributes:
        labels: ``(N,)`` int64 class indices in ``[0, num_classes)``.
        classes: class names, index = label.
        images: ``(N, C, H, W)`` uint8 pixels, or ``None`` for a file-backed dataset.
        paths: ``N`` absolute image paths, or ``None`` for an in-memory dataset.
        name: dataset name, for reports.
        mean, std: per-channel normalisation statistics in ``[0, 1]`` pixel units.
    """

    labels: torch.Tensor
    classes: list[str]
    images: torch.Tensor | None = None
    paths: list[str] | None = None
    name: str = "dataset"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if (self.images is None) == (self.paths is None):
            raise ValueError("ImageDataset needs exactly one of `images` or `paths`")
        n = self.images.shape[0] if self.images is not None else len(self.paths)
        if n != len(self.labels):
            raise ValueError(f"{n} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise LongtailError(
                f"{self.name}: labels must lie in [0, {len(self.classes) - 1}], "
                f"found {int(self.labels.min())}..{int(self.labels.max())}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def channels(self) -> int:
        return int(self.images.shape[1]) if self.images is not None else len(self.mean)

    def counts(self) -> np.ndarray:
        """Images per class, shape ``(num_classes,)``, int64."""
        return np.bincount(self.labels.numpy(), minlength=self.num_classes).astype(np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """The examples at ``indices`` (any order), sharing class names and statistics."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        images = self.images[idx] if self.images is not None else None
        paths = [self.paths[i] for i in idx.tolist()] if self.paths is not None else None
        return replace(self, labels=self.labels[idx], images=images, paths=paths)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``(N, C, H, W)`` uint8 images, in ``[0, 1]`` units."""
    x = images.double().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def _in_memory(name: str, images: torch.Tensor, labels, classes, stats_from=None) -> ImageDataset:
    mean, std = channel_stats(images if stats_from is None else stats_from)
    return ImageDataset(
        labels=labels, classes=list(classes), images=images, name=name, mean=mean, std=std
    )


def _missing(root: Path, layout: str, hint: str = "") -> LongtailError:
    return LongtailError(
        f"dataset root {str(root)!r} not found or incomplete: expected {layout}"
        + (f". {hint}" if hint else "")
    )


# ---------------------------------------------------------------- CIFAR (python pickles)
_CIFAR = {
    10: (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        b"label_names",
        b"labels",
    ),
    100: ("cifar-100-python", ["train"], ["test"], "meta", b"fine_label_names", b"fine_labels"),
}


_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _check_memo_indices(data: bytes) -> None:
    """Refuse memo indices larger than the file: pickle sizes its memo table to the largest index
    a PUT names, so six random bytes can make it allocate and zero ~12 GB for a minute. Genuine
    pickles number their memo entries 0, 1, 2, ..., far below the byte count."""
    for op, arg, pos in pickletools.genops(data):
        if op.name in _MEMO_OPS and arg > len(data):
            raise ValueError(f"memo index {arg} at byte {pos} exceeds the file's {len(data)} bytes")


# What the CIFAR python pickles (Python 2 cPickle, protocol 2) and pickles written like them by
# Python 3 refer to: numpy arrays, and bytes spelled as _codecs.encode under protocol 2.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Loads numpy arrays and plain containers only: a dataset file cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: CIFAR pickles hold only numpy arrays, lists, "
                "dicts and bytes"
            )
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        data = path.read_bytes()
        _check_memo_indices(data)
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise LongtailError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise LongtailError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def load_cifar(
    root: str | os.PathLike, split: str, num_classes: int = 10, download: bool = False
) -> ImageDataset:
    """CIFAR-10/100 from the standard python-pickle folder under ``root``.

    Returns ``(N, 3, 32, 32)`` uint8 images; ``download=True`` fetches with torchvision first.
    """
    folder, train_files, test_files, meta_file, names_key, labels_key = _CIFAR[num_classes]
    root = Path(root).expanduser()
    base = root / folder
    if download and not base.is_dir():
        import torchvision

        cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
        cls(str(root), train=True, download=True)
    files = train_files if split == "train" else test_files
    layout = f"{base}/{{{', '.join(train_files + test_files + [meta_file])}}}"
    if not all((base / f).is_file() for f in files + [meta_file]):
        raise _missing(root, layout, "Pass --root DIR, or download=True when online")
    meta = _read_pickle(base / meta_file)
    classes = [
        c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
        for c in meta.get(names_key, [])
    ]
    if len(classes) != num_classes:
        raise LongtailError(
            f"{base / meta_file}: expected {num_classes} class names under "
            f"{names_key!r}, found {len(classes)}"
        )
    data, labels = [], []
    for f in files:
        batch = _read_pickle(base / f)
        if b"data" not in batch or labels_key not in batch:
            raise LongtailError(f"{base / f}: missing b'data' or {labels_key!r}")
        try:
            arr = np.asarray(batch[b"data"])
            ys = [int(v) for v in batch[labels_key]]
        except (TypeError, ValueError, OverflowError) as e:
            raise LongtailError(f"{base / f}: b'data' / labels are not numeric arrays ({e})") from e
        if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != 3072 or len(arr) != len(ys):
            raise LongtailError(
                f"{base / f}: b'data' must be N x 3072 uint8 matching the labels ({len(ys)}), "
                f"got {arr.dtype} of shape {arr.shape}"
            )
        data.append(arr.reshape(-1, 3, 32, 32))
        labels.extend(ys)
    images = torch.from_numpy(np.concatenate(data))
    return _in_memory(f"cifar{num_classes}", images, labels, classes)


# ---------------------------------------------------------------- Fashion-MNIST (IDX)
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes into an array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise LongtailError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise LongtailError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise LongtailError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims, dtype=np.int64))
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise LongtailError(
            f"{path}: IDX header says {dims} ({expected} bytes) "
            f"but the file holds {len(body)} bytes"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for cand in (root / stem, root / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    """Whether ``root`` (default :data:`FASHION_MNIST_ROOT`) holds all four IDX files."""
    root = Path(root or FASHION_MNIST_ROOT).expanduser()
    return all(
        _find_idx(root, f"{p}-{kind}") is not None
        for p in ("train", "t10k")
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )


def load_fashion_mnist(root: str | os.PathLike | None, split: str) -> ImageDataset:
    """Fashion-MNIST from its IDX files: ``(N, 1, 28, 28)`` uint8 images, 10 classes."""
    root = Path(root or FASHION_MNIST_ROOT).expanduser()
    prefix = "train" if split == "train" else "t10k"
    img_p = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    lab_p = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    if img_p is None or lab_p is None:
        raise _missing(
            root,
            f"{root}/{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]",
            "On Debian/Ubuntu: apt-get install dataset-fashion-mnist",
        )
    images, labels = read_idx(img_p), read_idx(lab_p)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise LongtailError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    if len(labels) and labels.max() >= 10:
        raise LongtailError(f"{lab_p}: label {int(labels.max())} out of range 0..9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return _in_memory("fashion-mnist", x, labels.astype(np.int64), FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------- scikit-learn digits
DIGITS_TEST_PER_CLASS = 30


def load_digits_split(split: str) -> ImageDataset:
    """scikit-learn's 8x8 digits as ``(N, 1, 8, 8)`` uint8 (0..16 scaled to 0..255).

    The data ships no split: a fixed, seed-0 permutation puts 30 images of every class in a
    balanced test set (300 images); the rest (1,497) form the training pool.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = d.target.astype(np.int64)
    rng = np.random.RandomState(0)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[:DIGITS_TEST_PER_CLASS]] = True
    keep = test if split == "test" else ~test
    train_x = x[torch.from_numpy(~test)]
    return _in_memory(
        "digits",
        x[torch.from_numpy(keep)],
        y[keep],
        [str(i) for i in range(10)],
        stats_from=train_x,
    )


# ---------------------------------------------------------------- list files and folders
def read_list_file(
    path: str | os.PathLike, root: str | os.PathLike, num_classes: int | None = None
) -> tuple[list[str], list[int]]:
    """Parse a ``relative/path label`` list file (ImageNet-LT, Places-LT, iNat, user CSVs).

    Whitespace- or comma-separated; blank lines and ``#`` comments are skipped; a header line
    ``path,label`` is allowed. Returns absolute paths and integer labels.
    """
    path, root = Path(path), Path(root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LongtailError(f"list file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LongtailError(f"list file {str(path)!r} unreadable: {e}") from e
    paths, labels = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
        if len(parts) != 2 or not parts[0].strip():
            raise LongtailError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}")
        rel, lab = parts[0].strip(), parts[1].strip()
        if lineno == 1 and lab.lower() in ("label", "class", "target"):
            continue
        try:
            label = int(lab)
        except ValueError:
            raise LongtailError(f"{path}:{lineno}: label {lab!r} is not an integer") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            hi = f"{num_classes - 1}" if num_classes is not None else "inf"
            raise LongtailError(f"{path}:{lineno}: label {label} out of range [0, {hi}]")
        paths.append(str(root / rel))
        labels.append(label)
    if not paths:
        raise LongtailError(f"list file {str(path)!r} holds no 'path label' lines")
    return paths, labels


def load_list_dataset(
    list_path: str | os.PathLike,
    root: str | os.PathLike,
    *,
    name: str = "list",
    num_classes: int | None = None,
    classes: list[str] | None = None,
) -> ImageDataset:
    """A file-backed dataset from a list file; class names default to the label numbers.

    ``num_classes`` bounds the labels (an error names the line of one out of range); the
    dataset has ``max(label) + 1`` classes unless ``classes`` names them.
    """
    paths, labels = read_list_file(list_path, root, num_classes)
    n = len(classes) if classes else max(labels) + 1
    return ImageDataset(
        labels=labels, classes=classes or [str(i) for i in range(n)], paths=paths, name=name
    )


def load_image_folder(
    root: str | os.PathLike, name: str = "folder", classes: list[str] | None = None
) -> ImageDataset:
    """An ImageFolder tree ``root/<class>/<image>``; classes sorted by folder name."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _missing(root, "an image folder tree ROOT/<class_name>/<image>.jpg")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = classes or found
    if not classes:
        raise _missing(root, "one sub-folder per class: ROOT/<class_name>/<image>.jpg")
    paths, labels, empty = [], [], []
    for c, cname in enumerate(classes):
        files = sorted(
            str(p)
            for p in (root / cname).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            empty.append(cname)
        paths += files
        labels += [c] * len(files)
    if empty:
        raise LongtailError(
            f"{root}: class folder(s) with no images: {', '.join(empty)}. Remove them or add images"
        )
    return ImageDataset(labels=labels, classes=list(classes), paths=paths, name=name)


def _inat_json(path: Path, root: Path) -> ImageDataset:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        id2file = {im["id"]: im["file_name"] for im in d["images"]}
        anns = d["annotations"]
        paths = [str(root / id2file[a["image_id"]]) for a in anns]
        labels = [int(a["category_id"]) for a in anns]
        n = len(d["categories"]) if "categories" in d else max(labels) + 1
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LongtailError(
            f"{path}: not an iNaturalist-2018 JSON ({type(e).__name__}: {e})"
        ) from e
    return ImageDataset(
        labels=labels, classes=[str(i) for i in range(n)], paths=paths, name="inat2018"
    )


# name -> (list-file stem, number of classes); files are <stem>_{train,val,test}.txt
_NATIVE_LT = {
    "imagenet-lt": ("ImageNet_LT", 1000),
    "places-lt": ("Places_LT", 365),
    "inat2018": ("iNaturalist18", 8142),
}


def _native_lt(name: str, root: Path, split: str, list_dir: str | None) -> ImageDataset | None:
    stem, num_classes = _NATIVE_LT[name]
    ldir = Path(list_dir).expanduser() if list_dir else root
    lst = ldir / f"{stem}_{split}.txt"
    if name == "inat2018" and split != "train" and not (ldir / f"{stem}_test.txt").is_file():
        # The community evaluates iNaturalist on its val split (val list or val2018.json): it is
        # the test set, and so never the validation split too, which would choose tau, alpha and
        # the temperatures on the test images; prepare_data carves validation from training.
        if split == "val":
            return None
        lst = ldir / f"{stem}_val.txt"
    if not lst.is_file() and name == "inat2018":
        js = ldir / f"{'train' if split == 'train' else 'val'}2018.json"
        if js.is_file():
            return _inat_json(js, root)
    if not lst.is_file():
        if split == "val":
            return None
        raise _missing(
            ldir,
            f"list files {stem}_train.txt / {stem}_val.txt / {stem}_test.txt "
            "('relative/path label' per line, paths relative to --root)",
            "Pass --list-dir if the lists live elsewhere",
        )
    return load_list_dataset(lst, root, name=name, num_classes=num_classes)


# ---------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[..., ImageDataset | None]] = {}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_REGISTRY)


def register_dataset(name: str, loader: Callable[..., ImageDataset | None]) -> None:
    """Make :func:`load_dataset` know ``name``.

    ``loader(split, root=..., download=..., list_dir=...)`` returns the split, or ``None`` for a
    ``val`` split the dataset does not have. The loader must keep no state between calls (the
    ``root`` argument says where the data is), so several runs in one process never interfere.
    """
    _REGISTRY[name.lower().replace("_", "-")] = loader


def load_dataset(
    name: str,
    split: str = "train",
    root: str | None = None,
    *,
    download: bool = False,
    list_dir: str | None = None,
) -> ImageDataset | None:
    """Load split ``train``, ``val`` or ``test`` of dataset ``name``.

    Returns ``None`` for ``val`` when the dataset has no validation split of its own (a
    class-balanced hold-out is then carved from the training data, see
    :func:`longtail.data.longtail.longtail_split`).
    """
    key = name.lower().replace("_", "-")
    if key not in _REGISTRY:
        raise LongtailError(f"unknown dataset {name!r}; known: {', '.join(available_datasets())}")
    if split not in ("train", "val", "test"):
        raise LongtailError(f"unknown split {split!r}; use train, val or test")
    return _REGISTRY[key](split, root=root, download=download, list_dir=list_dir)


def _folder_split(root: Path, split: str) -> ImageDataset | None:
    """``root/<split>/<class>/<image>``; val and test use train's class folders as labels."""
    if split == "val" and not (root / "val").is_dir():
        return None
    classes = None
    if split != "train" and (root / "train").is_dir():
        classes = sorted(
            p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith(".")
        )
    return load_image_folder(root / split, name="folder", classes=classes)


def _needs_root(name: str, root: str | None) -> Path:
    if not root:
        raise LongtailError(f"dataset {name!r} needs --root DIR (data.root in a config)")
    return Path(root).expanduser()


_REGISTRY.update(
    {
        "digits": lambda split, **_: None if split == "val" else load_digits_split(split),
        "fashion-mnist": lambda split, root=None, **_: (
            None if split == "val" else load_fashion_mnist(root, split)
        ),
        "cifar10": lambda split, root=None, download=False, **_: (
            None
            if split == "val"
            else load_cifar(_needs_root("cifar10", root), split, 10, download)
        ),
        "cifar100": lambda split, root=None, download=False, **_: (
            None
            if split == "val"
            else load_cifar(_needs_root("cifar100", root), split, 100, download)
        ),
        "folder": lambda split, root=None, **_: _folder_split(_needs_root("folder", root), split),
    }
)
for _name in _NATIVE_LT:
    _REGISTRY[_name] = lambda split, root=None, list_dir=None, _n=_name, **_: _native_lt(
        _n, _needs_root(_n, root), split, list_dir
    )
