"""Data for the trainers, never downloaded.

Text: byte-level tokens (vocab 256) from a file or a folder, by default from this Python's own standard
library sources; or nanoGPT's ``train.bin`` / ``val.bin`` (uint16 token ids) from a folder.
Images: an ImageFolder-style directory (needs Pillow), by default scikit-learn's bundled 8x8 digits when
scikit-learn is importable, else a synthetic 8x8, 10-class set generated in code.

Every batch is a pure function of (seed, step, micro-batch, rank), so a resumed run sees exactly the
batches it would have seen, and a DDP run's global batch equals a single process's with the same global size.
:class:`BatchLoader` computes those same batches ahead in worker processes (torch's DataLoader over a map-style
dataset whose item for key (step, micro) is ``data.batch(step, micro, ...)``): image folders decode in parallel,
bit-identical to the in-process path, and a bad file still ends the run with one ``TrainerError`` line.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import signal
import sysconfig
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

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


class FileList(Sequence):
    """Paths ``root/<relative path>`` held as one byte blob plus an offset array, not as Path objects.

    ImageNet's 1.28M paths take ~60 MB this way instead of several hundred, go to a worker process in one
    piece, and cause no copy-on-write page churn in forked workers (no per-file refcounts to touch).
    """

    def __init__(self, root: str | os.PathLike, relative: Iterable[str]) -> None:
        self.root = Path(root)
        encoded = [os.fsencode(r) for r in relative]
        self._blob = np.frombuffer(b"".join(encoded), np.uint8)
        self._ends = np.cumsum(np.array([len(b) for b in encoded], dtype=np.int64))

    def __len__(self) -> int:
        return len(self._ends)

    def relative(self, i: int) -> str:
        i = range(len(self))[i]
        start = int(self._ends[i - 1]) if i else 0
        return os.fsdecode(self._blob[start : int(self._ends[i])].tobytes())

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        return self.root / self.relative(i)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    # Cached: every micro-batch of an epoch indexes the same permutation (randperm(1.28M) takes ~10 ms).
    return torch.randperm(n, generator=_generator("epoch", seed, epoch))


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
    train_files: Sequence[Path] | None = None
    val_files: Sequence[Path] | None = None

    kind = "image"

    def batch(
        self, step: int, micro: int, rank: int, world: int, batch: int, global_rows: int, context: int, seed: int
    ):
        """(x, y): (batch, c, h, w) float32 images and (batch,) int64 labels; epochs are seeded permutations."""
        return self._get(self.indices(step, micro, rank, world, batch, global_rows, seed), train=True)

    def indices(self, step: int, micro: int, rank: int, world: int, batch: int, global_rows: int, seed: int):
        """Training-set rows of one micro-batch of one rank: the single source of truth for every loader."""
        n = len(self.train_y)
        start = step * global_rows
        pos = torch.arange(start, start + global_rows)[rows_for(micro, rank, world, batch)]
        epochs = pos // n
        idx = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            sel = epochs == e
            idx[sel] = _epoch_permutation(n, seed, e)[pos[sel] % n]
        return idx

    def val_batch(self, index: int, batch: int):
        """Batch ``index`` of the validation split taken in order (the last one may be short)."""
        n = len(self.val_y)
        return self._get(torch.arange(index * batch, min((index + 1) * batch, n)), train=False)

    def val_batches(self, batch: int, limit: int, *, workers: int = 0, prefetch: int = 2, pin_memory: bool = False):
        """The validation split in order, in batches (at most ``limit`` batches; 0 = all); ``workers`` > 0
        decodes them ahead in worker processes (the same batches, bit for bit)."""
        count = -(-len(self.val_y) // batch)
        count = min(count, limit) if limit else count
        if workers <= 0:
            for i in range(count):
                yield self.val_batch(i, batch)
            return
        keys = [(i,) for i in range(count)]
        with BatchLoader(
            self, "val_batch", keys, (batch,), workers=workers, prefetch=prefetch, pin_memory=pin_memory
        ) as loader:
            for key in keys:
                yield loader.get(key)

    def _get(self, idx: torch.Tensor, train: bool):
        ys = self.train_y if train else self.val_y
        xs = self.train_x if train else self.val_x
        if xs is not None:
            return xs[idx], ys[idx]
        files = self.train_files if train else self.val_files
        assert files is not None
        size, channels = self.image_size, self.channels
        pixels = np.empty((len(idx), size, size, channels), np.uint8)
        for j, i in enumerate(idx.tolist()):
            pixels[j] = decode_pixels(files[i], size, channels)
        return normalize(pixels, _batch_tensor((len(idx), channels, size, size))), ys[idx]


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty float32 tensor; inside a DataLoader worker, allocated in shared memory (as torch's default_collate
    does), so handing it to the training process costs no copy."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape)
    try:
        elem = torch.empty(0)
        storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
        return elem.new(storage).resize_(shape)
    except (AttributeError, RuntimeError, TypeError):  # private API moved: one copy later instead
        return torch.empty(shape)


def load_images(path: str, image_size: int, channels: int = 3) -> ImageData:
    """An ImageFolder-style directory, or the embedded default when ``path`` is empty.

    Layout: ``path/<class>/<image>`` (every 10th image of each class, in sorted order, is validation), or
    ``path/train/<class>/...`` with ``path/val/<class>/...`` (ImageNet's). Hidden files and folders are skipped.
    Images are converted to ``channels`` (3: RGB), resized (shorter side) and centre-cropped to ``image_size``,
    and normalised with ImageNet's mean and std (:func:`decode_image`). No augmentation (the paper does not
    state any). Only a fixed sample of at most 64 files is opened here; any other unreadable file is reported
    (as a :class:`TrainerError` naming it) by the batch that first needs it.
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
        classes, train = _scan(root, "train")
        val_classes, val = _scan(root, "val")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise TrainerError(f"{root / 'val'} has classes not in {root / 'train'}: {', '.join(unknown[:5])}")
        index = {c: y for y, c in enumerate(classes)}
        val = [(f, index[val_classes[y]]) for f, y in val]
    else:
        classes, items = _scan(root)
        train, val = [], []
        counts: dict[int, int] = {}
        for f, y in items:
            counts[y] = counts.get(y, 0) + 1
            (val if counts[y] % 10 == 0 else train).append((f, y))
    if not train:
        raise TrainerError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    everything = train + val
    for i in _sample(len(everything), CHECK_SAMPLE):
        _open(root / everything[i][0]).close()  # reads the header only
    return ImageData(
        train_y=torch.tensor([y for _, y in train], dtype=torch.int64),
        val_y=torch.tensor([y for _, y in val], dtype=torch.int64),
        num_classes=len(classes),
        channels=channels,
        image_size=image_size,
        description=f"image folder {root}: {len(classes)} classes, {len(train)} train / {len(val)} val images",
        fingerprint=_fingerprint(everything),
        train_files=FileList(root, [f for f, _ in train]),
        val_files=FileList(root, [f for f, _ in val]),
    )


