"""Second moments C = E[k kᵀ] of W_out inputs over a text corpus, per layer.

One forward pass collects every requested layer at once and stops after the deepest (the
reference code runs one pass per layer). Accumulation is resumable: the running sums and the
number of chunks done (:class:`MomentSums`) are all it needs to continue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from fedit.core.hooks import capture, run_until_stop
from fedit.core.tokens import pad, pad_id


@dataclass
class MomentSums:
    """Running sums for several layers: ``sums[l]`` is Σ k kᵀ over ``tokens`` key vectors."""

    sums: dict[int, torch.Tensor]
    tokens: int = 0
    chunks: int = 0

    def second_moment(self, layer: int) -> torch.Tensor:
        """C = E[k kᵀ] at ``layer`` [d_in, d_in]."""
        if self.tokens == 0:
            raise ValueError("no tokens were accumulated")
        return self.sums[layer] / self.tokens


def _batches(chunks: Iterator[list[int]], size: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    for c in chunks:
        batch.append(c)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def accumulate(lm, layers: list[int], chunks: Iterable[list[int]], running: MomentSums | None = None,
               batch_size: int = 8, accum_dtype: torch.dtype = torch.float64,
               on_batch: Callable[[MomentSums, int], None] | None = None) -> MomentSums:
    """Add Σ k kᵀ of every non-padding token of ``chunks`` to ``running`` (or fresh sums).

    ``chunks`` must already skip the ``running.chunks`` chunks done before. ``on_batch(running, n)``
    is called after each batch of ``n`` chunks (for progress and checkpoints).
    """
    ad = lm.adapter
    layers = sorted(set(layers))
    if running is None:
        running = MomentSums(sums={})
    for l in layers:
        if l not in running.sums:
            d_in = ad.w_out_dims(l)[1]
            running.sums[l] = torch.zeros(d_in, d_in, dtype=accum_dtype, device=lm.device)
    mods = {str(l): ad.w_out(l) for l in layers}
    pid = pad_id(lm.tokenizer)
    for batch in _batches(iter(chunks), batch_size):
        ids, mask = pad(batch, pid)
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        with capture(mods, inputs=True, outputs=False, stop_when_done=True) as store:
            run_until_stop(lambda: ad.body()(input_ids=ids, attention_mask=mask))
        keep = mask.reshape(-1).bool()
        for l in layers:
            k = store[str(l)]["input"].reshape(-1, running.sums[l].shape[0])[keep].float()
            # One batch in float32 (fast), the running sum in accum_dtype (exact enough over many).
            running.sums[l] += (k.T @ k).to(accum_dtype)
        running.tokens += int(keep.sum())
        running.chunks += len(batch)
        if on_batch is not None:
            on_batch(running, len(batch))
    return running
