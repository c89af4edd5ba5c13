import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rotkern.trainers.__main__ import main
from rotkern.trainers.common import TrainerError
from rotkern.trainers.data import (
    IMAGE_EXTENSIONS,
    FileList,
    _scan,
    decode_image,
    load_images,
    load_text,
    rows_for,
    synthetic_images,
    train_loader,
    worker_failure,
)
from rotkern.trainers.train import train

from .._trainer_helpers import CPU_ARGV, fast_config


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


# -- image folders decoded ahead in worker processes ------------------------------------------------------


def _jpeg_folder(root: Path, per_class: int = 14, classes: int = 3, big: bool = True) -> Path:
    """Small JPEGs of mixed sizes and orientations (one big enough for draft mode) and a PNG per class."""
    pil = pytest.importorskip("PIL.Image", reason="reading image folders needs Pillow")
    rng = np.random.default_rng(1)
    shapes = [(20, 30), (33, 17), (18, 18), (70, 90) if big else (19, 25)]
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = shapes[i % len(shapes)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            suffix = ".png" if i == 5 else ".jpg"
            pil.fromarray(pixels).save(root / f"class{c}" / f"img{i:02d}{suffix}")
    return root


def test_worker_batches_equal_serial_batches_on_every_rank_and_after_resume(tmp_path):
    data = load_images(str(_jpeg_folder(tmp_path)), 16)
    n = len(data.train_y)
    assert n == 39 and len(data.val_y) == 3
    micro, world, batch = 2, 2, 3
    rows = micro * world * batch  # 12 images a step: epochs end inside steps 3 and 6
    for rank in range(world):
        for start in (0, 4):  # a fresh run, and a run resumed at step 4
            loader = train_loader(data, range(start, 8), micro, rank, world, batch, rows, 0, 7, workers=2)
            with loader:
                for step in range(start, 8):
                    for m in range(micro):
                        x, y = loader.get((step, m))
                        sx, sy = data.batch(step, m, rank, world, batch, rows, 0, 7)
                        assert x.shape == (batch, 3, 16, 16) and torch.equal(x, sx) and torch.equal(y, sy)
    # The ranks' micro-batches tile the one-process global batch, decoded or not.
    whole = data.batch(5, 0, 0, 1, rows, rows, 0, 7)[0]
    parts = [data.batch(5, m, r, world, batch, rows, 0, 7)[0] for m in range(micro) for r in range(world)]
    assert torch.equal(torch.cat(parts), whole)


def test_worker_val_batches_equal_serial_ones(tmp_path):
    data = load_images(str(_jpeg_folder(tmp_path, per_class=30)), 12)
    serial = list(data.val_batches(4, 0))
    ahead = list(data.val_batches(4, 0, workers=2, prefetch=1))
    assert [len(y) for _, y in serial] == [4, 4, 1] == [len(y) for _, y in ahead]
    for (x, y), (ax, ay) in zip(serial, ahead, strict=True):
        assert torch.equal(x, ax) and torch.equal(y, ay)
    assert len(list(data.val_batches(4, 2, workers=1))) == 2


def test_decode_contract_and_draft_mode(tmp_path):
    pil = pytest.importorskip("PIL.Image", reason="reading image folders needs Pillow")
    rng = np.random.default_rng(0)
    png, jpg = tmp_path / "a.png", tmp_path / "b.jpg"
    pil.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)).save(png)
    yy, xx = np.mgrid[0:192, 0:256] / 64.0
    smooth = np.stack([128 + 100 * np.sin(xx + k) * np.cos(yy - k) for k in range(3)], -1).astype(np.uint8)
    pil.fromarray(smooth).save(jpg, quality=95)  # 192 x 256: draft decodes it at 1/8 for size 24
    # The pre-worker decode: shorter side to `size` (bilinear), centre crop, /255, ImageNet mean and std.
    img = pil.open(png).convert("RGB").resize((33, 24), pil.BILINEAR).crop((4, 0, 28, 24))
    ref = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    ref = (ref - torch.tensor([0.485, 0.456, 0.406]).view(-1, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        -1, 1, 1
    )
    assert torch.equal(decode_image(png, 24, 3), ref)
    x = decode_image(jpg, 24, 3)
    full = pil.open(jpg).convert("RGB").resize((32, 24), pil.BILINEAR).crop((4, 0, 28, 24))
    full = torch.from_numpy(np.asarray(full, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(-1, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(-1, 1, 1)
    assert x.shape == (3, 24, 24) and ((x * std + mean) - full).abs().max() < 8 / 255  # draft: close, not equal
    assert decode_image(jpg, 24, 1).shape == (1, 24, 24)


def test_scan_matches_sorted_rglob_and_the_old_fingerprint(tmp_path):
    pil = pytest.importorskip("PIL.Image", reason="reading image folders needs Pillow")
    names = ["b.png", "a-c.png", "a/b.png", "a/z/y.PNG", "B.png", "notes.txt", ".hidden.png"]
    for c in ("dog", "cat"):
        for name in names:
            (tmp_path / c / name).parent.mkdir(parents=True, exist_ok=True)
            pil.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / c / name, format="PNG")
    classes, items = _scan(tmp_path)
    assert classes == ["cat", "dog"]
    old = [
        (str(f.relative_to(tmp_path)), y)
        for y, c in enumerate(classes)
        for f in sorted((tmp_path / c).rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
    ]
    assert items == old and len(items) == 10
    data = load_images(str(tmp_path), 4)
    split = [(str(f.relative_to(tmp_path)), int(y)) for f, y in zip(data.train_files, data.train_y, strict=True)]
    split += [(str(f.relative_to(tmp_path)), int(y)) for f, y in zip(data.val_files, data.val_y, strict=True)]
    import hashlib

    assert data.fingerprint == hashlib.sha256(repr(split).encode()).hexdigest()[:16]
    files = FileList(tmp_path, ["x/é.jpg", "y.png"])
    assert len(files) == 2 and files[0] == tmp_path / "x" / "é.jpg" and files[-1] == tmp_path / "y.png"


def test_corrupt_image_in_a_worker_is_one_error_line_naming_the_file(tmp_path, capsys):
    _jpeg_folder(tmp_path / "d", per_class=4, classes=2, big=False)
    good = (tmp_path / "d" / "class1" / "img00.jpg").read_bytes()
    cut = good.index(b"\xff\xda") + 20  # the headers and the start of the scan: opens, does not decode
    (tmp_path / "d" / "class1" / "img00.jpg").write_bytes(good[:cut])
    data = load_images(str(tmp_path / "d"), 8)  # the header check passes: the body is read by a worker
    with train_loader(data, range(0, 4), 1, 0, 1, 8, 8, 0, 0, workers=2) as loader:
        with pytest.raises(TrainerError, match=r"img00\.jpg") as err:
            for step in range(4):
                loader.get((step, 0))
    assert "\n" not in str(err.value) and "cannot decode image" in str(err.value)
    argv = ["train", "--preset=resnet-tiny", "--steps=2", "--batch_size=8", "--print_every=0", "--workers=2", *CPU_ARGV]
    assert main([*argv, f"--data={tmp_path / 'd'}", f"--out_dir={tmp_path / 'o'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot decode image") and "img00.jpg" in lines[0], lines
    # A worker that dies (out of memory, /dev/shm full) is one line too; other errors pass through.
    died = worker_failure(RuntimeError("DataLoader worker (pid 7) is killed by signal: Bus error.\nIt is possible"))
    assert str(died) == "data loading failed: DataLoader worker (pid 7) is killed by signal: Bus error. It is possible"
    assert worker_failure(RuntimeError("shape mismatch")) is None


def test_training_with_workers_matches_in_process_and_resumes(tmp_path):
    folder = _jpeg_folder(tmp_path / "d", big=False)
    common = dict(data=str(folder), steps=4, batch_size=4, grad_accum=2, eval_batches=0, eval_every=2)
    serial = train(fast_config(tmp_path / "a", "resnet-tiny", **common, workers=0))
    cfg = fast_config(tmp_path / "b", "resnet-tiny", **common, workers=2, stop_step=3)
    first = train(cfg)
    resumed = train(dataclasses.replace(cfg, stop_step=0, resume=first["checkpoint"], prefetch=1))
    losses = [r["loss"] for r in first["records"] + resumed["records"]]
    assert losses == [r["loss"] for r in serial["records"]]
    assert resumed["evals"][-1]["val_loss"] == serial["evals"][-1]["val_loss"]
    for pa, pb in zip(serial["model"].parameters(), resumed["model"].parameters(), strict=True):
        assert torch.equal(pa, pb)


def _session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Linux /proc): a trainer's leftover workers would be here."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts processes through /proc")
def test_workers_shut_down_at_exit_and_on_ctrl_c(tmp_path):
    folder = _jpeg_folder(tmp_path / "d", big=False)
    cmd = [sys.executable, "-m", "rotkern.trainers", "train", "--preset=resnet-tiny", f"--data={folder}"]
    cmd += ["--batch_size=4", "--workers=2", "--eval_batches=0", "--save=false", *CPU_ARGV]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A short run exits by itself, with no worker left behind.
    run = subprocess.Popen(
        [*cmd, "--steps=3", "--print_every=0", f"--out_dir={tmp_path / 'a'}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out, errs = run.communicate(timeout=120)
    assert run.returncode == 0, errs
    assert _session_processes(run.pid) == []
    # Ctrl-C (SIGINT to the whole process group, as a terminal sends it) in mid-run: "interrupted", exit 130, fast.
    run = subprocess.Popen(
        [*cmd, "--steps=100000", "--print_every=1", f"--out_dir={tmp_path / 'b'}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        while not (line := run.stdout.readline()).startswith("step      1/"):
            assert line, run.stderr.read()
        os.killpg(run.pid, signal.SIGINT)
        t0 = time.perf_counter()
        out, errs = run.communicate(timeout=60)
        took = time.perf_counter() - t0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130 and "interrupted" in errs and "Traceback" not in errs, errs
    assert took < 30 and _session_processes(run.pid) == []


# -- throughput (a tool, not a test: timed tests may not assert speed) -------------------------------------


def make_jpeg_folder(root: Path, images: int = 2000, side: int = 256, classes: int = 10) -> Path:
    """``images`` random ``side`` x ``side`` RGB JPEGs (quality 90) in ``classes`` class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def images_per_s(root: Path, workers: int, image_size: int = 224, batch: int = 64, prefetch: int = 2) -> dict:
    """Decode one epoch of ``root``'s training split in batches as the trainer does; images/s with start-up
    (scan, sample check, worker start) and in steady state (after the first batch), and images per CPU-second
    (this process and its workers: what the figure would be on idle cores, when other jobs share the machine)."""
    cpu0 = sum(os.times()[:4])
    t0 = time.perf_counter()
    data = load_images(str(root), image_size)
    steps = len(data.train_y) // batch
    loader = train_loader(data, range(steps), 1, 0, 1, batch, batch, 0, 0, workers=workers, prefetch=prefetch)
    with loader:
        for step in range(steps):
            x, _ = loader.get((step, 0)) if workers else data.batch(step, 0, 0, 1, batch, batch, 0, 0)
            if step == 0:
                t1 = time.perf_counter()
    t2 = time.perf_counter()
    cpu = sum(os.times()[:4]) - cpu0  # workers count once joined (the loader is closed by now)
    return {
        "workers": workers,
        "images": steps * batch,
        "images_per_s": steps * batch / (t2 - t0),
        "steady_images_per_s": (steps - 1) * batch / (t2 - t1),
        # os.times() ticks every 10 ms: a tiny run can measure no CPU time at all
        "images_per_cpu_s": steps * batch / cpu if cpu > 0 else float("inf"),
        "batch_shape": tuple(x.shape),
    }


def test_throughput_tool_runs(tmp_path):
    pytest.importorskip("PIL.Image", reason="reading image folders needs Pillow")
    root = make_jpeg_folder(tmp_path, images=40, side=40, classes=2)
    for workers in (0, 1):
        r = images_per_s(root, workers, image_size=32, batch=8)
        assert r["images"] == 32 and r["batch_shape"] == (8, 3, 32, 32) and r["images_per_s"] > 0


if __name__ == "__main__":  # python -m tests.trainers.test_trainers_data [--images 2000] [--workers 0,2]
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="images/s of the image-folder loader on a synthetic ImageFolder")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", default="0,2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        make_jpeg_folder(Path(tmp), args.images, args.side)
        print(f"{args.images} random {args.side}x{args.side} JPEGs written in {time.perf_counter() - t:.1f} s")
        print(f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), torch {torch.__version__}")
        for w in [int(v) for v in args.workers.split(",")]:
            r = images_per_s(Path(tmp), w, args.image_size, args.batch)
            print(
                f"workers={w}: {r['images_per_s']:7.0f} images/s over {r['images']} images incl. start-up, "
                f"{r['steady_images_per_s']:7.0f} after the first batch, {r['images_per_cpu_s']:5.0f} per CPU-second; "
                f"batches {r['batch_shape']}"
            )