CHECK_SAMPLE = 64  # files opened by load_images: all of a small folder, else this many evenly spaced ones


def _sample(n: int, k: int) -> list[int]:
    return list(range(n)) if n <= k else sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _fingerprint(items: list[tuple[str, int]]) -> str:
    # sha256 of repr([(relative path, label), ...]) fed piecewise: the same digest as hashing the whole repr.
    h = hashlib.sha256(b"[")
    for start in range(0, len(items), 65536):
        chunk = ", ".join(repr(item) for item in items[start : start + 65536])
        h.update(((", " if start else "") + chunk).encode())
    h.update(b"]")
    return h.hexdigest()[:16]


def _scan(top: Path, sub: str = "") -> tuple[list[str], list[tuple[str, int]]]:
    """Class folders of ``top/sub`` (sorted) and their images as (path relative to ``top``, label), each class's
    files in sorted path order (the order of ``sorted(Path.rglob)``): one ``os.scandir`` per folder."""
    root = top / sub if sub else top
    prefix = f"{sub}{os.sep}" if sub else ""
    try:
        with os.scandir(root) as it:
            classes = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError as e:
        raise TrainerError(f"cannot list {str(root)!r}: {e.strerror or e}") from None
    if not classes:
        raise TrainerError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    items = []
    for y, c in enumerate(classes):
        items.extend((prefix + os.path.join(c, *parts), y) for parts in _image_files(root / c))
    return classes, items


