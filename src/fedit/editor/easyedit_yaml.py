"""EasyEdit YAML hyperparameter files, read and translated into fedit's hyperparameters.

A file names the method (``alg_name``), the model (``model_name``, ``device``) and the
method's settings. Keys whose names fedit's dataclass shares pass through (``layers``,
``v_lr``, ``clamp_norm_factor`` ...); EasyEdit names that differ are renamed
(``mom2_n_samples`` -> ``mom2_samples``, AlphaEdit's ``L2`` -> ``alpha``); settings fedit
implements one way only are accepted at that value (``fact_token: subject_last``); module
paths (``rewrite_module_tmp`` ...) are accepted only where they match what fedit's adapter says
for the model. Anything else is refused, naming the keys.

A method module can declare more translations on its hyperparameter class:
``EASYEDIT_KEYS = {"easyedit_key": "field_name" or None}`` (None: accepted, not used).
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit.errors import HparamsError

log = logging.getLogger(__name__)

# EasyEdit names of fields fedit spells differently (applied where the method has the field).
RENAMES = {"mom2_n_samples": "mom2_samples", "L2": "alpha"}
# EasyEdit alg_name -> fedit method where lower-casing is not enough.
ALG_NAMES = {"ft": "ft-l", "ft-l": "ft-l", "ft-m": "ft-m", "fine-tune": "ft-l"}
# Settings fedit implements at one value only: key -> (accepted value(s), why).
FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "fact_token": (("subject_last",), "fedit reads keys and writes values at the subject's last token"),
    "layer_selection": (("all",), "fedit writes every layer in 'layers'"),
    "mom2_dtype": (("float32",), "fedit accumulates second moments in float32 and solves in float64"),
    "mom2_adjustment": ((True,), "this method always uses the second moments"),
    "nll_loss_factor": ((1, 1.0), "fedit weighs the target's NLL by 1"),
    "model_parallel": ((False,), "fedit runs the model on one device"),
}
# Keys fedit accepts and does not need, with the reason logged.
UNUSED = {
    "P_loc": "fedit computes AlphaEdit's null-space projectors itself and caches them",
    "max_length": "fedit does not truncate prompts",
}
MODULE_KEYS = ("rewrite_module_tmp", "rewrite_module_tmps", "layer_module_tmp", "mlp_module_tmp",
               "attn_module_tmp", "ln_f_module", "lm_head_module")
CORPUS_NAMES = ("wikipedia", "wikitext", "wikitext2", "wikitext-2", "default")


@dataclass
class EasyEditFile:
    """What a YAML file says besides the method's settings."""

    path: Path
    method: str  # fedit's registry name
    model_name: str | None
    device: str | None
    dtype: str | None
    batch_size: int | None
    cache_dir: str | None
    corpus: str | None
    settings: dict[str, Any] = field(default_factory=dict)  # the rest, untranslated


def read_file(path: str | Path) -> EasyEditFile:
    """Parse an EasyEdit YAML file and take out what is not a method setting."""
    import yaml

    from fedit.methods import METHODS

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:  # ValueError: not UTF-8
        raise HparamsError(f"cannot read the EasyEdit hyperparameter file {p}: {e}.",
                           "give the path of a YAML file like EasyEdit's hparams/ROME/gpt2-xl.yaml.") from e
    if not isinstance(data, dict):
        raise HparamsError(f"{p} holds no YAML mapping of hyperparameters.", "write one 'key: value' per line.")
    alg = data.pop("alg_name", None)
    if not isinstance(alg, str):
        raise HparamsError(f"{p} has no 'alg_name'.", f"add e.g. alg_name: \"ROME\" (fedit has {sorted(METHODS)}).")
    method = ALG_NAMES.get(alg.lower(), alg.lower())
    if alg.lower() == "ft":  # EasyEdit's FT: the loss on the target tokens only is FT-M
        method = "ft-m" if data.pop("objective_optimization", None) == "target_new" else "ft-l"
    if method not in METHODS:
        raise HparamsError(f"{p}: alg_name {alg!r} is not a method fedit has.",
                           f"use one of {sorted(METHODS)} (EasyEdit spelling is fine, e.g. 'AlphaEdit').")
    device = data.pop("device", None)
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"  # EasyEdit's device number is a CUDA device
    fp16 = data.pop("fp16", None)
    corpus = data.pop("mom2_dataset", None)
    if corpus is not None:
        if str(corpus).lower() in CORPUS_NAMES:
            log.info("%s: mom2_dataset %r: fedit's second moments come from its WikiText-2 sample", p, corpus)
            corpus = None
        elif not Path(str(corpus)).expanduser().exists():
            raise HparamsError(f"{p}: mom2_dataset {corpus!r} is neither 'wikipedia' nor a text file or folder.",
                               "use 'wikipedia' (fedit's WikiText-2 sample) or the path of your own corpus.")
    batch = data.pop("batch_size", None)
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise HparamsError(f"{p}: batch_size must be a positive integer, got {batch!r}.", "e.g. batch_size: 1")
    texts = {k: data.pop(k, None) for k in ("model_name", "stats_dir")}
    for k, v in texts.items():
        if v is not None and not isinstance(v, str):
            raise HparamsError(f"{p}: {k} must be text, got {v!r}.", f"write {k} as a name or path, or remove it.")
    return EasyEditFile(path=p, method=method, model_name=texts["model_name"],
                        device=None if device is None else str(device), dtype="float16" if fp16 else None,
                        batch_size=batch, cache_dir=texts["stats_dir"],
                        corpus=None if corpus is None else str(corpus), settings=data)


