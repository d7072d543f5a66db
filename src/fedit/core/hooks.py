"""Forward hooks as context managers that always remove what they added."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing above is needed)."""


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x, new):
    return (new,) + tuple(x[1:]) if isinstance(x, tuple) else new


@contextmanager
def hooks(handles_factory: Callable[[], list]) -> Iterator[None]:
    handles = handles_factory()
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(modules: dict[str, nn.Module], inputs: bool = False, outputs: bool = True,
            stop_when_done: bool = False, detach: bool = True) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Record the first input and/or the (first) output of each named module.

    Yields ``{name: {"input": tensor, "output": tensor}}``, filled as the forward pass runs.
    With ``stop_when_done`` the pass is cut short with :class:`StopForward` once every module
    has been recorded (the caller catches it with :func:`run_until_stop`).
    """
    store: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    n_kinds = int(inputs) + int(outputs)

    def make(name):
        def hook(mod, args, kwargs, out):
            if inputs:
                x = args[0] if args else kwargs["hidden_states"]
                store[name]["input"] = x.detach() if detach else x
            if outputs:
                y = _first(out)
                store[name]["output"] = y.detach() if detach else y
            if stop_when_done and all(len(v) == n_kinds for v in store.values()):
                raise StopForward()
        return hook

    with hooks(lambda: [m.register_forward_hook(make(n), with_kwargs=True) for n, m in modules.items()]):
        yield store


def run_until_stop(fn: Callable[[], object]) -> None:
    """Run a forward pass that may be cut short by :class:`StopForward`."""
    try:
        fn()
    except StopForward:
        pass


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's (first) output by ``fn(output)`` while the context is open."""

    def hook(mod, args, out):
        return _replace_first(out, fn(_first(out)))

    with hooks(lambda: [module.register_forward_hook(hook)]):
        yield


@contextmanager
def record_block_calls(blocks: list[nn.Module]) -> Iterator[list[tuple[tuple, dict] | None]]:
    """Record the positional and keyword arguments each block is called with.

    Lets a caller re-run only the upper blocks of a model (see ``core.targets``): the
    attention masks, position embeddings and position ids each block got are kept as they were.
    """
    calls: list[tuple[tuple, dict] | None] = [None] * len(blocks)

    def make(i):
        def pre(mod, args, kwargs):
            calls[i] = (args, kwargs)
        return pre

    with hooks(lambda: [b.register_forward_pre_hook(make(i), with_kwargs=True) for i, b in enumerate(blocks)]):
        yield calls


def call_block(block: nn.Module, call: tuple[tuple, dict], hidden: torch.Tensor) -> torch.Tensor:
    """Call a block as it was called before, with new hidden states; return its hidden output."""
    args, kwargs = call
    if args:
        out = block(hidden, *args[1:], **kwargs)
    else:
        out = block(**{**kwargs, "hidden_states": hidden})
    return _first(out)


def bind_call(block: nn.Module, call: tuple[tuple, dict]) -> dict:
    """A recorded block call as keyword arguments only (``**kwargs`` flattened in).

    The first argument is named ``hidden_states`` whatever the block calls it, so a caller can
    replace it and call ``block(**named)``.
    """
    args, kwargs = call
    sig = inspect.signature(block.forward)
    bound = sig.bind_partial(*args, **kwargs).arguments
    named: dict = {}
    for name, value in bound.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(block).__name__} takes extra positional arguments; cannot bind them")
        else:
            named[name] = value
    first = next(iter(sig.parameters))
    if first != "hidden_states":
        named["hidden_states"] = named.pop(first)
    return named


def call_block_named(block: nn.Module, named: dict, hidden: torch.Tensor, **replace) -> torch.Tensor:
    """Call a block with keyword arguments from :func:`bind_call`, new hidden states and overrides."""
    first = next(iter(inspect.signature(block.forward).parameters))
    kw = {**named, **replace}
    kw.pop("hidden_states", None)
    kw[first] = hidden
    return _first(block(**kw))