def _image_files(folder: Path) -> list[tuple[str, ...]]:
    """Image files under ``folder`` (recursively; symlinked sub-folders are not followed) as sorted path parts."""
    found, todo = [], [()]
    while todo:
        parts = todo.pop()
        try:
            with os.scandir(os.path.join(folder, *parts)) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir(follow_symlinks=False):
                        todo.append((*parts, e.name))
                    elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file():
                        found.append((*parts, e.name))
        except OSError as e:
            raise TrainerError(f"cannot list {os.path.join(folder, *parts)!r}: {e.strerror or e}") from None
    found.sort()
    return found


def _open(f: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(f)
    except (OSError, UnidentifiedImageError) as e:
        raise TrainerError(f"cannot read image {str(f)!r}: {e.__class__.__name__}") from None


def decode_pixels(f: Path, size: int, channels: int) -> np.ndarray:
    """(size, size, channels) uint8: converted to RGB (or grey), shorter side resized to ``size`` (bilinear),
    centre crop.

    JPEGs are first reduced in the DCT domain by libjpeg (``Image.draft``: 1/2, 1/4 or 1/8 scale, never below
    ``size`` on the shorter side), as fast ImageNet loaders do. A JPEG whose shorter side is at least twice
    ``size`` then decodes several times faster, with pixel values a few levels off a full decode (the same in
    every loader: serial and workers call this function); any other image gives the full decode's pixels.
    """
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"
    try:
        with _open(f) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (size, size))  # scale only: colour conversion stays PIL's, below
            im = img if img.mode == mode else img.convert(mode)
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            pixels = np.asarray(im.crop((left, top, left + size, top + size)))
    except TrainerError:
        raise
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise TrainerError(f"cannot decode image {str(f)!r}: {e.__class__.__name__}: {e}") from None
    return pixels.reshape(size, size, channels)


