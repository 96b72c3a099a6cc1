"""The training command line: mixed precision, compile, honest model selection, downloads,
and one-line errors (exit status 2, no traceback) for what a user can get wrong."""
import functools
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from capsrouting import evaluate, train


def _train(mnist_dir, out_dir, *extra):
    args = ["--data-dir", str(mnist_dir), "--train-subset", "128", "--val-size", "300", "--test-subset", "100",
            "--batch-size", "32", "--max-steps", "2", "--out-dir", str(out_dir), "--no-progress", *extra]
    assert train.main(args) == 0
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_bf16_autocast_training(mnist_dir, tmp_path):
    log = _train(mnist_dir, tmp_path, "--amp", "bf16", "--epochs", "1")
    assert log[0]["amp"] == "bf16" and 0 < log[0]["train_loss"] < 10 and 0 <= log[0]["val_error"] <= 1
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())


def test_compiled_training(mnist_dir, tmp_path):
    log = _train(mnist_dir, tmp_path, "--compile", "--epochs", "1", "--no-reconstruction")
    assert log[0]["train_loss"] > 0 and log[0]["last_step_loss"] < log[0]["first_step_loss"] * 1.5


def test_best_checkpoint_is_chosen_on_validation_and_test_is_only_logged(mnist_dir, tmp_path):
    log = _train(mnist_dir, tmp_path, "--epochs", "3", "--no-reconstruction")
    assert all(r["val_error"] is not None and r["test_error"] is not None for r in log)
    best_epoch = min(log, key=lambda r: (r["val_error"], r["epoch"]))["epoch"]
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] + 1 == best_epoch
    assert log[-1]["best_val_error"] == min(r["val_error"] for r in log)


def test_validation_images_are_held_out_from_training(mnist_dir, monkeypatch, tmp_path):
    """The trained images are the first 60000 - N; the last N only ever reach the evaluation."""
    seen = []
    real = train.prepare_images

    def spy(images, canvas, shift, generator):
        seen.append((images.clone(), generator is not None))
        return real(images, canvas, shift, generator)

    monkeypatch.setattr(train, "prepare_images", spy)
    from capsrouting import data

    images, _ = data.load_mnist(mnist_dir, "train")
    args = ["--data-dir", str(mnist_dir), "--val-size", "300", "--test-subset", "50", "--batch-size", "64",
            "--max-steps", "2", "--epochs", "1", "--out-dir", str(tmp_path), "--no-progress", "--no-reconstruction"]
    assert train.main(args) == 0
    trained = torch.cat([x for x, augmented in seen if augmented])
    validation = images[-300:]
    assert any(x.shape[0] == 300 and torch.equal(x, validation) and not augmented for x, augmented in seen)
    hold_out = {bytes(v.numpy()) for v in validation}
    assert not any(bytes(t.numpy()) in hold_out for t in trained)


def test_patience_stops_early(mnist_dir, tmp_path):
    # lr 0: nothing improves after the first epoch, so patience 1 stops after the second.
    log = _train(mnist_dir, tmp_path, "--epochs", "5", "--lr", "0", "--patience", "1", "--no-reconstruction")
    assert [r["epoch"] for r in log] == [1, 2]


