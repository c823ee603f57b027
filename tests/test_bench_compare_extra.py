"""scripts/bench_compare.py --extra: in-benchmark ratios and peak memory from a pytest-benchmark JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_extra_table(tmp_path):
    data = {"machine_info": {}, "benchmarks": [
        {"name": "test_egnn_vs_edge_list[lj13-sample]", "fullname": "bench_egnn.py::lj13-sample",
         "stats": {"min": 0.5, "median": 0.6, "mean": 0.6, "max": 0.7},
         "extra_info": {"ratio": 3.5, "edge_list_min_s": 1.75, "ours_min_s": 0.5}},
        {"name": "test_train_step[dds-dw4]", "fullname": "bench_methods.py::dds-dw4",
         "stats": {"min": 60.0, "median": 60.0, "mean": 60.0, "max": 60.0},
         "extra_info": {"peak_rss_mb": 612.0}},
        {"name": "plain", "fullname": "plain", "stats": {"min": 1.0, "median": 1.0, "mean": 1.0, "max": 1.0}},
    ]}
    f = tmp_path / "bench.json"
    f.write_text(json.dumps(data))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_compare.py"), str(f),
                          str(tmp_path / "none.json"), "--extra"], capture_output=True, text=True, check=True)
    assert "3.50" in out.stdout and "612" in out.stdout and "lj13-sample" in out.stdout
    assert "plain" not in out.stdout
