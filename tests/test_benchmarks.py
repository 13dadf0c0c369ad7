"""The benchmarks still run (issue 29): their figures are read by people, never asserted — these
machines are noisy — but a benchmark that no longer runs measures nothing."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_explain_speed_runs_every_section_at_a_small_size():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "explain_speed.py"), "--image-size", "64",
                             "--words", "2", "--repeats", "1", "--no-bf16"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "per-word loop / LRP batched" in out and "LRP / gradient pass, both as a batch" in out
    for method in ("lrp", "gradient_x_input", "guided_backprop", "guided_gradcam"):
        assert f"  {method} " in out, out
    assert "bfloat16 vs float32" not in out  # --no-bf16
