"""Bad input gives one `error: ...` line and exit status 2, and overwrites nothing."""

import re

import numpy as np
import pytest

from rotkern.trainers.__main__ import main

from .._trainer_helpers import CPU_ARGV

TINY = ["--steps=2", "--batch_size=2", "--context=16", "--print_every=0", "--eval_batches=1", "--block_size=64",
        *CPU_ARGV]  # fmt: skip


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_train_cli_runs_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["train", *TINY, "--print_every=1", f"--out_dir={tmp_path}"]) == 0
    assert "step      2/2" in capsys.readouterr().out
    before = (tmp_path / "ckpt.pt").read_bytes()
    assert "already exists" in _error(capsys, ["train", *TINY, f"--out_dir={tmp_path}"])
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_missing_data_path(tmp_path, capsys):
    assert "does not exist" in _error(capsys, ["train", *TINY, f"--data={tmp_path}/nope", f"--out_dir={tmp_path}/o"])


def test_empty_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "is empty" in _error(capsys, ["train", *TINY, f"--data={tmp_path}/empty.txt", f"--out_dir={tmp_path}/o"])


def test_token_ids_beyond_the_vocabulary(tmp_path, capsys):
    np.full(500, 300, np.uint16).tofile(tmp_path / "train.bin")
    np.full(100, 300, np.uint16).tofile(tmp_path / "val.bin")
    msg = _error(capsys, ["train", *TINY, f"--data={tmp_path}", f"--out_dir={tmp_path}/o"])
    assert "token id 300 is beyond the model's vocabulary (256)" in msg


def test_unreadable_image(tmp_path, capsys):
    pil = pytest.importorskip("PIL.Image", reason="reading image folders needs Pillow")
    (tmp_path / "a").mkdir()
    pil.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    msg = _error(
        capsys, ["train", "--preset=resnet-tiny", *TINY[:2], *CPU_ARGV, f"--data={tmp_path}", f"--out_dir={tmp_path}/o"]
    )
    assert "bad.jpg" in msg


def test_checkpoint_from_another_scope_or_model(tmp_path, capsys):
    assert main(["train", *TINY, "--rotation=global", f"--out_dir={tmp_path}/a"]) == 0
    ckpt = tmp_path / "a" / "ckpt.pt"
    before = ckpt.read_bytes()
    msg = _error(
        capsys, ["train", *TINY, "--steps=4", "--rotation=input", f"--resume={ckpt}", f"--out_dir={tmp_path}/b"]
    )
    assert "rotation is 'global' in the checkpoint but 'input'" in msg
    msg = _error(
        capsys, ["train", "--preset=vit-tiny", "--steps=4", *CPU_ARGV, f"--resume={ckpt}", f"--out_dir={tmp_path}/c"]
    )
    assert "holds model 'gpt-tiny'" in msg
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert "cannot read checkpoint" in _error(capsys, ["train", *TINY, f"--resume={tmp_path}/junk.pt"])
    assert ckpt.read_bytes() == before


def test_bad_options(capsys):
    assert "unknown preset" in _error(capsys, ["train", "--preset=huge"])
    assert "--rotation='diagonal' is not one of" in _error(capsys, ["train", "--rotation=diagonal"])
    assert "--scopes" in _error(capsys, ["compare", "--scopes=none,sideways"])


def test_quadratic_still_runs(tmp_path):
    assert main(["quadratic", "--steps=5", "--dim=4", "--plot=false", f"--out_dir={tmp_path}"]) == 0


