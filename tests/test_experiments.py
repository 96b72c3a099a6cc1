"""The paper's experiments: the shared trainer (resume, reuse, target stop), the MultiMNIST
generator and its metric and losses against hand-computed cases, the affNIST reader, and each
experiment end to end on a slice of the real MNIST files."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from capsrouting import losses
from capsrouting.experiments import common
from capsrouting.experiments.affnist import AffNISTError, read_affnist
from capsrouting.models import AffineBaselineCNN, CapsNet, MultiMNISTBaselineCNN
from capsrouting.multimnist import MultiMNIST, both_right, bounding_box_overlap, place


# --- the shared trainer -------------------------------------------------------------------

class _Stop(Exception):
    pass


def _toy_run(run_dir, steps=6, stop_at=None, target=None, validate=None, config=None):
    """A linear classifier on fixed random data, trained by common.train_run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.randn(40, 4, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 3
    calls = []

    def train_step(model, step):
        if step == stop_at:
            raise _Stop
        calls.append(step)
        idx = common.batch_indices(40, 8, seed=0, step=step)
        return nn.functional.cross_entropy(model(x[idx]), y[idx])

    validate = validate or (lambda m: float((m(x).argmax(1) == y).float().mean()))
    budget = common.Budget(steps=steps, batch_size=8, eval_every=2, target_accuracy=target)
    result = common.train_run(run_dir, model, train_step, validate, lambda m: dict(test_metric=1.5), budget, seed=0,
                              config=config or dict(name="toy"), device="cpu", log=lambda text: None)
    return model, result, calls


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    straight, result, _ = _toy_run(tmp_path / "straight")
    with pytest.raises(_Stop):
        _toy_run(tmp_path / "resumed", stop_at=5)
    assert (tmp_path / "resumed" / "state.pt").exists()  # checkpointed at step 4
    resumed, resumed_result, calls = _toy_run(tmp_path / "resumed")
    assert calls == [4, 5]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert result["val_accuracy"] == resumed_result["val_accuracy"] and result["test_metric"] == 1.5
    assert [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()] == [2, 4, 6]


def test_a_finished_run_is_reused_and_another_config_is_refused(tmp_path):
    _, first, _ = _toy_run(tmp_path)
    assert not (tmp_path / "state.pt").exists() and (tmp_path / "best.pt").exists()
    _, again, calls = _toy_run(tmp_path)
    assert calls == [] and again == first
    with pytest.raises(common.CommandError, match="other settings"):
        _toy_run(tmp_path, config=dict(name="other"))


def test_a_finished_result_without_its_weights_is_reused_only_where_no_weights_are_needed(tmp_path):
    _, first, _ = _toy_run(tmp_path)
    (tmp_path / "best.pt").unlink()  # the result.json alone, as carried to another machine
    with pytest.raises(common.CommandError, match="without its best weights"):
        _toy_run(tmp_path)
    model = nn.Linear(4, 3)
    before = model.weight.detach().clone()
    again = common.train_run(tmp_path, model, None, None, None, common.Budget(steps=6, batch_size=8, eval_every=2),
                             seed=0, config=dict(name="toy"), device="cpu", log=lambda text: None, weights_needed=False)
    assert again == first and torch.equal(model.weight, before)


def test_the_best_validation_weights_are_kept_and_the_target_stops_training(tmp_path):
    accuracies = iter([0.5, 0.9, 0.7])
    _, result, calls = _toy_run(tmp_path / "best", validate=lambda m: next(accuracies))
    assert (result["best_step"], result["val_accuracy"], result["steps"]) == (4, 0.9, 6)
    _, result, calls = _toy_run(tmp_path / "target", target=0.8, validate=lambda m: 0.85)
    assert calls == [0, 1] and result["reached_target"] and result["steps"] == 2


def test_batches_walk_seeded_epochs_without_repeats():
    first_epoch = torch.cat([common.batch_indices(40, 8, seed=3, step=s) for s in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(40))
    assert torch.equal(common.batch_indices(40, 8, 3, 7), common.batch_indices(40, 8, 3, 7))
    assert not torch.equal(common.batch_indices(40, 8, 3, 0), common.batch_indices(40, 8, 4, 0))
    assert common.batch_indices(5, 8, 0, 0).shape == (8,)


def test_balanced_subsets_hold_every_class_equally():
    labels = torch.arange(1000) % 10
    subset = common.balanced_subset(labels, 50, seed=1)
    assert torch.equal(torch.bincount(labels[subset]), torch.full((10,), 5)) and len(subset.unique()) == 50
    assert torch.equal(subset, common.balanced_subset(labels, 50, seed=1))
    assert not torch.equal(subset, common.balanced_subset(labels, 50, seed=2))
    with pytest.raises(ValueError, match="multiple of 10"):
        common.balanced_subset(labels, 55, seed=0)
    with pytest.raises(ValueError, match="class 0 has 100"):
        common.balanced_subset(labels, 1010, seed=0)


# --- models and losses --------------------------------------------------------------------

def test_baseline_parameter_counts():
    count = common.parameter_count
    capsnet40 = count(CapsNet(input_size=40))
    assert capsnet40 == 13_475_648
    assert abs(count(AffineBaselineCNN()) / capsnet40 - 1) <= 0.25
    assert count(MultiMNISTBaselineCNN()) == 24_563_978  # the paper's 24.56 M
    assert MultiMNISTBaselineCNN()(torch.rand(2, 1, 36, 36)).shape == (2, 10)
    assert AffineBaselineCNN()(torch.rand(2, 1, 40, 40)).shape == (2, 10)


def test_two_digit_margin_loss_by_hand():
    lengths = torch.tensor([[0.95, 0.5, 0.05, 0.3]])
    # present: classes 0 and 1 -> (0.9-0.95)+ = 0 and (0.9-0.5)^2 = 0.16;
    # absent: 0.5 * ((0.05-0.1)+ = 0 and (0.3-0.1)^2 = 0.04) = 0.02
    assert losses.margin_loss(lengths, torch.tensor([[1, 0]])).item() == pytest.approx(0.18)
    with pytest.raises(ValueError, match="different classes"):
        losses.margin_loss(lengths, torch.tensor([[1, 1]]))


def test_multilabel_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    t = torch.tensor([1.0, 0.0, 1.0])
    expected = -(t * torch.log(torch.sigmoid(logits[0])) + (1 - t) * torch.log(1 - torch.sigmoid(logits[0]))).sum()
    assert losses.multilabel_cross_entropy(logits, torch.tensor([[2, 0]])).item() == pytest.approx(expected.item())


def test_two_digit_reconstruction_loss_and_masking():
    torch.manual_seed(0)
    model = CapsNet(input_size=36, num_iterations=1)
    x, labels = torch.rand(3, 1, 36, 36), torch.tensor([[1, 2], [3, 4], [5, 0]])
    out = model(x, labels)
    assert out.reconstructions.shape == (3, 2, 36 * 36)
    for digit in range(2):
        alone = model.reconstruct(out.digit_caps, labels[:, digit])
        torch.testing.assert_close(out.reconstructions[:, digit], alone)
    singles = torch.rand(3, 2, 36, 36)
    expected = losses.margin_loss(out.lengths, labels) + sum(
        0.0005 * ((out.reconstructions[:, d] - singles[:, d].flatten(1)) ** 2).sum(1).mean() for d in range(2))
    torch.testing.assert_close(losses.capsnet_loss(out, singles, labels), expected)
    model.eval()  # labels only say how many digits: the two longest capsules are decoded
    evaluated = model(x, labels)
    longest = evaluated.lengths.topk(2, dim=1).indices
    torch.testing.assert_close(evaluated.reconstructions, model.reconstruct(evaluated.digit_caps, longest))


# --- MultiMNIST ---------------------------------------------------------------------------

def _digits(n=60):
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 4:24, 6:22] = torch.randint(1, 256, (n, 20, 16), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 10


def test_multimnist_pairs_differ_in_class_stay_within_the_shifts_and_sum_clipped():
    images, labels = _digits()
    data = MultiMNIST(images, labels, pairs_per_image=3, seed=5)
    assert len(data) == 180
    batch = data.batch(torch.arange(180))
    assert batch.images.shape == (180, 36, 36) and batch.singles.shape == (180, 2, 36, 36)
    assert bool((batch.labels[:, 0] != batch.labels[:, 1]).all())
    assert torch.equal(batch.labels[:, 0], labels.repeat_interleave(3))
    expected = (batch.singles[:, 0].int() + batch.singles[:, 1].int()).clamp(max=255).to(torch.uint8)
    assert torch.equal(batch.images, expected) and bool((batch.images == 255).any())
    # Each single is its digit, whole, moved by at most 4 pixels from the center of the canvas.
    for k in range(2):
        source = images[data.base] if k == 0 else images[data.partner]
        assert torch.equal(batch.singles[:, k].sum(dim=(1, 2), dtype=torch.int64), source.sum(dim=(1, 2), dtype=torch.int64))
        rows = batch.singles[:, k].amax(dim=2).bool().int().argmax(dim=1)  # first nonzero row: 4 + 4 + dy
        assert int(rows.min()) >= 4 and int(rows.max()) <= 12
    assert int(data.shifts.abs().max()) == 4 and set(data.shifts.flatten().tolist()) == set(range(-4, 5))


def test_multimnist_is_deterministic_per_seed():
    images, labels = _digits()
    a, b, c = (MultiMNIST(images, labels, 2, seed=s).batch(torch.arange(50)) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.images, c.images)


def test_place_moves_a_pixel_by_the_shift():
    digit = torch.zeros(1, 28, 28, dtype=torch.uint8)
    digit[0, 0, 0] = 7
    out = place(digit.expand(2, -1, -1), torch.tensor([[3, -4], [-4, 2]]))
    assert out[0, 4 + 3, 4 - 4] == 7 and out[1, 0, 6] == 7 and int(out.sum()) == 14
    with pytest.raises(ValueError, match="canvas"):
        place(digit, torch.tensor([[5, 0]]))


def test_bounding_box_overlap_by_hand():
    singles = torch.zeros(1, 2, 10, 10)
    singles[0, 0, 0:4, 0:4] = 1  # 16 pixels
    singles[0, 1, 2:4, 2:6] = 1  # 8 pixels, 4 of them inside the first box
    overlap = bounding_box_overlap(singles)
    assert overlap["iou"] == pytest.approx(4 / 20) and overlap["over_smaller"] == pytest.approx(4 / 8)


def test_both_right_needs_both_digits_in_any_order():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.9, 0.1, 0.8, 0.0], [0.1, 0.2, 0.3, 0.4]])
    labels = torch.tensor([[2, 0], [0, 1], [3, 2]])
    assert both_right(scores, labels).tolist() == [True, False, True]