def _module_paths(lm) -> dict[str, set[str]]:
    """Module path templates ("...{}...") fedit's adapter gives for this model, per EasyEdit key."""
    ad, spec = lm.adapter, lm.adapter.spec
    block = f"{spec.blocks}.{{}}"
    rewrite = f"{block}.{spec.w_out}"
    attn = {f"{block}.{spec.attn}"}
    attn_mod = ad.module(ad.attn_name(0))
    # PMET's files name the attention output projection, whose output is the attention output
    attn |= {f"{block}.{spec.attn}.{c}" for c in ("o_proj", "out_proj", "c_proj", "dense") if hasattr(attn_mod, c)}
    names = {id(m): n for n, m in lm.model.named_modules()}
    heads = {names[id(ad.unembed())]}
    if ad.unembed().weight is ad.embed().weight:  # tied: EasyEdit names the input embedding
        heads.add(names[id(ad.embed())])
    return {"rewrite_module_tmp": {rewrite}, "rewrite_module_tmps": {rewrite}, "layer_module_tmp": {block},
            "mlp_module_tmp": {f"{block}.{spec.mlp}", rewrite}, "attn_module_tmp": attn,
            "ln_f_module": {spec.final_norm}, "lm_head_module": heads}


def _check_module(f: EasyEditFile, key: str, value: Any, lm, paths: dict[str, set[str]]) -> None:
    values = value if key == "rewrite_module_tmps" and isinstance(value, list) else [value]
    bad = [v for v in values if not isinstance(v, str) or v not in paths[key]]
    if bad:
        raise HparamsError(
            f"{f.path}: {key} is {value!r}, but fedit's adapter for {lm.model_type} models puts that module at "
            f"{sorted(paths[key])[0]!r}.",
            "remove the key: fedit's adapters know the module paths of every architecture they support "
            "(or point model_name at the model this file was written for).")


def _coerce(cls: type, name: str, value: Any) -> Any:
    """YAML 1.1 reads ``5e-1`` as a string: numbers for float and int fields."""
    try:
        hint = str(typing.get_type_hints(cls).get(name, ""))
    except Exception:  # unresolvable annotations: leave the value as written
        return value
    if isinstance(value, str) and ("float" in hint or "int" in hint):
        try:
            num = float(value)
        except ValueError:
            return value
        return int(num) if "int" in hint and "float" not in hint and num.is_integer() else num
    if isinstance(value, int) and not isinstance(value, bool) and hint in ("float", "<class 'float'>"):
        return float(value)
    return value


def translate(f: EasyEditFile, hparams_class: type, lm) -> dict[str, Any]:
    """The file's settings as overrides of ``hparams_class``'s fields for ``lm``.

    Raises :class:`HparamsError` naming every key fedit does not know."""
    fields = {x.name for x in dataclasses.fields(hparams_class)}
    extra = dict(getattr(hparams_class, "EASYEDIT_KEYS", {}) or {})
    paths = _module_paths(lm)
    out: dict[str, Any] = {}
    unknown = []
    for key, value in f.settings.items():
        if key in extra:
            if extra[key] is not None:
                out[extra[key]] = _coerce(hparams_class, extra[key], value)
        elif key in fields:
            out[key] = _coerce(hparams_class, key, value)
        elif RENAMES.get(key) in fields:
            out[RENAMES[key]] = _coerce(hparams_class, RENAMES[key], value)
        elif key in MODULE_KEYS:
            _check_module(f, key, value, lm, paths)
        elif key == "v_loss_layer":
            if isinstance(value, bool) or not isinstance(value, int) or value != lm.adapter.n_layers - 1:
                raise HparamsError(f"{f.path}: v_loss_layer is {value}, but fedit scores targets at the model's "
                                   f"output (layer {lm.adapter.n_layers - 1} of this model).",
                                   "remove v_loss_layer or set it to the last layer.")
        elif key in FIXED:
            allowed, why = FIXED[key]
            if value not in allowed:
                raise HparamsError(f"{f.path}: {key} {value!r} is not supported: {why}.",
                                   f"remove {key} or set it to {allowed[0]!r}.")
        elif key in UNUSED:
            log.info("%s: %s is not used: %s", f.path, key, UNUSED[key])
        else:
            unknown.append(key)
    if unknown:
        known = sorted(fields | {k for k, v in RENAMES.items() if v in fields} | set(extra) | set(MODULE_KEYS)
                       | set(FIXED) | set(UNUSED) | {"v_loss_layer"})
        raise HparamsError(f"{f.path}: unknown hyperparameter(s) {sorted(unknown)} for fedit's {f.method}.",
                           f"remove them; fedit's {f.method} reads {known} besides alg_name, model_name, device, "
                           "fp16, stats_dir, mom2_dataset and batch_size.")
    return out
