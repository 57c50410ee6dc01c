"""
model.py: the reasoner. A from-scratch Qwen2 / Llama decoder that loads Hugging Face safetensors folders, a
preallocated KV cache with per-row validity masks, and batched sampling. The tokenizer lives in tokenizer.py;
`generate` takes any tokenizer object with its interface (encode, decode, pad_id, eos_ids, vocab_size).

Read top to bottom:
  1. Config          - what we read from config.json
  2. KVCache         - a slot count per row + a (batch, slots) "valid" mask, so rows may hold different numbers of
                       real positions (padding, or latents inserted in some rows only); its docstring is the one
                       description of the begin / update / end / rollback contract
  3. Transformer     - RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP; module names mirror the HF checkpoint
                       (linear layers fed a few rows take a faster route on a CPU: `linear`)
  4. load_model      - a local folder only: meta-device construction + safetensors with assign=True (never two copies
                       in memory); scripts turn hub ids into folders first (data/download.py:resolve_model)
  5. generate        - prefill once, then one token per step from the cache
  6. Steps           - the decode steps' calls in fixed shapes on a static cache, replayed as CUDA graphs on a GPU
                       (graphs=False, a CPU's default, is the plain loop of 5)
"""
import copy
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# 1. Config

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "SmolLM3ForCausalLM": "smollm3"}


class ModelError(ValueError):
    """A bad model folder or a bad argument: the message says what and what to do."""


@dataclass
class Config:
    arch: str  # "qwen2", "llama" or "smollm3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads means grouped-query attention
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 has biases on q/k/v, Llama does not
    max_positions: int
    name: str = ""  # the model's folder name, recorded in adapter files
    # per layer: does it rotate q and k? SmolLM3 leaves every fourth layer without position information (NoPE);
    # empty = every layer does
    rope_layers: tuple = ()


