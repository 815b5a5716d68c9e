"""Continual metrics and mask analyses against matrices and masks computed by hand."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mmer_cl import metrics, report

NAN = float("nan")


def test_metrics_of_a_forgetting_matrix():
    R = [[0.9, NAN, NAN],
         [0.6, 0.8, NAN],
         [0.5, 0.7, 0.95]]
    assert metrics.final_average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert metrics.backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    # task 0 peaked at 0.9 and ends at 0.5; task 1 peaked at 0.8 and ends at 0.7
    assert metrics.average_forgetting(R) == pytest.approx((0.4 + 0.1) / 2)
    np.testing.assert_allclose(metrics.retention(R, [1.0, 0.7, 0.95]), [0.5, 1.0, 1.0])


def test_forgetting_counts_the_peak_not_the_diagonal():
    # task 0 improves after experience 1 (positive transfer), then drops: BWT > 0 but forgetting > 0
    R = [[0.5, NAN, NAN],
         [0.9, 0.8, NAN],
         [0.6, 0.8, 0.7]]
    assert metrics.backward_transfer(R) == pytest.approx((0.1 + 0.0) / 2)
    assert metrics.average_forgetting(R) == pytest.approx((0.3 + 0.0) / 2)
    summary = metrics.summarize(R, [0.6, 0.8, 0.7])
    assert summary["retention"] == pytest.approx(1.0)


def test_single_task_and_bad_shapes():
    assert metrics.average_forgetting([[0.7]]) == 0.0
    assert metrics.backward_transfer([[0.7]]) == 0.0
    with pytest.raises(ValueError, match="T x T"):
        metrics.final_average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError, match="one expert accuracy per task"):
        metrics.retention([[0.5]], [0.5, 0.6])


def test_storage_by_component():
    out = metrics.storage(base=100, masks=metrics.mask_bytes(17, 3), private=5)
    assert out["masks"] == 3 * 3  # ceil(17 / 8) = 3 bytes per task
    assert out["total"] == 100 + 9 + 5
    with pytest.raises(ValueError, match="unknown storage components"):
        metrics.storage(weights=1)


@pytest.fixture
def small_model():
    tau = {"backbone.encoder.layer.0.w": torch.tensor([1.0, -2.0, 0.5, 0.0]),
           "backbone.pooler.w": torch.tensor([3.0, 1.0])}
    tau_star = {"backbone.encoder.layer.0.w": torch.tensor([1.0, 2.0, 0.0, 0.0]),
                "backbone.pooler.w": torch.tensor([3.0, -1.0])}
    return tau, tau_star


def test_mask_analyses_by_hand(small_model):
    tau, tau_star = small_model
    mask = metrics.mmer_masks(tau, tau_star, lam=1.0)
    # |tau| >= |tau - tau_star|: 1>=0 y, 2>=4 n, 0.5>=0.5 y, 0>=0 y | 3>=0 y, 1>=2 n
    assert mask["backbone.encoder.layer.0.w"].tolist() == [True, False, True, True]
    assert mask["backbone.pooler.w"].tolist() == [True, False]
    density = metrics.mask_density(mask, tau_star)
    assert density["raw"] == pytest.approx(4 / 6)
    # tau_star != 0 at 4 entries (1, 2 | 3, -1); the mask holds 2 of them
    assert density["effective"] == pytest.approx(2 / 4)
    assert density["per_layer"]["backbone.encoder.layer.0"] == {"raw": 0.75, "effective": 0.5}
    assert density["per_layer"]["backbone.pooler"] == {"raw": 0.5, "effective": 0.5}
    # theta_hat - theta = m * tau_star - tau = [0, 2, -0.5, 0 | 0, -1]
    expected = math.sqrt(4 + 0.25 + 1) / math.sqrt(1 + 4 + 0.25 + 9 + 1)
    assert metrics.reconstruction_error(tau, mask, tau_star) == pytest.approx(expected)
    sign = metrics.sign_agreement_mask(tau, tau_star)
    assert sign["backbone.encoder.layer.0.w"].tolist() == [True, False, False, False]
    assert sign["backbone.pooler.w"].tolist() == [True, False]
    # over tau_star != 0: mmer {e0, p0}, sign {e0, p0}
    assert metrics.mask_overlap(mask, sign, tau_star) == 1.0
    other = {k: ~v for k, v in mask.items()}
    assert metrics.mask_overlap(mask, other, tau_star) == 0.0


def test_random_control_keeps_the_effective_density():
    torch.manual_seed(0)
    tau_star = {"w": torch.randn(20000) * (torch.rand(20000) < 0.3)}
    mask = {"w": torch.rand(20000) < 0.8}
    control = metrics.random_mask_like(mask, tau_star, seed=1)
    want = metrics.mask_density(mask, tau_star)["effective"]
    assert metrics.mask_density(control, tau_star)["effective"] == pytest.approx(want, abs=0.02)
    nonzero = tau_star["w"] != 0
    assert torch.equal(control["w"][~nonzero], mask["w"][~nonzero])
    assert not torch.equal(control["w"], mask["w"])


def test_report_files_carry_provenance(tmp_path):
    prov = report.provenance("mmer-cl run --profile quick")
    assert set(prov) == {"command", "date", "commit", "machine"}
    df = pd.DataFrame({"method": ["mmer", "ties"], "final_avg_acc": [0.91, 0.85]})
    report.write_table(df, tmp_path, "summary", prov, "Summary")
    back = pd.read_csv(tmp_path / "summary.csv", comment="#")
    assert back["final_avg_acc"].tolist() == [0.91, 0.85]
    assert "command: mmer-cl run --profile quick" in (tmp_path / "summary.csv").read_text()
    md = (tmp_path / "summary.md").read_text()
    assert "| mmer | 0.9100 |" in md and prov["commit"] in md
    report.plot_accuracy_matrices({"mmer": np.eye(2)}, ["a", "b"], tmp_path / "m.png", prov, "R")
    assert (tmp_path / "m.png").stat().st_size > 1000
