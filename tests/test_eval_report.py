"""lapsam.eval.report: metrics joined with running time, per case and per modality, with plots."""

from __future__ import annotations

from pathlib import Path

import pytest
from lapsam.eval.report import build_report

from lapsam.cli import main

METRICS = """case,dsc,nsd
2DBox_CT_a.npz,0.9,0.95
2DBox_CT_b.npz,0.7,0.75
3DBox_MR_c.npz,0.5,0.6
2DBox_Microscope_d.npz,0.0,0.0
"""
LABELS = """case,modality,kind,label,dsc,nsd,status,error
2DBox_Microscope_d.npz,Microscopy,2D,,0.0,0.0,failed,2DBox_Microscope_d.npz: prediction file is missing
"""


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    m = tmp_path / "metrics.csv"
    m.write_text(METRICS)
    (tmp_path / "metrics_labels.csv").write_text(LABELS)
    a = tmp_path / "fast_running_time.csv"
    a.write_text("CaseName,RunningTime\n2DBox_CT_a.npz,1.0\n2DBox_CT_b.npz,3.0\n3DBox_MR_c.npz,10.0\n2DBox_Microscope_d.npz,2.0\n")
    b = tmp_path / "slow_running_time.csv"
    b.write_text("CaseName,RunningTime\n2DBox_CT_a.npz,2.0\n2DBox_CT_b.npz,9.0\n3DBox_MR_c.npz,40.0\n2DBox_Microscope_d.npz,2.0\n")
    return m, a, b


def test_report_with_two_timings(inputs, tmp_path):
    m, a, b = inputs
    out = tmp_path / "report"
    assert main(["eval", "report", "--metrics", str(m), "--timing", str(a), "--compare-timing", str(b), "-o", str(out)]) == 0
    text = (out / "report.md").read_text()
    for png in ("metrics_by_modality.png", "time_per_case.png", "time_a_vs_b.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"({png})" in text
    # CT: DSC (0.9+0.7)/2, NSD 0.85, time A 2.0, B 5.5, B/A = 11/4
    assert "| CT | 2 | 0.8000 | 0.8500 | 2.00 | 5.50 | 2.75 |" in text
    # overall B/A = 53 / 16
    assert "| Overall | 4 | 0.5250 | 0.5750 | 4.00 | 13.25 | 3.31 |" in text
    assert "| 3DBox_MR_c.npz | MR | 0.5000 | 0.6000 | 10.00 | 40.00 | 4.00 | ok |" in text
    assert "## Failures" in text and "prediction file is missing" in text


def test_report_metrics_only_and_mismatches(inputs, tmp_path):
    m, a, _ = inputs
    rep = build_report(m, tmp_path / "r1")
    assert (tmp_path / "r1" / "metrics_by_modality.png").exists()
    assert not (tmp_path / "r1" / "time_per_case.png").exists()
    assert "| Microscopy | 1 | 0.0000 | 0.0000 |" in rep.read_text()
    a.write_text("CaseName,RunningTime\n2DBox_CT_a.npz,1.0\n2DBox_US_extra.npz,4.0\n")
    text = build_report(m, tmp_path / "r2", timing_csv=a).read_text()
    assert "1 timed case(s) have no metrics: 2DBox_US_extra.npz" in text
    assert "3 case(s) have no running time" in text


def test_report_bad_inputs(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,score\nx,1\n")
    assert main(["eval", "report", "--metrics", str(bad), "-o", str(tmp_path / "r")]) == 2
    assert main(["eval", "report", "--metrics", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "r")]) == 2
