"""The encoder zoo from the command line.

    python -m stages.encoders list                      # names, dims, input size, weights, present?
    python -m stages.encoders describe dino --head      # the JSON that goes into manifests
    python -m stages.encoders describe mobilenet_v2 --weights random --input-size 32

Missing official files: ``python -m stages.fetch_weights <name>`` (``make weights`` for mobilenet_v2).
"""

from __future__ import annotations

import argparse
import json
import sys

from rcdm import encoders, weights


def table() -> str:
    """A markdown table of the zoo and the state of each weights file in the local hub cache."""
    rows = [
        "| name | network | trunk dim | head dim | input | normalize | weights file | SHA-256 | local |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in encoders.ENCODERS.values():
        w = weights.WEIGHTS[spec.weights]
        pinned = "full" if w.sha256 else (f"prefix {w.sha256_prefix}" if w.sha256_prefix else "not published")
        rows.append(
            f"| {spec.name} | {spec.description} | {spec.trunk_dim} | {spec.head_dim or '-'} | {spec.input_size} "
            f"| {spec.normalize} | {w.filename} | {pinned} | {'present' if w.path.is_file() else 'absent'} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the encoder table")
    d = sub.add_parser("describe", help="build an encoder and print describe() as JSON")
    d.add_argument("name")
    d.add_argument("--head", action="store_true")
    d.add_argument("--weights", default=None, help="'random', a path or URL (default: the official file)")
    d.add_argument("--input-size", type=int, default=None)
    args = p.parse_args(argv)

    if args.cmd == "list":
        print(table())
        print(f"\nhub cache: {weights.hub_checkpoints_dir()}")
        return 0
    try:
        enc = encoders.load_encoder(
            args.name, head=args.head, weights=args.weights, input_size=args.input_size
        )
    except (encoders.EncoderError, weights.WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(enc.describe(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