@pytest.fixture
def mirror(mnist_dir):
    """A local HTTP server holding the gzipped MNIST files, as a download mirror."""
    handler = functools.partial(QuietHandler, directory=str(mnist_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_fetches_into_the_cache(mnist_dir, mirror, monkeypatch, tmp_path):
    if not (mnist_dir / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("the MNIST directory holds no .gz files to serve")
    monkeypatch.delenv("CAPSROUTING_DATA", raising=False)
    monkeypatch.setenv("CAPSROUTING_MNIST_MIRRORS", mirror)
    monkeypatch.setenv("CAPSROUTING_CACHE", str(tmp_path / "cache"))
    args = ["--download", "--train-subset", "64", "--val-size", "100", "--test-subset", "50", "--batch-size", "32",
            "--max-steps", "1", "--epochs", "1", "--out-dir", str(tmp_path / "run"), "--no-progress", "--no-reconstruction"]
    assert train.main(args) == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f"{name}.gz" for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


def _cli(module, *args, env=None):
    environment = dict(os.environ, **(env or {}))
    environment.pop("CAPSROUTING_DATA", None)
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300, env=environment)
    return result.returncode, result.stderr.strip().splitlines()


@pytest.mark.parametrize("args,expected", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--amp", "fp8"], "argument --amp: invalid choice"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
    (["--val-size", "-1"], "--val-size must be >= 0"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags_get_one_line(args, expected):
    code, lines = _cli("capsrouting.train", *args)
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines


def test_missing_data_gets_one_line_naming_download(tmp_path):
    code, lines = _cli("capsrouting.train", "--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "run"))
    assert code == 2 and len(lines) == 1, lines
    assert "MNIST files not found" in lines[0] and "--download" in lines[0]


def test_unreadable_checkpoints_get_one_line(mnist_dir, tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    code, lines = _cli("capsrouting.train", "--data-dir", str(mnist_dir), "--out-dir", str(tmp_path), "--resume",
                       "--train-subset", "64", "--val-size", "100")
    assert code == 2 and len(lines) == 1 and "cannot read checkpoint" in lines[0], lines
    code, lines = _cli("capsrouting.evaluate", str(tmp_path / "last.pt"), "--data-dir", str(mnist_dir))
    assert code == 2 and len(lines) == 1 and "cannot read checkpoint" in lines[0], lines
    code, lines = _cli("capsrouting.evaluate", str(tmp_path / "missing.pt"), "--data-dir", str(mnist_dir))
    assert code == 2 and len(lines) == 1 and "does not exist" in lines[0], lines


def test_evaluate_reads_checkpoints_from_before_amp(mnist_dir, tmp_path):
    _train(mnist_dir, tmp_path, "--epochs", "1", "--no-reconstruction")
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["config"]["amp"]
    torch.save(state, tmp_path / "old.pt")
    model, config = evaluate.load_checkpoint(tmp_path / "old.pt", "cpu")
    assert config["amp"] == "off"


def test_training_curves_and_pictures(mnist_dir, tmp_path):
    _train(mnist_dir, tmp_path, "--epochs", "2")
    assert evaluate.main(["--curves", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 5000
    model, config = evaluate.load_checkpoint(tmp_path / "last.pt", "cpu")
    from capsrouting import data

    images = train.prepare_images(data.load_mnist(mnist_dir, "test")[0][:4], None, 0, None)
    written = evaluate.pictures(model, config, images, tmp_path / "pictures")
    assert [p.name for p in written] == ["reconstructions.png", "perturbations.png"]
    assert all(p.stat().st_size > 2000 for p in written)


def test_curves_of_a_directory_without_a_log_get_one_line(tmp_path):
    code, lines = _cli("capsrouting.evaluate", "--curves", str(tmp_path))
    assert code == 2 and len(lines) == 1 and "log.jsonl does not exist" in lines[0], lines


def test_tensorboard_scalars(mnist_dir, tmp_path):
    pytest.importorskip("tensorboard")
    _train(mnist_dir, tmp_path, "--epochs", "1", "--tensorboard", "--no-reconstruction")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train_loss", "val_error", "test_error", "lr"} <= set(events.Tags()["scalars"])


def test_tensorboard_missing_says_what_to_install(mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    args = ["--data-dir", str(mnist_dir), "--train-subset", "64", "--val-size", "100", "--out-dir", str(tmp_path), "--tensorboard"]
    assert train.main(args) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "--tensorboard needs the tensorboard package" in line and "pip install tensorboard" in line


def test_resume_refuses_a_run_with_other_data_options(mnist_dir, tmp_path, capsys):
    _train(mnist_dir, tmp_path, "--epochs", "1", "--no-reconstruction")
    capsys.readouterr()  # the first run's epoch line
    args = ["--data-dir", str(mnist_dir), "--train-subset", "128", "--val-size", "200", "--test-subset", "100",
            "--batch-size", "32", "--max-steps", "2", "--out-dir", str(tmp_path), "--no-progress", "--epochs", "2",
            "--no-reconstruction", "--resume"]
    assert train.main(args) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "was trained with --val-size 300, this run asks for 200" in line
