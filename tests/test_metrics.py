"""Metrics of promptmid.evaluation.metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from promptmid.evaluation import metrics


def affine(a: float = 1.0, tx: float = 0.0, ty: float = 0.0) -> np.ndarray:
    return np.array([[a, 0.0, tx], [0.0, a, ty], [0.0, 0.0, 1.0]])


P0 = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])


class TestPairMetrics:
    def test_identity_perfect(self) -> None:
        m = metrics.pair_metrics(np.eye(3), P0, P0, np.eye(3), np.ones(4, bool), (11, 11))
        assert (m["matches"], m["inliers"], m["ncm_before"], m["ncm_after"]) == (4, 4, 4, 4)
        assert m["cmr"] == 1.0 and m["inlier_cmr"] == 1.0
        assert m["rmse"] == 0.0 and m["corner_error"] == 0.0
        assert all(m[f"mma@{t}"] == 1.0 for t in range(1, 11))

    def test_known_affine_with_outliers(self) -> None:
        truth = affine(2.0, 5.0, -3.0)  # x' = 2x + 5, y' = 2y - 3
        p1 = P0 * 2 + [5.0, -3.0]
        p1[1] += [0.0, 2.0]  # error 2 px: correct at eps 3, not at 1
        p1[3] += [30.0, 40.0]  # outlier: error 50 px
        inliers = np.array([True, True, False, True])
        m = metrics.pair_metrics(truth, P0, p1, truth, inliers, (11, 11))
        assert m["ncm_before"] == 3 and m["ncm_after"] == 2  # the outlier is an inlier of the fit
        assert m["cmr"] == pytest.approx(0.75) and m["inlier_cmr"] == pytest.approx(2 / 3)
        assert m["mma@1"] == pytest.approx(0.5) and m["mma@2"] == pytest.approx(0.75)
        assert m["mma@10"] == pytest.approx(0.75)

    def test_shifted_estimate_errors(self) -> None:
        est = affine(1.0, 3.0, 4.0)  # 5 px everywhere
        assert metrics.transform_rmse(est, np.eye(3), (100, 50)) == pytest.approx(5.0)
        assert metrics.mean_corner_error(est, np.eye(3), (100, 50)) == pytest.approx(5.0)

    def test_rmse_on_check_points(self) -> None:
        pts = np.array([[0, 0, 1, 0], [10, 10, 10, 13]], float)  # errors 1 and 3 under identity
        assert metrics.transform_rmse(np.eye(3), None, (11, 11), pts) == pytest.approx(np.sqrt(5.0))

    def test_failed_fit_is_infinite(self) -> None:
        m = metrics.pair_metrics(np.eye(3), np.zeros((0, 2)), np.zeros((0, 2)), None, None, (11, 11))
        assert m["matches"] == 0 and m["cmr"] == 0.0 and m["mma@5"] == 0.0
        assert m["rmse"] == np.inf and m["corner_error"] == np.inf

    def test_grid_points_span_image(self) -> None:
        g = metrics.grid_points((101, 51), 3)
        assert g.min(0).tolist() == [0, 0] and g.max(0).tolist() == [100, 50] and len(g) == 9


class TestAggregates:
    def test_auc_all_zero(self) -> None:
        assert metrics.auc([0.0, 0.0]) == {"auc@3": 1.0, "auc@5": 1.0, "auc@10": 1.0}

    def test_auc_hand_computed(self) -> None:
        # one error of 2 px out of two, one failure: recall rises 0 -> 0.5 over [0, 2], stays 0.5
        a = metrics.auc([2.0, np.inf], thresholds=(4.0,))
        assert a["auc@4"] == pytest.approx((0.5 * 2 * 0.5 + 2 * 0.5) / 4)

    def test_auc_all_failed(self) -> None:
        assert metrics.auc([np.inf, np.inf])["auc@3"] == 0.0

    def test_success_rates(self) -> None:
        sr = metrics.success_rates([1.0, 4.0, 6.0, np.inf])
        assert sr == {"sr@3": 0.25, "sr@5": 0.5}