def normalize(pixels: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, h, w, c) uint8 -> (n, c, h, w) float32: x / 255, minus the mean, over the std (ImageNet's for RGB,
    0.5 and 0.25 for grey). One op per batch, not per image; elementwise, so bit-identical at any thread count."""
    channels = pixels.shape[-1]
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    out = torch.empty(x.shape) if out is None else out
    mean = torch.tensor(IMAGENET_MEAN if channels == 3 else (0.5,)).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD if channels == 3 else (0.25,)).view(-1, 1, 1)
    return out.copy_(x).div_(255.0).sub_(mean).div_(std)


def decode_image(f: Path, size: int, channels: int) -> torch.Tensor:
    """(channels, size, size) float32, normalised: :func:`decode_pixels` then :func:`normalize`."""
    return normalize(decode_pixels(f, size, channels)[None].copy())[0]


# -- loading ahead in worker processes -------------------------------------------------------------------


def auto_workers(data: TextData | ImageData) -> int:
    """``--workers=-1``: min(8, CPUs of this process / local DDP ranks) for an image folder (decoded on demand);
    0 (in-process) for text and for images held in memory, which cost nothing to index."""
    if data.kind != "image" or data.train_files is None:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(1, min(8, cpus // local))


@dataclass
class _Failure:
    message: str  # a TrainerError raised in a worker, re-raised by the training process


class _Batches(torch.utils.data.Dataset):
    """Map-style dataset over batch keys: item ``key`` is ``getattr(data, method)(*key, *args)``, exactly the
    serial path's call, so a worker's batch is the serial batch by construction."""

    def __init__(self, data, method: str, args: tuple) -> None:
        self.data, self.method, self.args = data, method, args

    def __getitem__(self, key: tuple[int, ...]):
        try:
            return key, getattr(self.data, self.method)(*key, *self.args)
        except TrainerError as e:  # one clean line in the training process, not a worker traceback
            return key, _Failure(str(e))


class _Keys:
    def __init__(self, keys: Iterable[tuple[int, ...]], count: int) -> None:
        self.keys, self.count = keys, count

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return self.count


class BatchLoader:
    """Batches decoded ahead by ``workers`` processes (torch's DataLoader over :class:`_Batches`), handed out in
    the order of ``keys``; ``get(key)`` checks that order. ``prefetch`` batches per worker are in flight.

    Pinned memory when ``pin_memory`` (CUDA). The DataLoader's base seed comes from its own generator, so
    starting workers draws nothing from torch's global RNG (the model's init and dropout stay the same as
    with ``workers=0``). ``close()`` (or leaving a ``with`` block) stops the workers and joins them.
    """

    def __init__(
        self,
        data,
        method: str,
        keys: Iterable[tuple[int, ...]],
        args: tuple,
        *,
        workers: int,
        prefetch: int = 2,
        pin_memory: bool = False,
        count: int | None = None,
    ) -> None:
        from torch.utils.data import DataLoader

        if count is None:
            keys = list(keys)
            count = len(keys)
        self._loader = DataLoader(
            _Batches(data, method, args),
            batch_size=None,
            sampler=_Keys(keys, count),
            num_workers=workers,
            prefetch_factor=prefetch if workers else None,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=_worker_init,
        )
        self._it = None
        try:
            with _ctrl_c_held():
                self._it = iter(self._loader)  # forks the workers
        except BaseException:
            self.close()
            raise

    def get(self, key: tuple[int, ...]):
        if self._it is None:
            raise RuntimeError("BatchLoader.get() after close()")
        try:
            got, out = next(self._it)
        except StopIteration:
            raise RuntimeError(f"BatchLoader has no batch left for {key}") from None
        except RuntimeError as e:
            failure = worker_failure(e)
            if failure is None:
                raise
            self.close()
            raise failure from None
        if isinstance(out, _Failure):
            self.close()
            raise TrainerError(out.message)
        if tuple(got) != tuple(key):
            raise RuntimeError(f"BatchLoader out of order: asked for {key}, the workers made {tuple(got)}")
        return out

    def close(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def worker_failure(e: BaseException) -> TrainerError | None:
    """torch's error for a worker process that died (killed when out of memory, bus error when /dev/shm is full)
    as a one-line TrainerError; None for any other exception. torch raises it from a SIGCHLD handler, so it can
    surface anywhere in the training loop: the trainer converts it at the top."""
    if isinstance(e, RuntimeError) and str(e).startswith("DataLoader worker"):
        return TrainerError(f"data loading failed: {' '.join(str(e).split())}")
    return None


@contextlib.contextmanager
def _ctrl_c_held():
    """Hold a Ctrl-C that lands while worker processes fork, and deliver it afterwards.

    Python runs a signal's handler wherever the main thread happens to be; inside ``os.fork``'s at-fork hooks a
    KeyboardInterrupt is printed as "Exception ignored" and dropped, and the run would go on as if no key was
    pressed. Only the main thread can set handlers; elsewhere (and for non-Python handlers) nothing is changed.
    """
    global _SIGINT_HANDLER
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    held: list = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    _SIGINT_HANDLER = previous
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _SIGINT_HANDLER = None
    if held:
        previous(signal.SIGINT, held[0])


_SIGINT_HANDLER = None  # the training process's Ctrl-C handler while _ctrl_c_held holds it (forked workers see it)


def _worker_init(worker_id: int) -> None:
    # A forked worker inherits _ctrl_c_held's recorder: give it back the handler the training process had (Python's
    # default: torch's worker loop then ends quietly on Ctrl-C, and the training process reports it).
    if _SIGINT_HANDLER is not None:
        signal.signal(signal.SIGINT, _SIGINT_HANDLER)


def train_loader(
    data: TextData | ImageData,
    steps: range,
    micro_batches: int,
    rank: int,
    world: int,
    batch: int,
    global_rows: int,
    context: int,
    seed: int,
    *,
    workers: int,
    prefetch: int = 2,
    pin_memory: bool = False,
) -> BatchLoader:
    """The micro-batches ``data.batch(step, micro, rank, ...)`` for step in ``steps``, micro < ``micro_batches``,
    decoded ahead by ``workers`` processes; ``get((step, micro))`` returns each in turn."""
    keys = ((step, micro) for step in steps for micro in range(micro_batches))
    args = (rank, world, batch, global_rows, context, seed)
    return BatchLoader(
        data,
        "batch",
        keys,
        args,
        workers=workers,
        prefetch=prefetch,
        pin_memory=pin_memory,
        count=len(steps) * micro_batches,
    )


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
