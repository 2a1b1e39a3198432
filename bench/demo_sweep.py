"""Demo tuning sweep: train variants of the demo presets for fixed step counts and evaluate each.

    python -m bench.demo_sweep --out runs/sweep --steps 650 1300 --guidance 1 2 3 \\
        --variant "base=" --variant "std=model.feature_norm=standardize" \\
        --variant "b32=model.feature_norm=standardize data.batch_size=32"

Quality depends on the optimisation steps taken, not on the machine that takes them: run on a GPU, this
measures in minutes what each variant of ``configs/train/demo.yaml`` reaches at the step counts the
2-core demo can afford (its steps per minute are measured on that machine, with ``make demo``). Every
stage runs as the demo runs it (``stages.prepare_data``, ``stages.features`` with the in-process engine,
``stages.train`` through torchrun, ``stages.evaluate``), once per variant; the checkpoint of each step
count in ``--steps`` is evaluated at each ``--guidance``. A variant is ``NAME=SET SET ...``: --set items
of the train stage, and ``eval.KEY=VALUE`` items of the evaluation (e.g. ``eval.ema=null``).

Results: one JSON line per evaluation in ``OUT/results.jsonl`` (kept across invocations: a variant,
step and guidance already there is skipped) and a table at the end. ``--budget-minutes`` stops
starting new variants after that long; ``--parallel`` runs several variants at once (the demo's model
leaves a GPU mostly idle).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLUMNS = ("class_agreement", "knn_ceiling", "retrieval_top1", "mean_rank", "shuffled_class_agreement")


def run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))


def prepare(args: argparse.Namespace, out: Path) -> Path:
    data, feats = out / "data", out / "features"
    prep = ["fashion-mnist", "--out", str(data), "--train", str(args.train_images), "--test", "1000"]
    if args.source:
        prep += ["--source", args.source]
    if not (data / "prepared.json").exists():
        run([sys.executable, "-m", "stages.prepare_data", *prep], out / "logs" / "prepare.log")
    for split in ("train", "test"):
        if not (feats / split / "manifest.json").exists():
            sets = [f"data={data / split}", f"out={feats / split}", "engine=local"]
            if args.weights:
                sets.append(f"encoder.weights={args.weights}")
            cmd = [sys.executable, "-m", "stages.features", "--config", "configs/features/demo.yaml"]
            run([*cmd, "--set", *sets], out / "logs" / f"features_{split}.log")
    return feats


def parse_variant(spec: str) -> tuple[str, list[str], list[str]]:
    name, _, rest = spec.partition("=")
    items = rest.split()
    train = [s for s in items if not s.startswith("eval.")]
    evaluate = [s[len("eval.") :] for s in items if s.startswith("eval.")]
    return name, train, evaluate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.demo_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--source", default=None, help="FashionMNIST idx folder (default: prepare_data's)")
    p.add_argument("--weights", default=None, help="MobileNetV2 weights file (default: the hub cache)")
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument("--steps", type=int, nargs="+", default=[650], help="step counts evaluated")
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0])
    p.add_argument("--variant", action="append", required=True, help="NAME=SET SET ...")
    p.add_argument("--n-items", type=int, default=200)
    p.add_argument("--budget-minutes", type=float, default=None)
    p.add_argument(
        "--parallel", type=int, default=1, help="variants run at once (a GPU has room for several)"
    )
    args = p.parse_args(argv)

    t0 = time.time()
    out = (REPO / args.out).resolve()
    feats = prepare(args, out)
    print(f"[sweep] data and features ready in {time.time() - t0:.0f}s", flush=True)
    results = out / "results.jsonl"
    done = set()
    if results.exists():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            done.add((r["variant"], r["train_steps"], r["guidance"]))
    steps = sorted(set(args.steps))
    lock = threading.Lock()

    def run_variant(spec: str) -> None:
        name, train_sets, eval_sets = parse_variant(spec)
        todo = [(s, g) for s in steps for g in args.guidance if (name, s, g) not in done]
        if not todo:
            return
        if args.budget_minutes is not None and time.time() - t0 > args.budget_minutes * 60:
            print(f"[sweep] budget reached: {name} not run", flush=True)
            return
        run_dir = out / "runs" / name
        t1 = time.time()
        train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                 "-m", "stages.train", "--config", "configs/train/demo.yaml", "--set",
                 f"data.shards={feats / 'train'}", f"out={run_dir}", f"steps={steps[-1]}",
                 "time_limit_minutes=null", "keep_last=0", "log_every=50",
                 f"ckpt_every={math.gcd(*steps)}", *train_sets]  # fmt: skip
        run(train, out / "logs" / f"train_{name}.log")
        train_seconds = time.time() - t1
        for s, g in todo:
            ckpt = run_dir / "checkpoints" / f"ckpt_{s:07d}.pt"
            ev_out = out / "eval" / f"{name}_s{s}_g{g:g}"
            cmd = [sys.executable, "-m", "stages.evaluate", "--config", "configs/evaluate/default.yaml",
                   "--set", f"checkpoint={ckpt}", f"heldout={feats / 'test'}",
                   f"bank={feats / 'train' / 'bank.h5'}", f"out={ev_out}", f"n_items={args.n_items}",
                   "samples_per_item=2", "retrieval_pool=200", "sampler=ddim", "steps=20", "eta=1.0",
                   f"guidance={g}", *eval_sets]  # fmt: skip
            run(cmd, out / "logs" / f"eval_{name}.log")
            m = json.loads((ev_out / "metrics.json").read_text())
            row = {"variant": name, "train_steps": s, "guidance": g, "sets": spec,
                   "train_seconds": round(train_seconds, 1), **{k: m[k] for k in (*COLUMNS, "knn_ceiling_crops")}}  # fmt: skip
            with lock, open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"[sweep] {name} step {s} w={g:g}: " + ", ".join(f"{k} {m[k]:.3f}" for k in COLUMNS),
                flush=True,
            )

    with ThreadPoolExecutor(args.parallel) as pool:
        for future in [pool.submit(run_variant, spec) for spec in args.variant]:
            try:
                future.result()
            except SystemExit as e:  # one failed variant: report it, keep the others
                print(f"[sweep] {e}", flush=True)

    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    print("\n| variant | steps | w | agreement | ceiling | top-1 | mean rank | shuffled |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['train_steps']} | {r['guidance']:g} | {r['class_agreement']:.3f} | "
              f"{r['knn_ceiling']:.3f} | {r['retrieval_top1']:.3f} | {r['mean_rank']:.1f} | "
              f"{r['shuffled_class_agreement']:.3f} |")  # fmt: skip
    print(f"[sweep] {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
