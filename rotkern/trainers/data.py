"""Data for the trainers, never downloaded.

Text: byte-level tokens (vocab 256) from a file or a folder, by default from this Python's own standard
library sources; or nanoGPT's ``train.bin`` / ``val.bin`` (uint16 token ids) from a folder.
Images: an ImageFolder-style directory (needs Pillow), by default scikit-learn's bundled 8x8 digits when
scikit-learn is importable, else a synthetic 8x8, 10-class set generated in code.

Every batch is a pure function of (seed, step, micro-batch, rank), so a resumed run sees exactly the
batches it would have seen, and a DDP run's global batch equals a single process's with the same global size.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common import TrainerError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VAL_SEED = 0x5EED  # validation batches do not depend on the training seed: runs stay comparable


def _generator(*key: int | str) -> torch.Generator:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def rows_for(micro: int, rank: int, world: int, batch: int) -> slice:
    """Rows of the step's global batch that micro-batch ``micro`` of ``rank`` takes."""
    start = (micro * world + rank) * batch
    return slice(start, start + batch)


# -- text ----------------------------------------------------------------------------------------------


@dataclass
class TextData:
    train: np.ndarray  # 1-D token ids (uint8 or uint16, possibly a memmap)
    val: np.ndarray
    vocab_size: int  # ids are < vocab_size (checked on load for small data, per batch otherwise)
    description: str
    fingerprint: str

    kind = "text"

    def batch(
        self, step: int, micro: int, rank: int, world: int, batch: int, global_rows: int, context: int, seed: int
    ):
        """(x, y): (batch, context) int64 inputs and next-token targets for one micro-batch of one rank."""
        return self._rows(
            self.train, _generator("train", seed, step), global_rows, rows_for(micro, rank, world, batch), context
        )

    def val_batch(self, index: int, batch: int, context: int):
        return self._rows(self.val, _generator("val", VAL_SEED, index), batch, slice(0, batch), context)

    def _rows(self, data: np.ndarray, gen: torch.Generator, n: int, rows: slice, context: int):
        offsets = torch.randint(len(data) - context - 1, (n,), generator=gen)[rows].tolist()
        x = np.stack([np.asarray(data[i : i + context], dtype=np.int64) for i in offsets])
        y = np.stack([np.asarray(data[i + 1 : i + 1 + context], dtype=np.int64) for i in offsets])
        top = int(max(x.max(), y.max()))
        if top >= self.vocab_size:
            raise TrainerError(
                f"{self.description}: token id {top} is beyond the model's vocabulary ({self.vocab_size})"
            )
        return torch.from_numpy(x), torch.from_numpy(y)

    def check(self, vocab_size: int, context: int) -> None:
        if vocab_size < self.vocab_size and len(self.train) <= 2**27:
            top = int(max(self.train.max(), self.val.max()))
            if top >= vocab_size:
                raise TrainerError(
                    f"{self.description}: token id {top} is beyond the model's vocabulary ({vocab_size}); "
                    "pick a model with a larger vocab_size"
                )
        self.vocab_size = vocab_size
        for name, split in (("train", self.train), ("val", self.val)):
            if len(split) < context + 2:
                raise TrainerError(
                    f"{self.description}: the {name} split has {len(split)} tokens, fewer than context + 2 = "
                    f"{context + 2}; use more text or a shorter --context"
                )