@pytest.mark.parametrize("command", ["train", "compare", "validate", "quadratic", "analyze"])
def test_every_option_explains_itself(command, capsys):
    """Each option's --help text comes from its dataclass field's comment, with the default after it."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    options = re.findall(r"^  (--\w+) \w+", out, flags=re.M)
    assert len(options) > 5
    bare = re.findall(r"^  (--\w+) \w+ +default", out, flags=re.M)
    assert bare == [], f"options without a description: {bare}"


@pytest.mark.parametrize(
    ("command", "absent", "present"),
    [
        ("train", [], ["--rotation", "--optimizer", "--switch_at", "--resume"]),
        ("compare", ["--rotation", "--switch_at", "--switch_to", "--resume"], ["--scopes", "--seeds", "--optimizer"]),
        (
            "validate",
            ["--rotation", "--optimizer", "--svd_every", "--resume", "--eval_every"],
            ["--scopes", "--backend"],
        ),
    ],
)
def test_options_that_do_not_apply_are_not_shown(command, absent, present, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = set(re.findall(r"^  (--\w+)", capsys.readouterr().out, flags=re.M))
    assert not shown & set(absent) and set(present) <= shown
    if absent:
        assert main([command, f"{absent[0]}=x"]) == 2
        assert f"{absent[0]}: this command sets it itself or does not use it" in capsys.readouterr().err


def test_field_comments_read_the_source():
    from rotkern.trainers.common import field_comments
    from rotkern.trainers.compare import CompareConfig

    text = field_comments(CompareConfig)
    assert text["block_size"].startswith("Haar block size n")  # inherited from TrainConfig
    assert "rotation scopes" in text["scopes"] and "muon" in text["optimizer"]  # own field; comment lines above


def test_resume_takes_a_run_folder(tmp_path):
    import dataclasses

    from rotkern.trainers.train import train

    from .._trainer_helpers import fast_config

    cfg = fast_config(tmp_path / "r", steps=6, stop_step=3)
    first = train(cfg)
    resumed = train(dataclasses.replace(cfg, stop_step=0, resume=str(tmp_path / "r")))
    assert resumed["records"][0]["step"] == 4 and resumed["checkpoint"] == first["checkpoint"]


# Three bad numeric values per command: each is refused before any work, in one line naming the option, the
# allowed range and a value that works (the option's default).
BAD_VALUES = {
    "train": [("--lr=-1", "> 0"), ("--block_size=0", "in [1, 4096]"), ("--block_size=10000", "in [1, 4096]")],
    "compare": [("--lr=nan", "> 0"), ("--ema=1", "in [0, 1)"), ("--steps=0", ">= 1")],
    "validate": [("--beta2=1.5", "in [0, 1)"), ("--eps=0", "> 0"), ("--seed=-1", "in [0, ")],
    "quadratic": [("--dim=0", "in [1, 4096]"), ("--steps=-5", ">= 1"), ("--condition=0.5", ">= 1")],
    "analyze": [("--batches=0", ">= 1"), ("--hvp_batches=-1", ">= 1"), ("--approx_tol=-0.1", ">= 0")],
}


@pytest.mark.parametrize(
    "command,option,allowed", [(c, o, a) for c, bad in BAD_VALUES.items() for o, a in bad], ids=lambda v: str(v)
)
def test_a_bad_numeric_value_is_one_error_line(command, option, allowed, tmp_path, capsys):
    name = option.split("=")[0]
    paths = [str(tmp_path)] if command == "analyze" else []
    msg = _error(capsys, [command, *paths, option, f"--out_dir={tmp_path}/o"])
    assert msg.startswith(f"error: {option}") and "out of range" in msg and allowed in msg, msg
    assert f"(e.g. {name}=" in msg  # the fix: a value in range
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_backend_this_device_lacks_is_one_error_line(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    msg = _error(capsys, ["validate", "--backend=triton", *CPU_ARGV, f"--out_dir={tmp_path}/o"])
    assert "--backend=triton" in msg and "--backend=auto" in msg


def test_hadamard_needs_a_power_of_two_block(tmp_path, capsys):
    msg = _error(capsys, ["train", "--structure=hadamard", "--block_size=100", f"--out_dir={tmp_path}/o"])
    assert "--block_size=64 or 128" in msg


def test_a_checkpoint_of_the_old_embedding_default_names_the_option_to_resume_it(tmp_path, capsys):
    """Runs saved when embedding='transposed' was the default resume with --embedding=transposed, as they were."""
    args = ["train", *TINY, "--optimizer=rotated-eager", "--rotation=output", "--steps=4"]
    assert main([*args, "--embedding=transposed", "--stop_step=2", f"--out_dir={tmp_path}"]) == 0
    ckpt = str(tmp_path / "ckpt.pt")
    msg = _error(capsys, [*args, f"--resume={ckpt}"])
    assert "embedding is 'transposed' in the checkpoint" in msg and "pass --embedding='transposed'" in msg
    assert main([*args, "--embedding=transposed", f"--resume={ckpt}"]) == 0