def read_config(path):
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ModelError(f"{file} not found: --model must be a Hugging Face model folder holding config.json")
    try:
        with open(file) as f:
            c = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelError(f"{file} is not valid JSON ({e})") from None

    def need(key):
        if key not in c:
            raise ModelError(f"{file} has no '{key}', which this model needs")
        return c[key]

    archs = need("architectures")
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ModelError(f"{file}: architecture {archs} is not supported (supported: {', '.join(ARCHITECTURES)})")
    # transformers >= 5 writes rope_theta inside rope_parameters; older configs keep it at the top level
    rope = c.get("rope_parameters") or {}
    rope_theta = c.get("rope_theta", rope.get("rope_theta"))
    if rope_theta is None:
        raise ModelError(f"{file} has no 'rope_theta', which this model needs")
    scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise ModelError(f"{file}: rope scaling {scaling} is not supported; only plain rotary embeddings are")
    if c.get("use_sliding_window"):
        raise ModelError(f"{file}: use_sliding_window=true is not supported")
    heads = need("num_attention_heads")
    if c.get("mlp_bias") or (arch == "smollm3" and c.get("attention_bias")):
        raise ModelError(f"{file}: mlp_bias / attention_bias on a {archs[0]} are not supported")
    rope_layers, layers = (), need("num_hidden_layers")
    if arch == "smollm3":
        # no_rope_layers[i] = 1: layer i uses rotary; without the list, every no_rope_layer_interval-th layer does not
        every = c.get("no_rope_layer_interval") or 4
        flags = c.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(layers)]
        if len(flags) < layers:
            raise ModelError(f"{file}: no_rope_layers has {len(flags)} entries for {layers} layers")
        rope_layers = tuple(bool(f) for f in flags[:layers])
    return Config(
        arch=arch,
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or need("hidden_size") // heads,
        intermediate_size=need("intermediate_size"),
        rope_theta=float(rope_theta),
        rms_eps=need("rms_norm_eps"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else bool(c.get("attention_bias", False)),
        max_positions=need("max_position_embeddings"),
        name=os.path.basename(os.path.normpath(path)),
        rope_layers=rope_layers,
    )


# ----------------------------------------------------------------------------------------------------------------
# 2. KV cache


class KVCache:
    """
    Keys and values of every layer for `batch` rows, with per-row bookkeeping:
      lens[b]      slots row b has used (rows may differ: a row that inserts K latents moves on by K, the others
                   do not),
      valid[b, s]  whether slot s of row b holds a real position (False for padding and for rolled-back slots),
      next_pos[b]  the rotary position id of row b's next real position.
    A forward call may touch only some rows (`rows=`): MemGen runs the weaver, the trigger and a latent insertion
    for just the rows that need them, and the other rows pay nothing.

    Two storage modes. With max_len the storage is preallocated, (batch, kv_heads, max_len + 1, head_dim) per layer
    (fast decoding, no grad). Without it, every call appends to all rows by concatenation, which autograd needs
    (writing in place into a tensor that an earlier step read would break backward); MemGen's training forward uses
    that mode, and there every call and every rollback covers all rows (rows=None), else ModelError.

    The scratch slot (preallocated mode): one spare slot past the end, index max_len. A batched call gives every row
    T new slots from its own lens[b], so padding of a row far along, batched with a row feeding a long segment, may
    fall past max_len. Such slots are clamped onto the scratch slot, which is written but never valid and never
    counted in lens. Only a real position past max_len means the cache is full (ModelError).

    One forward call is begin, then update once per layer, then end (Transformer.forward does this). The state
    between them lives on the cache (self.rows, self.slots, self.uniform, self.end_slot):
      begin(mask, rows)    mask (B', T): which of the T new positions are real; rows (B',) long: the cache rows of
                           the call (None = all, in order). It stores
                             rows      the call's rows,
                             slots     (B', T) the slot of each new position, lens[row] + 0..T-1, clamped onto the
                                       scratch slot where that runs past max_len,
                             uniform   True when rows is None, every row is at the same slot l0 and nothing is
                                       clamped: update then writes the plain slice [l0, l0 + T) instead of indexing
                                       per row,
                             end_slot  the number of slots the call sees: max(lens) + T (max_len + 1 when clamped);
                           writes mask into valid at those slots (appends it in growing mode) and returns the
                           (B', 1, T, end_slot) boolean attention mask: a new position sees the valid slots of its row
                           up to its own slot (causal in slot order, so a row never reads stale slots past its own),
                           and always itself, so a padding query never has an all -inf softmax row (no real query
                           ever sees a padding key, so this cannot leak).
      update(layer, k, v)  k, v (B', kv_heads, T, head_dim), rotated, of one layer: written at `slots` of `rows`
                           (appended in growing mode); returns that layer's keys and values of slots [0, end_slot)
                           for the call's rows, this call's included.
      end(mask)            commits the call: next_pos[row] += its number of real new positions; lens[row] moves to
                           just past its last real new slot (preallocated: trailing padding - a finished row, or a
                           row that sat out a latent insertion - is overwritten by its next call instead of taking up
                           room), or by T (growing: the columns exist for all rows). Clears rows.
    rollback(n, rows) runs between calls and forgets the last n slots of `rows` (default all): MemGen drops the
    weaver's K query slots after reading their states. Preallocated: slots lens-n .. lens-1 become invalid, lens -= n
    and next_pos moves back by the real ones among them. Growing: the columns stay (autograd holds them), but the last
    n real slots of every row become invalid and next_pos moves back by as many (at most the row's real count).
    Packed rows (Transformer.forward's `segments`) work with no cache or a growing one: `segments` keeps the segment id
    of every slot so far, and a position attends only to earlier slots of its own segment.
    """

    def __init__(self, cfg, batch, max_len=None, device="cpu", dtype=torch.float32, static=False):
        if static and not max_len:
            raise ModelError("a static cache needs max_len")
        self.max_len, self.static = max_len, static
        size = max_len + 1 if max_len else 0  # + the scratch slot
        shape = (batch, cfg.num_kv_heads, size, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.valid = torch.zeros(batch, size, dtype=torch.bool, device=device)
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.rows = None
        self.segments = None  # (batch, slots) segment ids of packed rows, growing mode only

    def begin(self, mask, rows=None):
        """Start a call: place T new slots for `rows` with validity `mask` (B', T); return the attention mask.
        Contract: the class docstring."""
        B, T = mask.shape
        self.rows = rows
        if self.static:
            return self._begin_static(mask, rows)
        lens = self.lens if rows is None else self.lens[rows]
        l0 = int(lens[0])
        # the common case (every row at the same slot) writes plain slices; otherwise index the slots per row
        self.uniform = rows is None and bool((lens == l0).all())
        self.slots = lens[:, None] + torch.arange(T, device=mask.device)  # (B', T) slot of each new position
        end = int(lens.max()) + T
        if self.max_len is None:
            if rows is not None:
                raise ModelError("a growing (autograd) cache runs all rows together")
            self.valid = valid = torch.cat([self.valid, mask], 1)
        else:
            if end > self.max_len:
                need = int(torch.where(mask, self.slots + 1, 0).max())  # past the last real slot
                if need > self.max_len:
                    raise ModelError(f"KV cache is full: {need} slots needed, {self.max_len} allocated")
                self.slots = self.slots.clamp(max=self.max_len)  # only padding lands on the scratch slot
                self.uniform = False
                end = self.max_len + 1
            if self.uniform:
                self.valid[:, l0:l0 + T] = mask
                valid = self.valid[:, :end]
            else:
                r = torch.arange(B, device=mask.device) if rows is None else rows
                self.valid[r[:, None], self.slots] = mask
                valid = self.valid[r, :end]
        key = torch.arange(end, device=mask.device)
        allowed = (key <= self.slots[:, :, None]) & valid[:, None, :]  # causal in slot order, real keys only
        # every query sees itself: no all -inf softmax row for a padding query (NaN), and no leak (class docstring)
        allowed |= key == self.slots[:, :, None]
        self.end_slot = end
        return allowed[:, None]

    def _begin_static(self, mask, rows):
        """begin() in fixed shapes with no host-device sync, for calls replayed as CUDA graphs: a call attends over
        all max_len + 1 slots (what the graph recorded cannot depend on lens), writes per row at its own slots, and
        sends slots past max_len (padding only: the cache is sized so real positions fit) to the scratch slot. rows
        may repeat an index only for rows whose mask is all False (a spare row that pads a call to a fixed count).
        The allowed mask is begin()'s, padded with slots no row may see."""
        B, T = mask.shape
        self.uniform, self.end_slot = False, self.max_len + 1
        lens = self.lens if rows is None else self.lens[rows]
        self.slots = (lens[:, None] + torch.arange(T, device=mask.device)).clamp(max=self.max_len)
        if rows is None:
            self.valid.scatter_(1, self.slots, mask)
            valid = self.valid
        else:
            self.valid[rows[:, None], self.slots] = mask
            valid = self.valid[rows]
        key = torch.arange(self.end_slot, device=mask.device)
        allowed = (key <= self.slots[:, :, None]) & valid[:, None, :]
        allowed |= key == self.slots[:, :, None]
        return allowed[:, None]

    def reset(self):
        """Empty the cache in place (a static cache is reused, with the graphs that captured its storage)."""
        self.lens.zero_()
        self.next_pos.zero_()
        self.valid.zero_()
        self.rows = None

    def update(self, layer, k, v):
        """Write this call's keys/values of one layer; return all keys/values the call attends to (class docstring)."""
        end = self.end_slot
        if self.max_len is None:
            if self.k[layer].shape[2]:  # an empty cache (an uncached forward) takes k, v as they are: no copy
                k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
            self.k[layer], self.v[layer] = k, v
            return k, v
        K, V = self.k[layer], self.v[layer]
        if self.uniform:
            start = end - k.shape[2]
            K[:, :, start:end], V[:, :, start:end] = k, v
            return K[:, :, :end], V[:, :, :end]
        r = torch.arange(k.shape[0], device=k.device) if self.rows is None else self.rows
        heads = torch.arange(k.shape[1], device=k.device)
        idx = (r[:, None, None], heads[None, :, None], self.slots[:, None, :])
        K[idx], V[idx] = k, v
        if self.rows is None:
            return K[:, :, :end], V[:, :, :end]
        return K[self.rows, :, :end], V[self.rows, :, :end]

    def end(self, mask):
        """Commit the call: advance lens and next_pos of its rows (class docstring)."""
        T = mask.shape[1]
        if self.max_len is None:
            advance = torch.full_like(mask[:, 0], T, dtype=torch.long)
        else:
            advance = (mask * torch.arange(1, T + 1, device=mask.device)).amax(1)
        if self.rows is None:  # in place: a captured graph holds these tensors
            self.lens += advance
            self.next_pos += mask.sum(1)
        else:
            self.lens[self.rows] += advance
            self.next_pos[self.rows] += mask.sum(1)
        self.rows = None

    def copy_rows(self, src, dst):
        """Rows dst (long) become copies of rows src (preallocated mode): a prompt read once for every row that
        shares it (shared_prompts). Only the slots the source rows have used are copied."""
        if self.max_len is None:
            raise ModelError("copy_rows needs a preallocated cache")
        n = int(self.lens[src].max())
        for K, V in zip(self.k, self.v):
            K[dst, :, :n], V[dst, :, :n] = K[src, :, :n], V[src, :, :n]
        self.valid[dst] = self.valid[src]
        self.lens[dst], self.next_pos[dst] = self.lens[src], self.next_pos[src]

    def select(self, rows):
        """A new cache whose row j is row rows[j] of this one (rows (B',) long, may repeat): a prompt read once goes
        on in every row of its group (memgen.trigger_logprobs). In growing mode the keys and values stay in
        autograd's graph."""
        out = copy.copy(self)  # the settings; every per-row tensor is replaced
        out.k, out.v = [K[rows] for K in self.k], [V[rows] for V in self.v]
        out.valid, out.lens, out.next_pos = self.valid[rows], self.lens[rows], self.next_pos[rows]
        out.segments = None if self.segments is None else self.segments[rows]
        out.static, out.rows = False, None
        return out

    def rollback(self, n, rows=None, where=None):
        """Forget the last n slots of `rows` (MemGen drops the weaver's K query slots after reading them); see the
        class docstring for what "last n" means in each mode. where (B',) bool: of those rows, only the ones to roll
        back (a static cache's calls cover rows that sit out, marked here instead of left out)."""
        if self.max_len is None:
            # a growing cache keeps its columns (autograd holds them); the slots just stop being real
            if rows is not None or where is not None:
                raise ModelError("a growing (autograd) cache rolls back all rows together")
            after = self.valid.flip(1).cumsum(1).flip(1)  # real slots at or after each slot
            self.next_pos = self.next_pos - self.valid.sum(1).clamp(max=n)
            self.valid = self.valid & (after > n)
            return
        # indexed writes only (no host-device sync); rows whose where is False keep their slots
        r = torch.arange(len(self.lens), device=self.lens.device) if rows is None else rows
        live = torch.ones(len(r), dtype=torch.bool, device=r.device) if where is None else where
        slots = (self.lens[r][:, None] - n + torch.arange(n, device=self.lens.device)).clamp(min=0)
        old = self.valid[r[:, None], slots]
        self.next_pos[r] -= (old & live[:, None]).sum(1)
        self.valid[r[:, None], slots] = old & ~live[:, None]
        self.lens[r] -= n * live.long()


# ----------------------------------------------------------------------------------------------------------------
# 3. Transformer

FEW_ROWS = 64  # a CPU linear layer fed at most this many rows (a decode step) takes the W x^T route (linear)


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), faster for a few rows on a CPU. There, MKL multiplies a few rows of x by the
    transposed weight up to 4x slower than it computes the same product as weight @ x^T; from about 64 rows on the
    two are alike (docs/bench/few_rows.py, on the AMD machine of docs/performance.md). A decode step is nothing but
    such products, so this makes it 1.7-3x faster there; prefill, training and GPUs keep F.linear. The values agree
    up to float rounding."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows > FEW_ROWS:
        return F.linear(x, weight, bias)
    y = (weight @ x.reshape(rows, -1).t()).t().contiguous().view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) whose product is linear()'s."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in float32 as the reference does, then scale in the model's dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope(x, cos, sin):
    """Rotary embedding in the 'rotate half' layout of HF checkpoints. x: (B, heads, T, hd); cos/sin: (B, 1, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def one_query_attention(q, k, v, mask):
    """Attention for one new position per row (a decode step): two small matmuls, with the GQA group folded into
    the query axis so K/V are never repeated. On CPU, SDPA's kernels are several times slower at this shape."""
    B, H, T, D = q.shape
    nkv = k.shape[1]
    g = H // nkv
    s = (q.reshape(B, nkv, g * T, D) @ k.transpose(-1, -2)).float() * D ** -0.5
    s = s.view(B, nkv, g, T, -1).masked_fill(~mask[:, :, None], float("-inf"))
    p = torch.softmax(s, -1).to(q.dtype).view(B, nkv, g * T, -1)
    return (p @ v).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg, use_rope=True):
        super().__init__()
        self.use_rope = use_rope
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if self.use_rope:
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # all slots so far, this step's included
        # an explicit boolean mask (True = may attend); never is_causal, which is wrong once a cache is non-empty
        if T == 1:
            y = one_query_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nkv != self.nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, use_rope=True):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg, use_rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()  # the checkpoint's "model." prefix
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg, not cfg.rope_layers or cfg.rope_layers[i])
                                          for i in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        # tied models reuse the embedding matrix as the output head, so their checkpoints hold no lm_head.weight
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_rope()

    def init_rope(self, device=None):
        # a non-persistent buffer: not in the checkpoint, rebuilt after loading onto the meta device
        hd = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def head(self, h):
        """Final hidden states -> vocabulary logits."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(h, w)

    def forward(self, input_ids=None, inputs_embeds=None, positions=None, cache=None, mask=None, logits="all",
                rows=None, segments=None):
        """
        input_ids (B, T) or inputs_embeds (B, T, D): the new positions (MemGen feeds latents through inputs_embeds).
        mask (B, T) bool: which new positions are real (False = padding or an unused slot); default all real.
        positions (B, T): rotary position ids; by default each row continues from its own count of real positions.
        cache: a KVCache, extended in place by these T slots.
        rows (B,) long: which rows of the cache these B inputs belong to (default: all of them, in order).
        logits: "all", "last" (only each row's last real position, enough for sampling) or "none".
        segments (B, T) long: several sequences packed into one row (no padding to compute); a position attends
        only within its own segment (also across calls on a growing cache). Needs explicit positions and no cache or
        a growing one.
        Returns (logits or None, last hidden state after the final norm (B, T, D)).
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if segments is not None and (positions is None or (cache is not None and cache.max_len is not None)):
            raise ModelError("packed segments need explicit positions and no cache or a growing one")
        if cache is None:
            # a throwaway growing cache makes the uncached forward the same code path as the cached one
            cache = KVCache(self.cfg, B, device=x.device, dtype=x.dtype)
        if positions is None:
            start = cache.next_pos if rows is None else cache.next_pos[rows]
            positions = (start[:, None] + mask.long().cumsum(1) - 1).clamp(min=0)
        attn_mask = cache.begin(mask, rows)  # (B, 1, T, slots)
        if segments is not None:
            keys = segments if cache.segments is None else torch.cat([cache.segments, segments], 1)
            cache.segments = keys
            attn_mask = attn_mask & (segments[:, None, :, None] == keys[:, None, None, :])

        freqs = positions[..., None].float() * self.inv_freq  # rotary angles in float32, as the reference
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, attn_mask, cache, i)
        cache.end(mask)
        h = self.model.norm(x)
        if logits == "none":
            return None, h
        if logits == "last" and T > 1:  # each row's last real position (rows may end at different slots)
            last = (mask * torch.arange(1, T + 1, device=x.device)).amax(1).clamp(min=1) - 1
            # a gather, so contiguous: on CPU a strided (B, 1, D) slice sends F.linear down a batched matmul that
            # first copies the whole (vocab x D) head once per row (450 MB for SmolLM2 at batch 8)
            return self.head(h.gather(1, last[:, None, None].expand(-1, 1, h.shape[-1]))), h
        return self.head(h), h


