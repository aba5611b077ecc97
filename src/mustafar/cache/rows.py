"""Batch-row edits of a :class:`~mustafar.MustafarCache` layer (beam search, batch selection) and their index check.

Source: transformers' ``Cache.reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave``
contract; the layer keeps its compressed store, window and left padding per row consistent.
"""

from __future__ import annotations

import torch

from .._checks import check_positive_int

__all__ = ["BatchRowEdits", "check_batch_index"]


class BatchRowEdits:
    """The batch-row edits of :class:`~mustafar.cache.layer.MustafarLayer` (a mixin over its state).

    Reads and writes the layer's ``keys``, ``values`` (the window), ``key_store``, ``value_store``,
    ``pads``, ``is_initialized``, ``device`` and ``layer_idx``; ``_unconsumed`` says an update's output
    has not been read by the attention yet.
    """

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep (reorder, repeat) the batch rows ``beam_idx`` (beam search): see :func:`check_batch_index`."""
        if self.is_initialized:
            self.select_rows(check_batch_index("beam_idx", beam_idx, self.keys.shape[0]))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` (an int >= 1) times in place (``torch.repeat_interleave`` order)."""
        repeats = check_positive_int("repeats", repeats)
        if self.is_initialized:
            self.select_rows(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor | list) -> None:
        """Keep only the batch rows ``indices`` (integer indices or a bool mask): see :func:`check_batch_index`."""
        if self.is_initialized:
            self.select_rows(check_batch_index("indices", indices, self.keys.shape[0], masks=True))

    def check_rows_editable(self) -> None:
        """Raise ``ValueError`` between an :meth:`update` and the attention that reads its output.

        The attention's query still has the old batch rows then: editing the rows would make it read
        another row's store (a wrong answer, not an error).
        """
        if self._unconsumed:
            raise ValueError(
                f"MustafarCache layer {self.layer_idx}: batch rows cannot be reordered, selected or repeated between "
                "update() and the attention that reads its output (the query still has the old rows); edit the "
                "batch before the forward pass or after it"
            )

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index``, a 1-d integer tensor already checked by :func:`check_batch_index`.

        Raises:
            ValueError: called between :meth:`update` and the attention (:meth:`check_rows_editable`).
        """
        if not self.is_initialized:
            return
        self.check_rows_editable()
        index = index.to(device=self.device, dtype=torch.long)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.key_store.select_batch(index)
        self.value_store.select_batch(index)
        if min(self.pads) == max(self.pads):  # no host synchronisation for unpadded batches
            self.pads = self.pads[:1] * index.numel()
        else:
            self.pads = [self.pads[i] for i in index.tolist()]


def check_batch_index(name: str, index: object, batch: int, masks: bool = False) -> torch.Tensor:
    """``index`` as a 1-d integer tensor of rows of a batch of ``batch`` rows.

    ``index``: a 1-d integer tensor (or a list of ints) of rows in ``[0, batch)``, repeats allowed;
    with ``masks``, also a 1-d bool mask of ``batch`` entries. Values are checked only on the CPU
    (a CUDA index is checked for its dtype and rank, so that no host synchronisation happens).

    Raises:
        TypeError: not a tensor or list; a float or uint8 tensor; a bool tensor where ``masks`` is False.
        ValueError: not 1-d; no row selected; a CPU index outside ``[0, batch)``; a mask of another length.
    """
    kind = "a 1-d integer tensor of batch rows" + (" or a 1-d bool mask" if masks else "")
    if isinstance(index, (list, tuple)):
        try:
            index = torch.tensor(index, dtype=torch.long if len(index) == 0 else None)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be {kind}, got {type(index).__name__} {index!r}") from error
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be {kind}, got {type(index).__name__} {index!r}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be {kind}, got shape {tuple(index.shape)}")
    if index.dtype == torch.uint8:
        raise TypeError(f"{name} must be {kind}, got dtype torch.uint8 (ambiguous: old torch indexing read it as a "
                        "mask); pass int64 row indices" + (" or a bool mask" if masks else ""))
    if index.dtype == torch.bool:
        if not masks:
            raise TypeError(f"{name} must hold integer batch row indices, got a bool tensor (a mask: use "
                            "cache.batch_select_indices(mask) to keep the rows where it is True)")
        if index.numel() != batch:
            raise ValueError(f"{name}, a bool mask, must have one entry per batch row ({batch}), got {index.numel()}")
        index = index.nonzero().squeeze(1)
    elif index.is_floating_point() or index.is_complex():
        raise TypeError(f"{name} must hold integer batch row indices, got dtype {index.dtype}")
    if index.numel() == 0:
        raise ValueError(f"{name} must select at least one of the {batch} batch rows, got none")
    if index.device.type == "cpu" and (int(index.min()) < 0 or int(index.max()) >= batch):
        shown = index.tolist() if index.numel() <= 16 else f"values in [{int(index.min())}, {int(index.max())}]"
        raise ValueError(f"{name} must hold batch rows in [0, {batch}), got {shown}")
    return index