def stdlib_files() -> tuple[Path, list[Path]]:
    """This Python's standard-library ``*.py`` files (no site-packages), in a fixed hashed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
    return root, _hash_order(root, files)


def _hash_order(root: Path, files: list[Path]) -> list[Path]:
    # Sorting by a hash of the relative path spreads a size cap over the whole tree, not its first letters.
    return sorted(files, key=lambda p: (hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest(), p))


def load_text(path: str = "", max_bytes: int = 4_000_000, val_fraction: float = 0.1) -> TextData:
    """Byte-level text from ``path`` (a file, or a folder read recursively), default the stdlib sources.

    A folder with ``train.bin`` and ``val.bin`` is read as nanoGPT's uint16 token files instead. Folders are
    split by file (every 10th file, in hashed order, is validation); a single file by its last 10%.
    ``max_bytes`` caps the bytes read (train and validation together).
    """
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise TrainerError(f"data path {path!r} does not exist")
        if p.is_dir() and (p / "train.bin").exists() and (p / "val.bin").exists():
            return _load_bins(p)
        if p.is_dir():
            files = _hash_order(p, [f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")])
            if not files:
                raise TrainerError(f"data folder {path!r} holds no files")
            desc = f"text folder {p}"
        else:
            files, desc = [p], f"text file {p}"
    else:
        root, files = stdlib_files()
        if not files:
            raise TrainerError(f"no standard-library sources found under {root}; pass --data=PATH")
        desc = f"Python {sysconfig.get_python_version()} standard library ({root})"
    if len(files) == 1:
        raw = _read(files[0], max_bytes)
        if not raw:
            raise TrainerError(f"data file {str(files[0])!r} is empty")
        cut = int(len(raw) * (1 - val_fraction))
        train, val = raw[:cut], raw[cut:]
    else:
        train_parts, val_parts, total = [], [], 0
        for i, f in enumerate(files):
            if total >= max_bytes:
                break
            chunk = _read(f, max_bytes - total)
            total += len(chunk)
            (val_parts if i % 10 == 9 else train_parts).append(chunk)
        train, val = b"\n".join(train_parts), b"\n".join(val_parts)
        if not train:
            raise TrainerError(f"{desc}: all files are empty")
        if not val:  # fewer than 10 files: fall back to the last 10% of the text
            cut = int(len(train) * (1 - val_fraction))
            train, val = train[:cut], train[cut:]
    fp = hashlib.sha256(train + b"\0" + val).hexdigest()[:16]
    desc += f", {len(train) + len(val):,} bytes"
    return TextData(np.frombuffer(train, np.uint8), np.frombuffer(val, np.uint8), 256, desc, fp)


def _read(f: Path, limit: int) -> bytes:
    try:
        with open(f, "rb") as fh:
            return fh.read(limit)
    except OSError as e:
        raise TrainerError(f"cannot read {str(f)!r}: {e.strerror or e}") from None


def _load_bins(p: Path) -> TextData:
    splits = []
    for name in ("train.bin", "val.bin"):
        f = p / name
        size = f.stat().st_size
        if size == 0:
            raise TrainerError(f"data file {str(f)!r} is empty")
        if size % 2:
            raise TrainerError(f"{str(f)!r} has an odd size ({size} bytes); nanoGPT .bin files hold uint16 tokens")
        splits.append(np.memmap(f, dtype=np.uint16, mode="r"))
    st = [(p / n).stat() for n in ("train.bin", "val.bin")]
    fp = hashlib.sha256(repr([(s.st_size, s.st_mtime_ns) for s in st]).encode()).hexdigest()[:16]
    return TextData(splits[0], splits[1], 2**16, f"nanoGPT token files in {p}", fp)


# -- images --------------------------------------------------------------------------------------------


@dataclass
class ImageData:
    """Tensors in memory (``train_x``: (n, c, h, w) float32) or files decoded on demand (``train_files``)."""

    train_y: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    channels: int
    image_size: int
    description: str
    fingerprint: str
    train_x: torch.Tensor | None = None
    val_x: torch.Tensor | None = None
    train_files: list[Path] | None = None
    val_files: list[Path] | None = None

    kind = "image"

    def batch(
        self, step: int, micro: int, rank: int, world: int, batch: int, global_rows: int, context: int, seed: int
    ):
        """(x, y): (batch, c, h, w) float32 images and (batch,) int64 labels; epochs are seeded permutations."""
        n = len(self.train_y)
        start = step * global_rows
        pos = torch.arange(start, start + global_rows)[rows_for(micro, rank, world, batch)]
        epochs = pos // n
        idx = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            perm = torch.randperm(n, generator=_generator("epoch", seed, e))
            sel = epochs == e
            idx[sel] = perm[pos[sel] % n]
        return self._get(idx, train=True)

    def val_batches(self, batch: int, limit: int):
        """The validation split in order, in batches (at most ``limit`` batches; 0 = all)."""
        n = len(self.val_y)
        stops = range(0, n, batch)
        for i, s in enumerate(stops):
            if limit and i >= limit:
                break
            yield self._get(torch.arange(s, min(s + batch, n)), train=False)

    def _get(self, idx: torch.Tensor, train: bool):
        ys = self.train_y if train else self.val_y
        xs = self.train_x if train else self.val_x
        if xs is not None:
            return xs[idx], ys[idx]
        files = self.train_files if train else self.val_files
        return torch.stack([decode_image(files[i], self.image_size, self.channels) for i in idx.tolist()]), ys[idx]


def load_images(path: str, image_size: int, channels: int = 3) -> ImageData:
    """An ImageFolder-style directory, or the embedded default when ``path`` is empty.

    Layout: ``path/<class>/<image>`` (every 10th image of each class, in sorted order, is validation), or
    ``path/train/<class>/...`` with ``path/val/<class>/...`` (ImageNet's). Images are converted to
    ``channels`` (3: RGB), resized (shorter side) and centre-cropped to ``image_size``, and normalised with
    ImageNet's mean and std. No augmentation (the paper does not state any).
    """
    if not path:
        return default_images()
    root = Path(path).expanduser()
    if not root.exists():
        raise TrainerError(f"data path {path!r} does not exist")
    if not root.is_dir():
        raise TrainerError(f"image data {path!r} must be a folder of class folders (ImageFolder layout)")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise TrainerError("reading an image folder needs Pillow: pip install pillow") from None
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train = _scan(root / "train")
        val_classes, val = _scan(root / "val")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise TrainerError(f"{root / 'val'} has classes not in {root / 'train'}: {', '.join(unknown[:5])}")
        val = [(f, classes.index(val_classes[y])) for f, y in val]
    else:
        classes, items = _scan(root)
        train, val = [], []
        counts: dict[int, int] = {}
        for f, y in items:
            counts[y] = counts.get(y, 0) + 1
            (val if counts[y] % 10 == 0 else train).append((f, y))
    if not train:
        raise TrainerError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    # Opening an image reads its header only: cheap enough to check up to ~20k files before training.
    for f, _ in (train + val)[:20000]:
        _open(f).close()
    fp = hashlib.sha256(repr([(str(f.relative_to(root)), y) for f, y in train + val]).encode()).hexdigest()[:16]
    return ImageData(
        train_y=torch.tensor([y for _, y in train]),
        val_y=torch.tensor([y for _, y in val], dtype=torch.int64),
        num_classes=len(classes),
        channels=channels,
        image_size=image_size,
        description=f"image folder {root}: {len(classes)} classes, {len(train)} train / {len(val)} val images",
        fingerprint=fp,
        train_files=[f for f, _ in train],
        val_files=[f for f, _ in val],
    )


def _scan(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise TrainerError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    items = []
    for y, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((f, y))
    return classes, items


def _open(f: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(f)
    except (OSError, UnidentifiedImageError) as e:
        raise TrainerError(f"cannot read image {str(f)!r}: {e.__class__.__name__}") from None


def decode_image(f: Path, size: int, channels: int) -> torch.Tensor:
    """(channels, size, size) float32, normalised."""
    from PIL import Image

    img = _open(f)
    try:
        img = img.convert("RGB" if channels == 3 else "L")
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    except OSError as e:
        raise TrainerError(f"cannot decode image {str(f)!r}: {e}") from None
    x = x.permute(2, 0, 1) if x.ndim == 3 else x.unsqueeze(0)
    mean = torch.tensor(IMAGENET_MEAN[:channels] if channels == 3 else (0.5,)).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD[:channels] if channels == 3 else (0.25,)).view(-1, 1, 1)
    return (x - mean) / std


def default_images() -> ImageData:
    """scikit-learn's bundled digits (1797 8x8 grey images, 10 classes) if importable, else :func:`synthetic_images`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return synthetic_images()
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=_generator("digits-split"))
    n_val = len(y) // 5
    return _in_memory(x[perm], y[perm], n_val, "scikit-learn digits (8x8, 10 classes, bundled with scikit-learn)")


