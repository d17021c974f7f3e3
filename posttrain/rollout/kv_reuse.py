"""Keys and values kept from one ``generate`` call for the next: an agent's next turn is the last
turn's prompt + its completion + the tool's output, so all but the new tokens were computed
already (vLLM's automatic prefix caching does the same across requests).

``KeptRows`` holds, for every row of the last call, the ids that were fed to the model (prompt
+ completion but its last id) and their keys/values per layer. A new prompt reuses the longest
run of leading ids it shares with one kept row; only its rest is prefilled. The kept rows are
valid for the weights they were computed with: ``weights_stamp`` changes with every in-place
update of a parameter (an optimizer step, a refresh of the generation copy), and a store whose
stamp differs is never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def weights_stamp(model) -> int:
    """A number that changes whenever any parameter of ``model`` is written in place (torch
    counts in-place writes per tensor) or replaced."""
    return sum(id(p) + p._version for p in model.parameters())


@dataclass
class KeptRows:
    """Rows of the last call: ``ids[i]`` were fed, ``keys[i][layer]`` / ``values[i][layer]``
    are [H, len(ids[i]), D]."""

    stamp: int
    ids: list[list[int]] = field(default_factory=list)
    keys: list[list[torch.Tensor]] = field(default_factory=list)
    values: list[list[torch.Tensor]] = field(default_factory=list)

    def keep(self, cache, batch_rows: list[int], mask_AL: torch.Tensor, fed_ids: list[list[int]]) -> None:
        """Copy out the keys/values of ``batch_rows`` (rows of the decode batch, whose unmasked
        columns hold ``fed_ids`` first: any column after them was fed after the row ended)."""
        for batch_row, ids in zip(batch_rows, fed_ids):
            columns = mask_AL[batch_row].nonzero().squeeze(-1)[: len(ids)]
            self.ids.append(list(ids))
            self.keys.append([layer.keys[batch_row].index_select(1, columns) for layer in cache.layers])
            self.values.append([layer.values[batch_row].index_select(1, columns) for layer in cache.layers])

    def longest_shared(self, prompt: list[int]) -> tuple[int, int]:
        """(kept row, how many leading ids ``prompt`` shares with it), the longest; (-1, 0) when
        nothing is kept.

        >>> rows = KeptRows(0, ids=[[1, 2, 3, 4], [1, 2, 9]])
        >>> rows.longest_shared([1, 2, 3, 7]), rows.longest_shared([1, 2, 9, 9, 9]), rows.longest_shared([5])
        ((0, 3), (1, 3), (0, 0))
        """
        best, shared = -1, 0
        for index, ids in enumerate(self.ids):
            length = 0
            for a, b in zip(ids, prompt):
                if a != b:
                    break
                length += 1
            if length > shared or best < 0:
                best, shared = index, length
        return best, shared


def build_cache(kept: KeptRows, picks: list[tuple[int, int]], width: int, cache_class, config, dtype, device):
    """A key/value cache [B, H, width, D] per layer: row ``b`` holds the first ``picks[b][1]`` kept
    columns of kept row ``picks[b][0]``, right-aligned (the columns before them are masked)."""
    cache = cache_class(config=config)
    for layer in range(len(kept.keys[picks[0][0]])):
        heads, _, dim = kept.keys[picks[0][0]][layer].shape
        keys = torch.zeros((len(picks), heads, width, dim), dtype=dtype, device=device)
        values = torch.zeros_like(keys)
        for row, (index, length) in enumerate(picks):
            keys[row, :, width - length :] = kept.keys[index][layer][:, :length]
            values[row, :, width - length :] = kept.values[index][layer][:, :length]
        cache.update(keys, values, layer)
    return cache
