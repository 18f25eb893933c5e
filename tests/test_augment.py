"""Whole-batch augmentation: random crop with zero padding, horizontal flip, random erasing,
normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail.data.augment import ERASE_AREA, ERASE_RATIO, normalize, random_crop_flip, random_erase

DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


def random_batch(b=16, c=3, h=32, w=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def find_window(out: torch.Tensor, padded: torch.Tensor, pad: int):
    """All (dy, dx, flipped) with ``out == padded[:, dy:dy+H, dx:dx+W]`` (flipped or not)."""
    _, h, w = out.shape
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            win = padded[:, dy : dy + h, dx : dx + w]
            if torch.equal(out, win):
                hits.append((dy, dx, False))
            if torch.equal(out, win.flip(2)):
                hits.append((dy, dx, True))
    return hits


def test_identity_without_padding_or_flip():
    x = random_batch()
    out = random_crop_flip(x, padding=0, flip=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, x)


def test_every_output_is_a_window_of_the_padded_input():
    x = random_batch(b=16, seed=3)
    padded = F.pad(x, (4, 4, 4, 4))
    out = random_crop_flip(x, padding=4, flip=True, generator=torch.Generator().manual_seed(5))
    assert out.shape == x.shape
    found = []
    for i in range(len(x)):
        hits = find_window(out[i], padded[i], 4)
        assert len(hits) == 1, (i, hits)  # random content: the window is unique
        found.append(hits[0])
    # the crops are not all centred, and both flip outcomes occur
    assert len({(dy, dx) for dy, dx, _ in found}) > 4
    assert {f for _, _, f in found} == {False, True}


def test_matches_per_sample_reference_loop():
    """Same generator seed -> same offsets and flips as a plain per-sample slicing loop."""
    x = random_batch(b=16, seed=4)
    pad = 4
    out = random_crop_flip(x, padding=pad, flip=True, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    oy = torch.randint(0, 2 * pad + 1, (16, 1), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (16, 1), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    for i in range(16):
        dy, dx = int(oy[i]), int(ox[i])
        ref = padded[i, :, dy : dy + 32, dx : dx + 32]
        if flips[i]:
            ref = ref.flip(2)
        assert torch.equal(out[i], ref), i


def test_offsets_cover_the_full_range():
    x = random_batch(b=400, c=1, h=12, w=12, seed=6)
    pad = 2
    out = random_crop_flip(x, padding=pad, flip=False, generator=torch.Generator().manual_seed(0))
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy, dx, f in find_window(out[i], padded[i], pad) if not f]
        assert len(hits) == 1
        offsets.append(hits[0])
    counts = torch.zeros(2 * pad + 1, 2 * pad + 1)
    for dy, dx in offsets:
        counts[dy, dx] += 1
    # 25 offsets, 400 draws: each expected 16 times; all occur, none wildly over-represented
    assert (counts > 0).all() and counts.max() < 40


def test_flip_only_mirrors():
    x = random_batch(b=64, seed=7)
    out = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(2))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert (same ^ mirrored).all()  # each image exactly one of the two
    assert 16 < int(mirrored.sum()) < 48  # about half are flipped


def test_generator_makes_it_reproducible():
    x = random_batch(seed=8)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16])
def test_dtype_and_device_preserved(device, dtype):
    x = random_batch(b=4, c=3, h=8, w=10).to(dtype).to(device)
    out = random_crop_flip(x, padding=3, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype
    assert out.device == x.device
    assert out.shape == (4, 3, 8, 10)


@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (2, 0, 8, 8), (2, 3, 0, 5)])
def test_empty_batches_stay_empty(shape):
    x = torch.zeros(shape, dtype=torch.uint8)
    for padding in (0, 2):
        out = random_crop_flip(x, padding, True, torch.Generator().manual_seed(0))
        assert out.shape == shape


def test_non_square_and_grayscale_values_come_from_input():
    x = random_batch(b=8, c=1, h=6, w=10, seed=2) | 1  # no zeros in the image itself
    out = random_crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(1))
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(8):
        assert len(find_window(out[i], padded[i], 2)) == 1
    assert (out == 0).any()  # some zero padding entered a window


# ------------------------------------------------------------------ normalize
def test_normalize_matches_formula():
    x = random_batch(b=5, seed=11)
    mean = torch.tensor([0.4914, 0.4822, 0.4465])
    std = torch.tensor([0.2470, 0.2435, 0.2616])
    out = normalize(x, mean, std)
    ref = (x.double() / 255 - mean.double().view(1, 3, 1, 1)) / std.double().view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out.double(), ref, atol=1e-5)
    # spot values: 0 and 255 map to -mean/std and (1-mean)/std
    assert torch.allclose(
        normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), mean, std).flatten(), -mean / std
    )
    full = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert torch.allclose(normalize(full, mean, std).flatten(), (1 - mean) / std)


def test_normalize_single_channel():
    x = torch.tensor([[[[0, 51], [102, 255]]]], dtype=torch.uint8)
    out = normalize(x, torch.tensor([0.5]), torch.tensor([0.25]))
    assert torch.allclose(out.flatten(), torch.tensor([-2.0, -1.2, -0.4, 2.0]))


def test_normalize_channels_last():
    x = random_batch(b=3, seed=12)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    plain = normalize(x, mean, std)
    cl = normalize(x, mean, std, channels_last=True)
    assert plain.is_contiguous() and not plain.is_contiguous(memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert cl.shape == (3, 3, 32, 32)
    assert torch.equal(cl, plain)


def erased_boxes(x: torch.Tensor, out: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """Per image, the bounding box ``(top, left, h, w)`` of the pixels ``out`` changed (in
    any channel), or ``None`` when it changed none."""
    boxes = []
    for a, b in zip(x, out, strict=True):
        changed = (a != b).any(0)
        if not changed.any():
            boxes.append(None)
            continue
        rows = changed.any(1).nonzero().flatten()
        cols = changed.any(0).nonzero().flatten()
        top, left = int(rows[0]), int(cols[0])
        boxes.append((top, left, int(rows[-1]) - top + 1, int(cols[-1]) - left + 1))
    return boxes


def test_random_erase_replaces_one_rectangle_per_erased_image():
    """About ``p`` of the images change, each inside one rectangle of the drawn size range,
    and every pixel outside it keeps its value. Guards: a mask broadcast across the batch or
    the channels, rectangles outside the area / aspect bounds, untouched images changed."""
    x = random_batch(b=400, c=3, h=32, w=32, seed=5)
    out = random_erase(x, 0.5, torch.Generator().manual_seed(2))
    assert out.shape == x.shape and out.dtype == x.dtype
    boxes = erased_boxes(x, out)
    erased = [bx for bx in boxes if bx is not None]
    assert 160 <= len(erased) <= 240  # Binomial(400, 0.5): mean 200, sd 10
    for i, box in enumerate(boxes):
        if box is None:
            continue
        top, left, h, w = box
        a, b = x[i], out[i]
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[top : top + h, left : left + w] = False
        assert torch.equal(a[:, outside], b[:, outside])
        # the random values differ from the input almost everywhere: the box is the rectangle
        area = h * w / (32 * 32)
        assert ERASE_AREA[0] * 0.5 <= area <= ERASE_AREA[1] * 1.3
        assert ERASE_RATIO[0] / 2 <= h / w <= ERASE_RATIO[1] * 2
    sizes = {(h, w) for _, _, h, w in erased}
    assert len(sizes) > 50  # sizes are drawn per image, not once per batch


def test_random_erase_probability_bounds_and_reproducibility():
    """``p = 0`` returns the batch itself, ``p = 1`` erases every image; the same generator
    seed gives the same output, another seed another; empty batches stay empty."""
    x = random_batch(b=64, seed=7)
    assert random_erase(x, 0.0, torch.Generator().manual_seed(0)) is x
    out = random_erase(x, 1.0, torch.Generator().manual_seed(0))
    assert all(bx is not None for bx in erased_boxes(x, out))
    again = random_erase(x, 1.0, torch.Generator().manual_seed(0))
    other = random_erase(x, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    empty = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    assert random_erase(empty, 1.0).shape == (0, 3, 8, 8)


def test_random_erase_leaves_images_too_small_for_any_rectangle():
    """A 1 x 1 image fits no rectangle smaller than itself: it is returned unchanged, as
    torchvision's RandomErasing does after its attempts."""
    x = random_batch(b=32, c=1, h=1, w=1, seed=1)
    assert torch.equal(random_erase(x, 1.0, torch.Generator().manual_seed(0)), x)


def test_erasing_reaches_the_training_batches_only():
    """``data.erasing`` changes the training loader's batches and no evaluation loader's, and
    an out-of-range value is refused naming the key. Guards: the key parsed but never passed
    to the loader; erasing applied to validation or test images."""
    from longtail.config import load_config
    from longtail.core.errors import LongtailError
    from longtail.core.runtime import make_runtime
    from longtail.data.build import build_data, make_loaders

    with pytest.raises(LongtailError, match=r"data.erasing.*\[0, 1\]"):
        load_config("digits_lt", ["data.erasing=1.5"])
    batches = {}
    for p in (0.0, 1.0):
        cfg = load_config("digits_lt", [f"data.erasing={p}", "data.padding=0", "data.flip=false"])
        loaders = make_loaders(cfg, build_data(cfg), make_runtime("cpu", "fp32", False))
        idx = np.arange(64)
        batches[p] = {k: next(iter(loaders[k].batches(idx)))[0] for k in ("train", "test")}
    assert not torch.equal(batches[0.0]["train"], batches[1.0]["train"])
    assert torch.equal(batches[0.0]["test"], batches[1.0]["test"])
