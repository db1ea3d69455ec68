"""Compacted KV cache of the exported S2 model: each KV head of an S2 layer stores only the keys its
query heads can still read.

Self-contained (copied next to exported weights with the modeling file). Storage of one S2 layer is one
buffer per keys and values, ``[batch, kv_heads, slots, head_dim]``, whose slots are:

- ``ring``: the last ``local_blocks * block_size`` tokens, token ``p`` in slot ``p % ring``. Every
  query's local window lies in it. A token leaving the ring is overwritten in place: it never costs
  memory again unless it is a stripe token.
- ``stripes``: the blocks ``kb`` some query head of the KV head reads as a stripe (``kb % vert_stride``
  in the KV head's residues), block after block in position order; the ``j``-th stripe block of a KV
  head with ``G`` residues is block ``(j // G) * vert_stride + residues[j % G]``. A token moves here
  from the ring when the ring overwrites it; stripe blocks are never dropped (a later query still
  reads them).
- one last slot that receives the tokens nobody keeps (scatter target for dropped tokens).

Slot addresses follow from positions by arithmetic, so the decode kernel reads blocks in place (no
gather) and every update is one ``scatter_`` with no host synchronisation (CUDA-graph friendly).
The rectangle is as wide as the KV head that keeps most: with ``G`` residues per KV head the stripe
part holds ``G (N - L) / V`` blocks of ``N``; a KV head whose group holds a dense head keeps every
block, and so then does the rectangle. Dense layers keep every token in a buffer indexed like the
attention mask's columns.
"""

import functools

import torch
from transformers.cache_utils import DynamicCache

from .s2_decode_kernel import s2_decode_attention, s2_decode_kernel_runs_on, s2_store_token
from .token_masks import masked_attention, s2_token_mask


