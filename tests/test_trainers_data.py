import numpy as np
import pytest
import torch

from rotkern.trainers.common import TrainerError
from rotkern.trainers.data import load_images, load_text, rows_for, synthetic_images


def test_stdlib_text_is_deterministic_and_split():
    a, b = load_text(max_bytes=200_000), load_text(max_bytes=200_000)
    assert a.fingerprint == b.fingerprint and "standard library" in a.description
    assert len(a.train) > 5 * len(a.val) > 0
    x1, y1 = a.batch(3, 0, 0, 1, 4, 4, 16, seed=0)
    x2, _ = b.batch(3, 0, 0, 1, 4, 4, 16, seed=0)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(x1, a.batch(4, 0, 0, 1, 4, 4, 16, seed=0)[0])


def test_ranks_and_micro_batches_tile_the_global_batch():
    data = load_text(max_bytes=100_000)
    whole, _ = data.batch(7, 0, 0, 1, 8, 8, 16, seed=1)
    parts = [data.batch(7, m, r, 2, 2, 8, 16, seed=1)[0] for m in range(2) for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    assert rows_for(1, 1, 2, 2) == slice(6, 8)


def test_text_file_and_folder(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"hello world " * 100)
    d = load_text(str(f))
    assert len(d.train) == 1080 and len(d.val) == 120
    (tmp_path / "sub").mkdir()
    for i in range(12):
        (tmp_path / "sub" / f"{i}.txt").write_text(f"file {i} " * 20)
    assert len(load_text(str(tmp_path / "sub")).val) > 0


def test_nanogpt_bins(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(200, dtype=np.uint16).tofile(tmp_path / "val.bin")
    d = load_text(str(tmp_path))
    d.check(50304, 16)
    x, y = d.batch(0, 0, 0, 1, 2, 2, 16, seed=0)
    assert x.dtype == torch.int64 and torch.equal(x + 1, y)
    with pytest.raises(TrainerError, match="beyond the model's vocabulary"):
        d.check(256, 16)


def test_synthetic_images_are_deterministic():
    a, b = synthetic_images(), synthetic_images()
    assert torch.equal(a.train_x, b.train_x) and a.train_x.shape[1:] == (1, 8, 8)
    x, y = a.batch(0, 0, 0, 1, 16, 16, 0, seed=0)
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    # One epoch visits every training image once.
    n = len(a.train_y)
    seen = torch.cat([a.batch(s, 0, 0, 1, 100, 100, 0, seed=0)[1] for s in range(n // 100)])
    assert torch.equal(torch.bincount(seen, minlength=10), torch.bincount(a.train_y, minlength=10))


def test_image_folder(tmp_path):
    pil = pytest.importorskip("PIL.Image", reason="reading image folders needs Pillow")
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(10):
            pil.fromarray(np.full((12, 10, 3), 20 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    d = load_images(str(tmp_path), 8)
    assert d.num_classes == 2 and len(d.train_y) == 18 and len(d.val_y) == 2
    x, y = d.batch(0, 0, 0, 1, 4, 4, 0, seed=0)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(TrainerError, match="broken.png"):
        load_images(str(tmp_path), 8)