# ----------------------------------------------------------------------------------------------------------------
# 4. Loading


def pick_dtype(dtype="auto", device="cpu"):
    """"auto": bfloat16 on GPUs that support it and on CPUs with native bf16 (avx512_bf16 / amx_bf16), else
    float32 - on CPUs without those instructions bf16 matmuls are several times slower than float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype in table:
        return table[dtype]
    if dtype != "auto":
        raise ModelError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def pick_device(device="auto"):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def safetensors_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise ModelError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ModelError(f"{path} holds no model.safetensors (nor model.safetensors.index.json): "
                     "pass a Hugging Face model folder with safetensors weights")


def load_model(path, dtype="auto", device="auto"):
    """Load a local Qwen2/Llama HF folder into a Transformer. Hub ids are the scripts' business: they download them
    once with data.download.resolve_model and pass the folder here."""
    if not os.path.isdir(path):
        raise ModelError(f"model folder {path} not found; pass a local Hugging Face folder, or a hub id to a script, "
                         "which downloads it")
    cfg = read_config(path)
    device, dtype = pick_device(device), pick_dtype(dtype, pick_device(device))
    files = safetensors_files(path)
    from safetensors import safe_open

    with torch.device("meta"):
        model = Transformer(cfg)  # no memory yet: parameters are assigned from the checkpoint below
    state = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise ModelError(f"cannot read {file}: {e}. The file is truncated or corrupt; download it again") from None
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not match config.json: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}{' (and more)' if len(missing) + len(unexpected) > 10 else ''}")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ModelError(f"{path}: weight shapes do not match config.json: {'; '.join(bad[:3])}")
    model.load_state_dict(state, strict=True, assign=True)
    model.init_rope(device)
    model.requires_grad_(False)  # the reasoner is frozen; adapters (lora.py) add the trainable parameters
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# 5. Sampling


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """logits (B, V) -> (B,) token ids. temperature 0 is greedy; top_p keeps the smallest nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep tokens until the mass before them reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts, pad_id, device):
    """Lists of ids -> (B, T) ids and a mask of the real ones, padded on the left so all rows end together."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = True
    return ids.to(device), mask.to(device)


def shared_prompts(keys, device):
    """GRPO and the trigger draw a group of completions per prompt, pass@k draws k: those rows start from the same
    prompt, and reading it once for all of them saves (group - 1) / group of the prefill. keys: per row, what its
    prefill reads (the prompt ids). -> None when every row differs, else (first (U,) long: the first row of each
    distinct key, of_row (B,) long: each row's position in first). The prefill runs on rows `first` only; then
    cache.copy_rows(first[of_row], all rows) and out[of_row] spread it to every row."""
    seen, first, of_row = {}, [], []
    for b, key in enumerate(keys):
        if key not in seen:
            seen[key] = len(first)
            first.append(b)
        of_row.append(seen[key])
    if len(first) == len(keys):
        return None
    return torch.tensor(first, device=device), torch.tensor(of_row, device=device)


def prefill_shared(cache, share, call, *inputs):
    """call(*inputs, rows) into cache, once per distinct prompt when share (shared_prompts) is given: inputs (B, ...)
    are cut to the rows `first`, the cache rows of the others are copied from them, and call's outputs (tensors of
    (rows, ...), or None) come back for all B rows."""
    if share is None:
        return call(*inputs, None)
    first, of_row = share
    outs = call(*[x[first] for x in inputs], first)
    cache.copy_rows(first[of_row], torch.arange(len(of_row), device=of_row.device))
    return tuple(None if o is None else o[of_row] for o in outs)


def check_prompts(model, prompts, max_new_tokens):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ModelError("every prompt must hold at least one token")
    longest = max(len(p) for p in prompts)
    if longest >= model.cfg.max_positions:
        raise ModelError(f"a prompt has {longest} tokens, but the model takes at most {model.cfg.max_positions} "
                         "positions: shorten the prompt")
    return min(max_new_tokens, model.cfg.max_positions - longest)


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0, keep_eos=False,
             graphs=None):
    """
    Batched sampling. prompts: lists of token ids (see Tokenizer.chat) or strings (encoded as plain text).
    Prefill once, then one token per step from the cache; each row stops at its first EOS. graphs: decode steps in
    fixed shapes, replayed as CUDA graphs (section 6; None = GRAPHS); the tokens are the same either way.
    Returns (list of generated id lists, EOS excluded unless keep_eos (RL scores it); list of decoded texts).
    """
    prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    max_new_tokens = check_prompts(model, prompts, max_new_tokens)
    ids, mask = left_pad(prompts, tokenizer.pad_id, model.device)
    B = len(prompts)
    steps = Steps.open(model, "reasoner", B, ids.shape[1] + max_new_tokens, graphs)
    cache = steps.cache
    gen = torch.Generator(device=model.device).manual_seed(seed)
    eos = torch.tensor(tokenizer.eos_ids, device=model.device)
    out = torch.full((B, max_new_tokens), tokenizer.pad_id, dtype=torch.long, device=model.device)
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    # rows that repeat a prompt read it once (not in train mode: each row's adapter dropout is its own draw)
    share = None if model.training else shared_prompts([tuple(p) for p in prompts], model.device)
    logits, _ = prefill_shared(cache, share, lambda ids, mask, rows: model(ids, mask=mask, cache=cache, rows=rows,
                                                                          logits="last"), ids, mask)
    V = tokenizer.vocab_size  # models pad their vocabulary (Qwen: 151,936 rows, 151,665 tokens): never sample those
    for t in range(max_new_tokens):
        tok = sample(logits[:, -1, :V], temperature, top_p, gen)
        tok = torch.where(done, tokenizer.pad_id, tok)
        out[:, t] = tok
        done = done | torch.isin(tok, eos)
        if t == max_new_tokens - 1 or steps.stop_check(t) and bool(done.all()):
            break
        if steps.static:  # finished rows feed an invalid slot: a fixed shape, and they cost nothing that matters
            logits = steps("token", lambda tok, real: model(tok, cache=cache, mask=real, logits="last")[0],
                           tok=tok[:, None], real=~done[:, None])
        elif not bool(done.any()):
            logits = model(tok[:, None], cache=cache, logits="last")[0]
        else:  # a CPU pays for every row it computes: just the unfinished rows (finished rows' logits go unread)
            live = (~done).nonzero().squeeze(1)
            logits[live] = model(tok[live, None], cache=cache, rows=live, logits="last")[0]
    return finish(out, tokenizer, keep_eos)


def finish(out, tokenizer, keep_eos=False):
    """Cut each row at its first EOS (kept in the ids when keep_eos; never in the text) and decode."""
    eos = set(tokenizer.eos_ids)
    seqs, texts = [], []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        seqs.append(row[:cut + 1] if keep_eos and cut < len(row) else row[:cut])
        texts.append(tokenizer.decode(row[:cut]))
    return seqs, texts


# ----------------------------------------------------------------------------------------------------------------
# 6. Decode steps as CUDA graphs
#
# On a GPU a decode step of a 1.5B model reads 3 GB of weights in about 1 ms, but launching its ~400 kernels one by
# one from Python takes ~20 ms: the loop is bound by launches, not by the GPU. The cure (gpt-fast's) is to record a
# step once as a CUDA graph and replay it with one launch. A graph replays fixed shapes and fixed memory, so the
# calls it records run on a static KVCache (KVCache._begin_static: all rows, all slots, no host-device sync) and
# read their inputs from buffers that each replay refills. Everything else of the loop (sampling, MemGen's
# decisions) stays plain PyTorch around the replays. graphs=False (the default on a CPU) is today's plain loop:
# growing slices of a preallocated cache and calls on just the rows that need them.

GRAPHS = "auto"  # the default of every decode loop: "auto" (on with CUDA, off on a CPU) | True | False; the scripts'
# --graphs setting sets it (set_graphs)
STOP_EVERY = 8  # with graphs, look whether every row has finished only every this many steps (each look syncs)


def use_graphs(graphs, device):
    """graphs: None (GRAPHS), "auto" (on with CUDA, off on a CPU), True or False; True on a CPU runs the static
    shapes without recording (what the tests compare with the plain loop)."""
    graphs = GRAPHS if graphs is None else graphs
    if graphs == "auto":
        return str(device).startswith("cuda")
    if isinstance(graphs, str):
        if graphs not in ("true", "false"):
            raise ModelError(f"graphs={graphs!r}: use auto, true or false")
        graphs = graphs == "true"
    return bool(graphs)


def set_graphs(value):
    """The scripts' --graphs setting: checked, then the default of every decode loop."""
    global GRAPHS
    use_graphs(value, "cpu")
    GRAPHS = value