def synthetic_images(n: int = 3000, size: int = 8, classes: int = 10, noise: float = 0.2) -> ImageData:
    """A deterministic 10-class set of (1, 8, 8) "stroke" images: each class is a random binary pattern, softened
    by a 3x3 blur, shifted by up to a pixel, with random contrast and Gaussian noise (1-NN reaches ~90 %)."""
    g = _generator("synthetic-images")
    templates = (torch.rand(classes, 1, size, size, generator=g) < 0.35).float()
    templates = F.avg_pool2d(F.pad(templates, (1, 1, 1, 1), mode="replicate"), 3, 1)
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=g)]
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    x = torch.stack([torch.roll(templates[y[i]], tuple(shifts[i].tolist()), dims=(1, 2)) for i in range(n)])
    x = x * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)) + noise * torch.randn(x.shape, generator=g)
    desc = f"synthetic images ({n} x (1, {size}, {size}), {classes} classes; scikit-learn not installed, so no digits)"
    return _in_memory(x, y, n // 5, desc)


def _in_memory(x: torch.Tensor, y: torch.Tensor, n_val: int, desc: str) -> ImageData:
    tx, vx, ty, vy = x[n_val:], x[:n_val], y[n_val:], y[:n_val]
    mean, std = tx.mean(), tx.std()
    tx, vx = (tx - mean) / std, (vx - mean) / std
    fp = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
    return ImageData(
        train_y=ty,
        val_y=vy,
        num_classes=int(y.max()) + 1,
        channels=x.shape[1],
        image_size=x.shape[-1],
        description=desc + f", {len(ty)} train / {len(vy)} val",
        fingerprint=fp,
        train_x=tx.contiguous(),
        val_x=vx.contiguous(),
    )
