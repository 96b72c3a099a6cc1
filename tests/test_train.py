"""The training and evaluation tools on a small slice of the real MNIST files (skipped without them)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from capsrouting import evaluate, train


def _train(mnist_dir, out_dir, *extra):
    args = ["--data-dir", str(mnist_dir), "--train-subset", "256", "--val-size", "200", "--test-subset", "200", "--batch-size", "32",
            "--out-dir", str(out_dir), "--no-progress", *extra]
    assert train.main(args) == 0
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["capsnet", "baseline"])
def test_smoke_training_writes_log_checkpoints_and_the_loss_falls(mnist_dir, tmp_path, model):
    log = _train(mnist_dir, tmp_path, "--model", model, "--epochs", "2", "--lr", "3e-4" if model == "baseline" else "1e-3")
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[1]["train_loss"] < log[0]["train_loss"] and log[1]["last_step_loss"] < log[0]["first_step_loss"]
    assert log[1]["lr"] == pytest.approx(log[0]["lr"] * 0.96)
    assert all(0 <= r["test_error"] <= 1 and r["images_per_second"] > 0 for r in log)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and (tmp_path / "best.pt").exists() and not list(tmp_path.glob("*.tmp"))
    if model == "capsnet":
        written = evaluate.pictures(*evaluate.load_checkpoint(tmp_path / "last.pt", "cpu"),
                                    train.prepare_images(torch.zeros(8, 28, 28, dtype=torch.uint8), None, 0, None), tmp_path / "pictures")
        assert all(p.stat().st_size > 500 for p in written)


def test_resumed_run_ends_with_the_same_weights(mnist_dir, tmp_path):
    extra = ["--epochs", "2", "--shift", "2", "--max-steps", "3"]
    _train(mnist_dir, tmp_path / "straight", *extra)
    _train(mnist_dir, tmp_path / "resumed", "--epochs", "1", "--shift", "2", "--max-steps", "3")
    _train(mnist_dir, tmp_path / "resumed", *extra, "--resume")
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 1
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name


def test_routing_bias_trains_the_official_digit_bias_and_must_match_on_resume(mnist_dir, tmp_path, capsys):
    _train(mnist_dir, tmp_path, "--routing-bias", "--epochs", "1", "--max-steps", "2", "--no-reconstruction")
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    bias = state["model"]["digit_caps.bias"]
    assert bias.shape == (10, 16) and not torch.equal(bias, torch.full_like(bias, 0.1))  # it learned
    model, _ = evaluate.load_checkpoint(tmp_path / "last.pt", "cpu")
    assert model.digit_caps.bias is not None
    capsys.readouterr()
    status = train.main(["--data-dir", str(mnist_dir), "--train-subset", "256", "--val-size", "200", "--batch-size", "32",
                         "--epochs", "2", "--max-steps", "2", "--no-reconstruction", "--out-dir", str(tmp_path),
                         "--no-progress", "--resume"])
    assert status != 0 and "was trained with --routing-bias True, this run asks for False" in capsys.readouterr().err


def test_canvas_training_and_the_affine_table(mnist_dir, tmp_path, capsys):
    _train(mnist_dir, tmp_path, "--canvas", "40", "--epochs", "1", "--max-steps", "2", "--no-reconstruction")
    assert evaluate.main([str(tmp_path / "last.pt"), "--data-dir", str(mnist_dir), "--affine", "--test-subset", "100"]) == 0
    out = capsys.readouterr().out
    assert "expanded, 40x40" in out and "affNIST-like accuracy" in out


def test_affine_test_set_is_deterministic_and_moves_the_digits():
    images = (torch.rand(6, 28, 28) * 255).to(torch.uint8)
    a, b = evaluate.affine_test_set(images, 40, seed=3), evaluate.affine_test_set(images, 40, seed=3)
    assert a.shape == (6, 1, 40, 40) and torch.equal(a, b)
    centered = train.prepare_images(images, 40, 0, None)
    assert not torch.allclose(a, centered, atol=1e-3)
    assert not torch.equal(a, evaluate.affine_test_set(images, 40, seed=4))


def test_affine_parameters_fill_their_ranges():
    params = evaluate.affine_parameters(4000, seed=0)
    ranges = evaluate.AFFINE_RANGES
    expected = dict(rotation_degrees=ranges["rotation_degrees"], shear=ranges["shear"], scale_x=ranges["scale"],
                    scale_y=ranges["scale"], translation_x=ranges["translation_pixels"], translation_y=ranges["translation_pixels"])
    assert set(params) == set(expected)
    for name, (low, high) in expected.items():
        values = params[name]
        assert low <= values.min() and values.max() <= high, name
        # uniform: the draws reach within 1% of both ends of the range
        assert values.min() < low + 0.01 * (high - low) and values.max() > high - 0.01 * (high - low), name
    assert ranges == dict(rotation_degrees=(-20.0, 20.0), shear=(-0.2, 0.2), scale=(0.8, 1.2), translation_pixels=(-6.0, 6.0))


def _centroid(image):
    rows, cols = torch.meshgrid(torch.arange(image.shape[0], dtype=torch.float64), torch.arange(image.shape[1], dtype=torch.float64), indexing="ij")
    mass = image.double().sum()
    return torch.stack([(image * cols).sum() / mass, (image * rows).sum() / mass])  # (x, y) in pixels


@pytest.mark.parametrize("name,value", [("rotation_degrees", 20.0), ("shear", 0.2), ("scale_x", 1.2), ("scale_y", 0.8),
                                        ("translation_x", 6.0), ("translation_y", -6.0)])
def test_apply_affine_moves_a_spot_where_its_parameters_say(name, value):
    """A spot off the center moves by the map each parameter names (about the canvas center, in pixels)."""
    size = 40
    image = torch.zeros(1, 1, size, size)
    image[0, 0, 9:12, 24:27] = 1.0  # a spot at (x, y) = (25, 10); the center is (19.5, 19.5)
    params = dict(rotation_degrees=0.0, shear=0.0, scale_x=1.0, scale_y=1.0, translation_x=0.0, translation_y=0.0)
    params[name] = value
    moved = evaluate.apply_affine(image, {k: torch.tensor([v], dtype=torch.float64) for k, v in params.items()})
    x, y = 25.0 - 19.5, 10.0 - 19.5  # relative to the center
    a = math.radians(params["rotation_degrees"])
    x, y = params["scale_x"] * x, params["scale_y"] * y
    x = x + params["shear"] * y
    x, y = math.cos(a) * x - math.sin(a) * y, math.sin(a) * x + math.cos(a) * y
    want = torch.tensor([x + 19.5 + params["translation_x"], y + 19.5 + params["translation_y"]], dtype=torch.float64)
    torch.testing.assert_close(_centroid(moved[0, 0]), want, rtol=0, atol=0.15)


def test_two_process_ddp_keeps_replicas_identical(mnist_dir, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "capsrouting.train", "--data-dir", str(mnist_dir), "--train-subset", "256", "--val-size", "100",
               "--test-subset", "100", "--batch-size", "16", "--epochs", "1", "--max-steps", "3", "--out-dir", str(tmp_path), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    replicas = records[-1]
    assert replicas["event"] == "replicas" and len(replicas["checksums"]) == 2 and replicas["identical"]