class S2LayerGeometry:
    """Where the KV heads of one S2 layer keep each token (see the module docstring)."""

    def __init__(self, block_size: int, local_blocks: int, vert_stride: int, head_offsets: tuple,
                 num_kv_heads: int, device):
        self.block = block_size
        self.ring = local_blocks * self.block
        # vert_stride 0 (window only): no stripe blocks, except for the KV groups of dense heads.
        self.stride = max(vert_stride, 1)
        reads = torch.zeros(len(head_offsets), self.stride, dtype=torch.bool)
        for head, offset in enumerate(head_offsets):
            if offset is None:
                reads[head] = True
            elif vert_stride > 0:
                reads[head, (-offset) % self.stride] = True
        member = reads.view(num_kv_heads, -1, self.stride).any(dim=1)
        self.counts = member.sum(dim=1).tolist()  # stripe residues per KV head (G)
        width = max(1, max(self.counts))
        residues = [torch.nonzero(row).flatten().tolist() for row in member]
        self.residue_lists = residues  # on the host: sizes are worked out without a device sync
        self.head_reads = reads.to(device=device, dtype=torch.int8)  # [H, V]: head reads residue r
        self.residues = torch.tensor([r + [0] * (width - len(r)) for r in residues], dtype=torch.int32,
                                     device=device)  # [h_kv, max G]: sorted residues, padded
        self.count = torch.tensor(self.counts, dtype=torch.int64, device=device)
        self.member = member.to(device=device, dtype=torch.int8)  # [h_kv, V]: the KV head keeps residue r
        self.rank = (member.cumsum(dim=1) - member.long()).to(device)  # [h_kv, V]: index of r among them
        self.kv_head = torch.arange(num_kv_heads, device=device)[None, :, None]

    def stripe_blocks(self, length: int) -> int:
        """Stripe blocks the widest KV head holds once ``length`` tokens are stored."""
        if length <= self.ring:
            return 0
        blocks = (length - 1 - self.ring) // self.block + 1  # blocks with a token out of the ring
        whole, rest = divmod(blocks, self.stride)
        return max(whole * g + sum(1 for r in res if r < rest)
                   for g, res in zip(self.counts, self.residue_lists))

    def slots(self, stripe_blocks: int) -> int:
        return self.ring + stripe_blocks * self.block + 1

    def destinations(self, positions, last, trash: int):
        """Slot of each token ``positions [b, 1 or h_kv, n]`` once the sequence ends at ``last [b]``;
        ``trash`` for tokens nobody reads any more (and for padding, position -1)."""
        positions = positions.expand(-1, self.kv_head.shape[1], -1)
        kb = positions.clamp(min=0) // self.block
        residue = kb % self.stride
        stripe_slot = self.ring + self.block * ((kb // self.stride) * self.count[None, :, None]
                                                + self.rank[self.kv_head, residue]) + positions % self.block
        in_ring = positions > (last - self.ring)[:, None, None]
        kept = torch.where(self.member[self.kv_head, residue] != 0, stripe_slot, trash)
        return torch.where(positions < 0, trash, torch.where(in_ring, positions % self.ring, kept))

    def positions(self, last, num_slots: int):
        """Position held by every slot ``[b, h_kv, num_slots]`` after a sequence ending at ``last [b]``
        (-1: empty or dropped)."""
        slot = torch.arange(num_slots, device=last.device)
        last = last[:, None, None]
        ring_pos = last - (last - slot) % self.ring
        stripe = (slot - self.ring).clamp(min=0)
        count = self.count[None, :, None]
        j, offset = stripe // self.block, stripe % self.block
        kb = (j // count.clamp(min=1)) * self.stride + self.residues.long()[self.kv_head, j % count.clamp(min=1)]
        stripe_pos = kb * self.block + offset
        stripe_ok = (count > 0) & (stripe_pos <= last - self.ring) & (slot < num_slots - 1)
        pos = torch.where(slot < self.ring, ring_pos, torch.where(stripe_ok, stripe_pos, -1))
        return torch.where(pos >= 0, pos, -1)


@functools.lru_cache(maxsize=64)
def shared_geometry(block_size, local_blocks, vert_stride, head_offsets: tuple, num_kv_heads, device):
    """One ``S2LayerGeometry`` per pattern and device, shared by every layer and cache using it
    (read-only): building one copies its tables to the device, each copy a host sync, which a prefill
    must not pay per layer and per request."""
    return S2LayerGeometry(block_size, local_blocks, vert_stride, head_offsets, num_kv_heads, device)


class S2KVCache(DynamicCache):
    """KV cache for ``generate(past_key_values=...)``: S2 layers keep only the blocks later queries read
    (compacted per KV head, see the module docstring); dense layers keep everything.

    ``capacity`` (tokens per sequence, prompt included) allocates all storage at the first update so
    that no later step allocates (static shapes, CUDA graphs); without it storage grows geometrically.
    """

    def __init__(self, config, capacity: int | None = None):
        super().__init__(config=config)
        self.s2_config = config
        self.capacity = capacity
        self.seen_tokens = {}  # layer -> columns appended (padding included)
        self.buffers = {}  # layer -> (keys, values)
        self.last_position = {}  # S2 layer -> last stored position of each sequence [b] (-1: none)
        self.geometry = {}  # S2 layer -> S2LayerGeometry
        # Whether some stored column is padding (None: not known), on the host: the model records it
        # from the attention mask at the prompt so that decoding steps read no mask on the host.
        self.padded = None

    @property
    def is_croppable(self) -> bool:
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens.get(layer_idx, 0)

    # -- dense layers --------------------------------------------------------------------------

    def dense_update(self, layer_idx, keys, values):
        """Append ``keys/values [b, h_kv, n, d]``; returns all keys and values of the layer."""
        start = self.seen_tokens.get(layer_idx, 0)
        end = start + keys.shape[2]
        stored_k, stored_v = self._reserve(layer_idx, keys, end, self.capacity or 0)
        stored_k[:, :, start:end] = keys
        stored_v[:, :, start:end] = values
        self.seen_tokens[layer_idx] = end
        return stored_k[:, :, :end], stored_v[:, :, :end]

    # -- S2 layers -----------------------------------------------------------------------------

    def s2_store(self, layer_idx, keys, values, positions):
        """Add ``keys/values [b, h_kv, n, d]`` at ``positions [b, n]`` (-1: padding) and move or drop
        what leaves the window."""
        if layer_idx not in self.geometry:
            layer = self.s2_config.s2_layers[layer_idx]
            self.geometry[layer_idx] = shared_geometry(layer["block_size"], layer["local_blocks"],
                                                       layer["vert_stride"], tuple(layer["head_offsets"]),
                                                       keys.shape[1], keys.device)
            self.last_position[layer_idx] = torch.full((keys.shape[0],), -1, device=keys.device)
        geometry = self.geometry[layer_idx]
        seen = self.seen_tokens.get(layer_idx, 0) + keys.shape[2]
        self.seen_tokens[layer_idx] = seen
        stored_k, stored_v = self._reserve(layer_idx, keys, geometry.slots(geometry.stripe_blocks(seen)),
                                           geometry.slots(geometry.stripe_blocks(self.capacity or 0)))
        previous = self.last_position[layer_idx]
        last = torch.maximum(previous, positions.amax(dim=1))
        self.last_position[layer_idx] = last
        if keys.shape[2] == 1 and s2_decode_kernel_runs_on(keys):
            s2_store_token(stored_k, stored_v, keys, values, positions[:, 0], previous, geometry)
            return
        if keys.shape[2] == 1:  # decoding: only the ring slot of the new token is freed
            slot = (positions[:, 0] % geometry.ring)[:, None, None]
            old_pos = torch.where(previous >= 0, positions[:, 0] - geometry.ring, -1)[:, None, None]
            index = slot[..., None].expand(-1, keys.shape[1], 1, keys.shape[3])
            old_k, old_v = stored_k.gather(2, index), stored_v.gather(2, index)
        else:  # the whole ring may leave it
            old_pos = geometry.positions(previous, geometry.ring)
            old_k, old_v = stored_k[:, :, :geometry.ring].clone(), stored_v[:, :, :geometry.ring].clone()
        candidate_pos = torch.cat([old_pos.expand(-1, keys.shape[1], -1), positions[:, None].expand(
            -1, keys.shape[1], -1)], dim=2)
        dest = geometry.destinations(candidate_pos, last, stored_k.shape[2] - 1)
        dest = dest[..., None].expand(-1, -1, -1, keys.shape[3])
        stored_k.scatter_(2, dest, torch.cat([old_k, keys], dim=2))
        stored_v.scatter_(2, dest, torch.cat([old_v, values], dim=2))

    def s2_entries(self, layer_idx):
        """Stored keys, values ``[b, h_kv, slots, d]`` and positions ``[b, h_kv, slots]`` (-1: empty)."""
        keys, values = self.buffers[layer_idx]
        return keys, values, self.geometry[layer_idx].positions(self.last_position[layer_idx], keys.shape[2])

    def s2_decode(self, layer_idx, q, scale):
        """Attention of one new query per sequence ``q [b, h, 1, d]`` (already stored) over the cache."""
        keys, values = self.buffers[layer_idx]
        last = self.last_position[layer_idx]
        geometry = self.geometry[layer_idx]
        if s2_decode_kernel_runs_on(q):
            # Splits sized for what the longest sequence (or the capacity, fixed under CUDA graphs) holds.
            blocks = geometry.ring // geometry.block + geometry.stripe_blocks(
                self.capacity or self.seen_tokens[layer_idx])
            return s2_decode_attention(q[:, :, 0], keys, values, last, geometry, scale, blocks)[:, :, None]
        positions = geometry.positions(last, keys.shape[2])
        allowed = s2_token_mask(self.s2_config.s2_layers[layer_idx], last[:, None], positions)
        return masked_attention(q, keys, values, allowed, scale)

    # -- storage -------------------------------------------------------------------------------

    def _reserve(self, layer_idx, like, needed, at_capacity):
        """The layer's buffers with at least ``needed`` slots: ``at_capacity`` slots allocated once
        when the cache has a ``capacity``, else grown geometrically (a grown buffer keeps every slot
        address)."""
        stored = self.buffers.get(layer_idx)
        if stored is not None and stored[0].shape[2] >= needed:
            return stored
        if self.capacity is not None:
            if stored is not None or needed > at_capacity:
                raise ValueError(f"S2KVCache(capacity={self.capacity}) is full: make one with a capacity of at "
                                 f"least the prompt plus the new tokens")
            slots = at_capacity
        else:
            slots = needed if stored is None else max(needed, 2 * stored[0].shape[2])
        batch, heads, _, dim = like.shape
        # Zeros, not empty memory: the kernel multiplies masked probabilities (0) by unwritten values.
        grown = tuple(like.new_zeros(batch, heads, slots, dim) for _ in range(2))
        if stored is not None:
            for new, old in zip(grown, stored):
                new[:, :, : old.shape[2]] = old
        self.buffers[layer_idx] = grown
        return grown

    def kv_cache_stats(self):
        """Entries (one key and one value of one KV head) kept, allocated, and what a full cache would
        hold, over all layers."""
        full = kept = allocated = 0
        for layer_idx, seen in self.seen_tokens.items():
            keys = self.buffers[layer_idx][0]
            full += keys.shape[0] * keys.shape[1] * seen
            if layer_idx in self.geometry:
                kept += int((self.s2_entries(layer_idx)[2] >= 0).sum())
                allocated += keys.shape[0] * keys.shape[1] * (keys.shape[2] - 1)
            else:
                kept += keys.shape[0] * keys.shape[1] * seen
                allocated += keys.shape[0] * keys.shape[1] * keys.shape[2]
        return {"kept_entries": kept, "allocated_entries": allocated, "full_entries": full,
                "saved_fraction": 1 - kept / max(full, 1)}

    def reorder_cache(self, beam_idx):
        for layer_idx, stored in self.buffers.items():
            index = beam_idx.to(stored[0].device)
            self.buffers[layer_idx] = tuple(t.index_select(0, index) for t in stored)
            if layer_idx in self.last_position:
                self.last_position[layer_idx] = self.last_position[layer_idx].index_select(0, index)

    def crop(self, max_length):
        raise NotImplementedError("S2KVCache cannot be cropped (assisted decoding): use the default cache")
