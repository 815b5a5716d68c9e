"""Continual metrics and mask analyses against matrices and masks computed by hand."""


import numpy as np
import pandas as pd
import pytest
import torch

from mmer_cl import metrics
from mmer_cl.bench import report

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


def test_storage_by_component_from_what_is_kept(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"0" * 100)
    (tmp_path / "b.bin").write_bytes(b"0" * 7)
    dataset = torch.utils.data.TensorDataset(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    kept = [tmp_path / "a", tmp_path / "b.bin", {"w": torch.zeros(4, dtype=torch.bfloat16)}, None, dataset]
    assert metrics.nbytes(*kept) == 100 + 7 + 8 + 3 * (5 * 4 + 8)
    out = metrics.storage(base=100, masks=9, private=5)
    assert out["total"] == 114 and out["adapters"] == 0
    with pytest.raises(ValueError, match="unknown storage components"):
        metrics.storage(weights=1)
    with pytest.raises(TypeError, match="cannot measure the storage of a object"):
        metrics.nbytes(object())


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
    from PIL import Image

    assert prov["commit"] in Image.open(tmp_path / "m.png").info["Description"]  # the plot names its provenance
