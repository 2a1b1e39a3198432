"""`make demo` in smoke mode: every stage as a subprocess on a tiny synthetic FashionMNIST, then resumed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipelines import demo
from tests.conftest import REPO
from tests.test_prepare_data import make_source

SIZE = 32  # configs/model/demo.yaml image_size


@pytest.mark.timeout(600)
def test_demo_smoke_and_resume(tmp_path):
    make_source(tmp_path / "src")  # 3 images per class and split
    out = tmp_path / "demo"
    overrides = [
        f"out={out}", f"data={tmp_path / 'data'}", f"source={tmp_path / 'src'}", "train_images=20",
        "test_images=10", "encoder_weights=random", "nproc=2", "time_limit_minutes=null",
        "features_set=[encoder.input_size=32,batch_size=10,num_cpus=2]",
        "train_set=[steps=3,data.batch_size=4,ckpt_every=3,log_every=1,data.shuffle_buffer=10]",
        "sampler.steps=2", "sample_rows=3", "samples_per_row=2", "interpolate_steps=3",
        "n_items=6", "samples_per_item=2", "retrieval_pool=10",
        "sample_set=[batch_size=8]", "evaluate_set=[batch_size=8]",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "pipelines.demo", "--set", *overrides]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=540)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    m = json.loads((out / "metrics.json").read_text())
    for key in ("class_agreement", "knn_ceiling", "chance", "retrieval_top1", "shuffled_class_agreement",
                "shuffled_retrieval_top1", "feature_precision", "feature_recall"):  # fmt: skip
        assert 0.0 <= m[key] <= 1.0, key
    assert m["retrieval_pool"] == 10 and m["n_samples"] == 12 and m["train_steps"] == 3
    assert 1 <= m["mean_rank"] <= 10 and m["minutes"] > 0
    assert set(m["steps_seconds"]) == {"data", "features_train", "features_test", "train", "samples",
                                       "interpolation", "loss", "evaluate"}  # fmt: skip
    for name in ("report.md", "eval/report.md", "features/train/bank.h5", "features/test/manifest.json"):
        assert (out / name).is_file(), name
    assert list((out / "train" / "checkpoints").glob("ckpt_*.pt"))

    samples = np.asarray(Image.open(out / "samples.png"))
    assert samples.shape == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2, 3)  # 3 rows: real + 2 samples
    interp = Image.open(out / "interpolation.png")
    assert interp.height == 2 * (SIZE + 2) + 2  # 2 rows (the interpolate stage's default)
    loss = np.asarray(Image.open(out / "loss.png").convert("RGB"))
    assert (loss != 255).any(axis=2).mean() > 0.01  # axes and curves drawn, not a blank canvas
    report = (out / "report.md").read_text()
    assert "samples.png" in report and f"{100 * m['class_agreement']:.1f}%" in report

    # a rerun finds every output and does nothing but rewrite the summary
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skipped") == 8, second.stdout
    again = json.loads((out / "metrics.json").read_text())
    assert again["minutes"] == m["minutes"] and again["class_agreement"] == m["class_agreement"]

    # other settings into the same folder are refused: the skipped steps would report the old results
    changed = subprocess.run([*cmd, "n_items=8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 1 and "n_items 6 -> 8" in changed.stderr, changed.stderr[-2000:]
    assert json.loads((out / "demo_config.json").read_text())["n_items"] == 6  # left as it was


def test_time_box_and_precision_resolution(monkeypatch):
    from rcdm import dist

    assert demo.training_minutes("auto", "bf16") == 12.0 and demo.training_minutes("auto", "fp32") == 10.0
    assert demo.training_minutes(7, "bf16") == 7.0 and demo.training_minutes(None, "fp32") is None
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(dist, "native_bf16", lambda device, native=native: native)
        assert demo.resolve_precision("auto") == want
    assert demo.resolve_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match="time_limit_minutes must be"):
        demo.DemoConfig(time_limit_minutes="soon")
