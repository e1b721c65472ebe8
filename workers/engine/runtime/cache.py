"""A KV cache for batched speculative decoding: one preallocated tensor, rows with ragged lengths.

Every layer's keys and values live in one tensor [layers, 2, rows, kv_heads, columns, head_dim].
Row r holds its tokens in columns [0, length_r), in order, with no holes. A forward pass covers a
contiguous range of rows; its tokens are written in place at per-row columns (`prepare`) and
attention reads the first `width` columns of those rows, with a 4D mask that hides each row's
unused columns. Nothing is concatenated per step: the cost of a step does not grow with the
cache, and keeping a row's accepted path moves only the few accepted columns.

It plugs into stock transformers models as a `Cache` (their layers call `update` and attend to
what it returns); no model code is patched.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

COLUMN_STEP = 256


class SlotLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, cache: SlotCache, index: int) -> None:
        super().__init__()
        self.cache, self.index = cache, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
               ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        kv = c.data[self.index]
        kv[0][c.write_rows, :, c.write_cols] = key_states.transpose(1, 2).to(kv.dtype)
        kv[1][c.write_rows, :, c.write_cols] = value_states.transpose(1, 2).to(kv.dtype)
        return kv[0, c.first : c.last, :, : c.width], kv[1, c.first : c.last, :, : c.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.width, 0

    def get_seq_length(self) -> int:
        return self.cache.width

    def get_max_length(self) -> int:
        return self.cache.capacity


class SlotCache(Cache):
    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layers = config.num_hidden_layers
        heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        parameter = next(model.parameters())
        self.data = torch.zeros((layers, 2, 0, self.kv_heads, 0, self.head_dim), dtype=parameter.dtype, device=parameter.device)
        self.first = self.last = self.width = 0
        self.write_rows = self.write_cols = torch.zeros((0, 0), dtype=torch.long)
        super().__init__(layers=[SlotLayer(self, i) for i in range(layers)])

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def capacity(self) -> int:
        """Columns per row."""
        return self.data.shape[4]

    def reserve(self, rows: int, columns: int) -> None:
        """Room for at least `rows` rows of `columns` columns; grows geometrically (columns in steps of
        COLUMN_STEP, so that the capacity, which compiled steps read whole, changes seldom), keeping the contents."""
        have_rows, have_cols = self.data.shape[2], self.data.shape[4]
        if rows <= have_rows and columns <= have_cols:
            return
        shape = list(self.data.shape)
        shape[2] = max(rows, have_rows * 2 if rows > have_rows else have_rows)
        wanted = max(columns, int(have_cols * 1.5) if columns > have_cols else have_cols)
        shape[4] = -(-wanted // COLUMN_STEP) * COLUMN_STEP
        grown = self.data.new_zeros(shape)
        grown[:, :, :have_rows, :, :have_cols] = self.data
        self.data = grown

    def prepare(self, first: int, columns: torch.Tensor, width: int) -> None:
        """The next forward covers rows [first, first + len(columns)); row i's tokens go to columns[i]
        (a (rows, tokens) tensor); attention reads columns [0, width)."""
        rows, tokens = columns.shape
        self.first, self.last, self.width = first, first + rows, width
        self.write_rows = torch.arange(first, first + rows, device=self.device)[:, None].expand(rows, tokens)
        self.write_cols = columns.to(self.device)

    def move_columns(self, rows: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy column source[i, j] of row rows[i] to column target[i, j] (every layer, keys and values).
        Sources are read before any target is written."""
        rows = rows.to(self.device)[:, None].expand_as(source)
        source, target = source.to(self.device), target.to(self.device)
        self.data[:, :, rows, :, target] = self.data[:, :, rows, :, source]

    def move_rows(self, source: list[int], target: list[int], width: int) -> None:
        """Copy rows `source` to rows `target` (their first `width` columns)."""
        if source:
            s = torch.tensor(source, device=self.device)
            t = torch.tensor(target, device=self.device)
            self.data[:, :, t, :, :width] = self.data[:, :, s, :, :width]
