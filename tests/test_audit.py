"""The imagination audit's numbers against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wmpo.trainer.audit import AuditRecord, fidelity_by_horizon, success_agreement, summarize


def test_success_agreement_counts_hallucinated_successes() -> None:
    imagined = [True, True, True, False, False, True]
    real = [True, False, False, False, True, True]
    out = success_agreement(imagined, real)
    assert out["audited"] == 6 and out["agreement"] == pytest.approx(3 / 6)
    assert out["precision"] == pytest.approx(2 / 4) and out["recall"] == pytest.approx(2 / 3)
    assert out["hallucinated_successes"] == 2 and out["hallucinated_success_rate"] == pytest.approx(2 / 6)
    assert out["imagined_success_rate"] == pytest.approx(4 / 6) and out["real_success_rate"] == pytest.approx(3 / 6)
    empty = success_agreement([], [])
    assert empty["audited"] == 0 and math.isnan(empty["agreement"])
    with pytest.raises(ValueError, match="imagined outcomes"):
        success_agreement([True], [True, False])


def _record(n: int, imagined_offset: int, real_success_at: int | None, probs: list[float]) -> AuditRecord:
    real = np.stack([np.full((8, 8, 3), 10 * t, np.uint8) for t in range(n + 1)])
    imagined = np.clip(real.astype(int) + imagined_offset, 0, 255).astype(np.uint8)
    imagined[0] = real[0]
    flags = np.zeros(n, bool)
    if real_success_at is not None:
        flags[real_success_at:] = True
    return AuditRecord(bool(max(probs) >= 0.5), real_success_at is not None, imagined, real, np.array(probs), flags)


def test_fidelity_by_horizon_against_copy_last_frame() -> None:
    record = _record(8, imagined_offset=1, real_success_at=None, probs=[0.1] * 8)
    out = fidelity_by_horizon([record], horizons=(1, 8, 16))
    # imagined frames are off by one grey level everywhere: PSNR = 10 log10(255² / 1)
    assert out["psnr"] == {1: pytest.approx(48.1308, abs=1e-3), 8: pytest.approx(48.1308, abs=1e-3)}
    # copy-last-frame holds the start frame: off by 10 at h=1, by 80 at h=8
    assert out["copy_psnr"][1] == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-3)
    assert out["copy_psnr"][8] == pytest.approx(10 * math.log10(255**2 / 6400), abs=1e-3)
    assert 16 not in out["psnr"]  # no record is that long
    assert out["ssim"][1] > out["copy_ssim"][8]


def test_summarize_scores_the_reward_model_on_real_step_success() -> None:
    hit = _record(4, 0, real_success_at=2, probs=[0.1, 0.2, 0.9, 0.95])  # right at steps 2 and 3
    false_alarm = _record(4, 0, real_success_at=None, probs=[0.1, 0.7, 0.2, 0.1])  # one false positive
    out = summarize([hit, false_alarm], threshold=0.5, horizons=(1,))
    assert out["audit_audited"] == 2 and out["audit_agreement"] == pytest.approx(0.5)
    assert out["audit_hallucinated_successes"] == 1
    assert out["audit_reward_precision"] == pytest.approx(2 / 3) and out["audit_reward_recall"] == pytest.approx(1.0)
    assert out["audit_psnr_h1"] == pytest.approx(100.0)  # identical frames
    with pytest.raises(ValueError, match="do not describe the same"):
        AuditRecord(True, True, hit.imagined_frames[:3], hit.real_frames, hit.success_probs, hit.real_step_success)