class Steps:
    """
    The fixed-shape model calls of one decode loop on one cache. steps(key, fn, **inputs) returns fn(**inputs):
    eagerly, or (on CUDA, graphs on) by replaying the graph recorded at the first call with this key, the input
    shapes and the active adapter. fn may change only the cache, in place, and must not sync with the host; its
    outputs are valid until the next replay of the same graph.
    Steps.open keeps one static cache per name on the model between generate calls, so a graph is recorded once
    per shape rather than once per call; with graphs off it is a plain KVCache and steps(...) just calls fn.
    """

    def __init__(self, model, cache, graphs):
        self.model, self.cache, self.static = model, cache, graphs
        self.cuda = graphs and cache.valid.is_cuda
        self.graphs = {}

    @staticmethod
    def open(model, name, batch, slots, graphs=None):
        if not use_graphs(graphs, model.device):
            return Steps(model, KVCache(model.cfg, batch, slots, model.device, model.dtype), False)
        slots = -(-slots // 256) * 256  # a few sizes, so that later calls with other prompt lengths reuse graphs
        pool = model.__dict__.setdefault("static_steps", {})
        s = pool.get(name)
        if s is None or s.cache.max_len != slots or len(s.cache.lens) != batch or s.cache.k[0].dtype != model.dtype:
            pool.pop(name, None)  # free the old cache and graphs before allocating new ones
            s = pool[name] = Steps(model, KVCache(model.cfg, batch, slots, model.device, model.dtype, static=True),
                                   True)
        s.cache.reset()
        return s

    def stop_check(self, t):
        """Whether to look at step t if every row has finished (a host sync: with graphs, every few steps)."""
        return not self.static or t % STOP_EVERY == STOP_EVERY - 1

    def __call__(self, key, fn, **inputs):
        if not self.cuda:
            return fn(**inputs)
        adapter = getattr(getattr(self.model, "lora_switch", None), "active", None)
        key = (key, adapter, tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items()))
        if key not in self.graphs:
            self.graphs[key] = self.record(fn, inputs)
        graph, static, out = self.graphs[key]
        for k, v in inputs.items():
            static[k].copy_(v)
        graph.replay()
        return out

    def record(self, fn, inputs):
        """Warm up on a side stream (cuBLAS and the allocator set themselves up), put the cache back as it was,
        then record one call into a graph with its own memory pool."""
        c = self.cache
        saved = [t.clone() for t in (c.lens, c.next_pos, c.valid)]
        static = {k: v.clone() for k, v in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(**static)
        torch.cuda.current_stream().wait_stream(side)
        for t, v in zip((c.lens, c.next_pos, c.valid), saved):
            t.copy_(v)  # the warm-up wrote only slots past lens, which count as empty again
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(**static)
        return graph, static, out