# --- affNIST ------------------------------------------------------------------------------

def _write_affnist(path, images, labels):
    scipy_io = pytest.importorskip("scipy.io")
    # As distributed: a struct affNISTdata, image 1600 x N (one row-major 40 x 40 image per column).
    scipy_io.savemat(path, {"affNISTdata": {"image": images.reshape(len(images), -1).T.numpy(),
                                            "label_int": labels.numpy().reshape(1, -1).astype("uint8"),
                                            "label_one_of_n": torch.eye(10)[labels].T.numpy()}})


def test_affnist_reader_reads_the_distributed_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 40, 40), generator=g, dtype=torch.uint8)
    images[:, 0, :] = 0
    images[:, 5, 9] = 255  # an asymmetric mark: a transposed read would move it
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    _write_affnist(tmp_path / "2.mat", images[4:], labels[4:])
    _write_affnist(tmp_path / "1.mat", images[:4], labels[:4])
    read_images, read_labels = read_affnist(tmp_path)
    assert torch.equal(read_images, images) and torch.equal(read_labels, labels)
    first_images, first_labels = read_affnist(tmp_path, limit=2)
    assert torch.equal(first_images, images[:2]) and torch.equal(first_labels, labels[:2])
    (tmp_path / "3.mat").write_bytes(b"not a mat file")
    with pytest.raises(AffNISTError, match="3.mat"):
        read_affnist(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_affnist(tmp_path / "empty")


def test_affnist_reader_rejects_other_structs(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(tmp_path / "1.mat", {"affNISTdata": {"image": torch.zeros(784, 2).numpy(), "label_int": [[1, 2]]}})
    with pytest.raises(AffNISTError, match="1600 x N"):
        read_affnist(tmp_path)
    scipy_io.savemat(tmp_path / "1.mat", {"other": [[1]]})
    with pytest.raises(AffNISTError, match="no affNISTdata"):
        read_affnist(tmp_path)


# --- the experiments, end to end ----------------------------------------------------------

def _experiment(mnist_dir, tmp_path, name, *extra):
    args = [sys.executable, "-m", "capsrouting.experiments", name, "--preset", "smoke", "--data-dir", str(mnist_dir),
            "--out-dir", str(tmp_path), "--quiet", *extra]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_affine_experiment_end_to_end(mnist_dir, tmp_path):
    affnist_dir = tmp_path / "affnist"
    affnist_dir.mkdir()
    _write_affnist(affnist_dir / "1.mat", torch.zeros(20, 40, 40, dtype=torch.uint8), torch.arange(20) % 10)
    out = _experiment(mnist_dir, tmp_path, "affine", "--affnist-dir", str(affnist_dir))
    table = (tmp_path / "table.md").read_text()
    assert table in out and "CapsNet" in table and "CNN baseline" in table and "| affNIST |" in table
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(results) == {"capsnet", "baseline"}
    assert all(0 <= r[k] <= 1 for r in results.values() for k in ("expanded_accuracy", "affine_accuracy", "affnist_accuracy"))
    assert (tmp_path / "affine_predictions.png").stat().st_size > 1000
    again = _experiment(mnist_dir, tmp_path, "affine", "--affnist-dir", str(affnist_dir))  # finished runs are reused
    assert again.split("machine:")[0] == out.split("machine:")[0]


def test_data_efficiency_experiment_end_to_end(mnist_dir, tmp_path):
    out = _experiment(mnist_dir, tmp_path, "data-efficiency")
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["model"], r["size"], r["seed"]) for r in runs) == sorted(
        (m, s, seed) for m in ("capsnet", "baseline") for s in (10, 20) for seed in (0, 1))
    assert "| 10 | 2 |" in out and (tmp_path / "data_efficiency.png").stat().st_size > 1000
    # The baseline trains at its own learning rate (it diverges at CapsNet's).
    from capsrouting.experiments.data_efficiency import BASELINE_LR

    rates = {r["model"]: json.loads((tmp_path / f"{r['model']}-{r['size']}-seed{r['seed']}" / "result.json").read_text())
             ["config"]["budget"]["lr"] for r in runs}
    assert rates == {"capsnet": 1e-3, "baseline": BASELINE_LR}


def test_multimnist_experiment_end_to_end(mnist_dir, tmp_path):
    out = _experiment(mnist_dir, tmp_path, "multimnist")
    summary = json.loads((tmp_path / "results.json").read_text())
    assert set(summary["results"]) == {"capsnet", "baseline"} and summary["test_pairs"] == 20
    assert 0 < summary["bounding_box_overlap"]["iou"] < summary["bounding_box_overlap"]["over_smaller"] <= 1
    assert "mean IoU" in out and (tmp_path / "multimnist_reconstructions.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["nonsense"], "unknown experiment 'nonsense'"),
    (["affine", "--steps", "0"], "--steps must be >= 1"),
    (["affine", "--models", "capsnet,resnet"], "--models must list"),
    (["data-efficiency", "--sizes", "15", "--data-dir", "."], "MNIST files not found"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message):
    done = subprocess.run([sys.executable, "-m", "capsrouting.experiments", *argv], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
