"""A small GPT whose attention is either dot-product or RBF, with the positional schemes, registers
and exclusive self attention of the chapters as switches.

The whole model fits on a screen, on purpose: token embedding, ``n_layers`` pre-norm blocks
(``x + attention(norm(x))``, then ``x + mlp(norm(x))``), a final norm, and a head that shares the
embedding's weights. Everything that distinguishes the variants lives in :class:`CausalSelfAttention`:

* ``attention="rbf"`` scores keys by ``-|q - k|^2`` through :func:`rbf_tutorial.rbf_attention`;
  ``attention="dot"`` is the usual ``q . k`` (PyTorch SDPA, or an explicit matmul and softmax).
* ``positional`` picks how position enters: rotated queries and keys (``"rope"``), additive
  sinusoids with learnable scales on queries and keys (``"susie"``), a learned vector added to
  the embeddings (``"learned"``), or nothing (``"none"``; causal masking alone still breaks the
  symmetry between positions).
* ``registers=R`` puts ``R`` learnable keys/values, initialised at the origin, in front of every
  head's keys (:class:`rbf_tutorial.registers.RegisterTokens`).
* ``xsa=True`` removes from each attention output its component along the token's own value
  (:mod:`rbf_tutorial.xsa`).
* ``qk_norm=True`` RMS-normalises every query and key per head (with a learnable per-feature gain)
  before the positional encoding: the standard cure for dot-product's magnitude bullying, since no
  key can then win by being long (Henry et al. 2020, arXiv 2010.04245; Dehghani et al. 2023,
  arXiv 2302.05442).
* ``scale_factor`` multiplies the logit scale ``1/sqrt(hd)`` of either score. RBF logits are
  ``scale (2 q.k - |k|^2)``, so at equal scale RBF weighs ``q.k`` twice as strongly as dot product;
  ``scale_factor=0.5`` on RBF gives ``q.k`` the dot product's weight.

For analysis, ``forward(..., capture=[])`` fills the list with one :class:`AttentionCapture` per
layer (what attention saw and produced), and :meth:`GPT.attention_weights` turns a capture back
into the softmax weights for a heatmap.

Configs are plain dataclasses: take a preset and change fields with ``dataclasses.replace``, e.g.
``replace(MODEL_PRESETS["smoke"], attention="dot")`` (do not edit the preset objects in place).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import xsa as xsa_module
from .arguments import boolean, non_negative_int, positive_float, positive_int, probability
from .attention import BACKENDS, rbf_attention
from .backends import compute_dtype, default_scale
from .positional import LearnedPositions, SuSiE, apply_rope, rope_tables
from .reference import causal_softmax, causal_visibility, rbf_logits_reference
from .registers import RegisterTokens

__all__ = [
    "ATTENTIONS",
    "DOT_BACKENDS",
    "MODEL_PRESETS",
    "POSITIONALS",
    "AttentionCapture",
    "CausalSelfAttention",
    "GPT",
    "ModelConfig",
]

ATTENTIONS: tuple[str, ...] = ("dot", "rbf")
POSITIONALS: tuple[str, ...] = ("rope", "susie", "learned", "none")
#: Backends of dot-product attention; ``"auto"`` means ``"sdpa"``. RBF takes :data:`rbf_tutorial.BACKENDS`.
DOT_BACKENDS: tuple[str, ...] = ("sdpa", "matmul", "auto")


@dataclass
class ModelConfig:
    """Every size and switch of :class:`GPT`. :meth:`validate` says what is wrong, naming the field."""

    vocab_size: int = 256
    context: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    attention: str = "rbf"
    backend: str = "auto"
    positional: str = "rope"
    registers: int = 0
    xsa: bool = False
    qk_norm: bool = False
    scale_factor: float = 1.0
    tie_weights: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Raise ``TypeError``/``ValueError`` naming the first bad field and what was expected."""
        for name in ("vocab_size", "context", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: {self.n_heads} does not divide d_model {self.d_model}")
        probability("dropout", self.dropout)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention: expected one of {ATTENTIONS}, got {self.attention!r}")
        allowed_backends = BACKENDS if self.attention == "rbf" else DOT_BACKENDS
        if self.backend not in allowed_backends:
            raise ValueError(
                f"backend: attention={self.attention!r} takes one of {allowed_backends}, got {self.backend!r}"
            )
        if self.positional not in POSITIONALS:
            raise ValueError(f"positional: expected one of {POSITIONALS}, got {self.positional!r}")
        if self.positional in ("rope", "susie") and self.head_dim % 2:
            raise ValueError(
                f"positional: {self.positional!r} works on pairs of coordinates and needs an even head "
                f"dim, got d_model / n_heads = {self.d_model} / {self.n_heads} = {self.head_dim}"
            )
        non_negative_int("registers", self.registers)
        for name in ("xsa", "qk_norm", "tie_weights"):
            boolean(name, getattr(self, name))
        positive_float("scale_factor", self.scale_factor)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Runs a forward and backward in milliseconds on a laptop CPU: for tests and CI.
    "smoke": ModelConfig(context=64, d_model=64, n_layers=2, n_heads=2),
    # The sizes of the original RBF-attention experiment.
    "original": ModelConfig(context=256, d_model=256, n_layers=4, n_heads=4),
    # About 10 M parameters: a few minutes of training on one GPU; head dim 64.
    "gpu10": ModelConfig(context=512, d_model=384, n_layers=6, n_heads=6),
}


@dataclass
class AttentionCapture:
    """What one layer's attention saw and produced: detached float32 copies, heads split ``(B, H, T, hd)``.

    ``q``, ``k``, ``v`` are after the positional encoding (what the scores were computed from),
    without registers. ``y`` is the attention output before XSA and before the output projection,
    ``z`` the output after XSA (the same tensor values as ``y`` when XSA is off).
    ``register_k``/``register_v`` are ``(H, R, hd)``, or ``None`` without registers.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    register_k: torch.Tensor | None
    register_v: torch.Tensor | None


def _snapshot(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32).clone()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self attention, dot-product or RBF, with the config's positional scheme,
    registers and XSA. ``(B, T, d_model) -> (B, T, d_model)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)
        self.susie = SuSiE(config.n_heads, config.head_dim) if config.positional == "susie" else None
        self.registers = (
            RegisterTokens(config.n_heads, config.head_dim, config.registers) if config.registers else None
        )
        # One gain per feature, shared by the heads: RMSNorm's usual form, applied per head.
        self.q_norm = nn.RMSNorm(config.head_dim) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(config.head_dim) if config.qk_norm else None
        self.scale = config.scale_factor * default_scale(config.head_dim)

    def _position(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.positional == "rope":
            # Positions 0 .. T - 1 for queries and keys alike: one (cos, sin) table, reused across
            # layers and steps, as SuSiE reuses its unit table.
            cos, sin = rope_tables(q.shape[2], self.head_dim, dtype=q.dtype, device=q.device)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.config.positional == "susie":
            return self.susie(q, k)
        return q, k  # "learned" was added to the embeddings; "none" adds nothing

    def _dot_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax(q.k / sqrt(hd)) v with the bottom-right causal mask (registers in front stay visible)."""
        with_registers = k.shape[2] != q.shape[2]
        if self.config.backend == "matmul":
            weights = causal_softmax((q @ k.transpose(-2, -1)).to(compute_dtype(q.dtype)) * self.scale)
            return (weights.to(v.dtype) @ v).to(q.dtype)
        if not with_registers:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        # SDPA's is_causal is top-left aligned; with keys in front we need the bottom-right mask.
        visible = causal_visibility(q.shape[2], k.shape[2], device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=self.scale)

    def forward(self, x: torch.Tensor, capture: list[AttentionCapture] | None = None) -> torch.Tensor:
        batch, length, d_model = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._position(q, k)
        keys, values = (k, v) if self.registers is None else self.registers.prepend(k, v)

        if self.config.attention == "rbf" and self.config.xsa and capture is None:
            # One call: on the triton backend XSA runs in the kernel's epilogue. A capture records
            # the output before XSA too, so it takes the two steps below.
            z = rbf_attention(q, keys, values, causal=True, scale=self.scale, backend=self.config.backend,
                              exclusive=True)
        else:
            if self.config.attention == "rbf":
                y = rbf_attention(q, keys, values, causal=True, scale=self.scale, backend=self.config.backend)
            else:
                y = self._dot_attention(q, keys, values)
            # The own value of query i is v_i: registers are nobody's own value.
            z = xsa_module.exclusive(y, v) if self.config.xsa else y

        if capture is not None:
            capture.append(
                AttentionCapture(
                    q=_snapshot(q),
                    k=_snapshot(k),
                    v=_snapshot(v),
                    y=_snapshot(y),
                    z=_snapshot(z),
                    register_k=None if self.registers is None else _snapshot(self.registers.keys),
                    register_v=None if self.registers is None else _snapshot(self.registers.values),
                )
            )
        merged = z.transpose(1, 2).reshape(batch, length, d_model)
        return self.dropout(self.proj(merged))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.up = nn.Linear(config.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, config.d_model, bias=False)
        self.down.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = CausalSelfAttention(config)
        self.mlp_norm = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, capture: list[AttentionCapture] | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), capture)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """A decoder-only language model over ``config.vocab_size`` tokens; see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = (
            LearnedPositions(config.context, config.d_model) if config.positional == "learned" else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_weights:
            self.head.weight = self.token_embedding.weight

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2's recipe: small normal weights; the projections that write into the residual
        # stream shrink with depth, so the stream's variance does not grow with the layer count.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Trainable parameters, tied weights counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _check_tokens(self, name: str, tokens: object, allow_ignored: bool) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(
                f"{name}: expected a torch.Tensor of token ids (B, T), got {type(tokens).__name__}"
            )
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}: expected int64 token ids, got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError(f"{name}: expected shape (B, T) with T >= 1, got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.context:
            raise ValueError(
                f"{name}: sequence length {tokens.shape[1]} exceeds the model's context {self.config.context}"
            )
        if tokens.is_cuda or torch.compiler.is_compiling():
            # Checking values would wait for the GPU on every step, and break torch.compile graphs
            # (it reads a tensor's value); an out-of-range id then fails inside the embedding instead.
            return
        valid = (tokens >= 0) & (tokens < self.config.vocab_size)
        if allow_ignored:
            valid |= tokens == -100
        if not bool(valid.all()):
            raise ValueError(f"{name}: token ids must lie in [0, vocab_size={self.config.vocab_size})")

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        capture: list[AttentionCapture] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(B, T, vocab_size)`` and, with ``targets``, the mean cross-entropy (nats per token).

        Targets equal to ``-100`` are ignored. Pass ``capture=[]`` to collect one
        :class:`AttentionCapture` per layer (with XSA, capture computes attention and XSA as two
        separate steps, so the pre-XSA output ``y`` can be recorded).
        """
        self._check_tokens("idx", idx, allow_ignored=False)
        if targets is not None:
            self._check_tokens("targets", targets, allow_ignored=True)
            if targets.shape != idx.shape:
                raise ValueError(
                    f"targets: expected shape {tuple(idx.shape)} like idx, got {tuple(targets.shape)}"
                )
        if capture is not None and not isinstance(capture, list):
            raise TypeError(f"capture: expected a list to append to, or None, got {type(capture).__name__}")

        x = self.token_embedding(idx)
        if self.positions is not None:
            x = self.positions(x)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, capture)
        logits = self.head(self.final_norm(x)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def attention_weights(self, capture: AttentionCapture) -> torch.Tensor:
        """The softmax weights of one captured layer: ``(B, H, T, R + T)``, registers first, causal.

        Recomputed in float32 from the captured queries and keys with this model's score
        (``-s |q - k|^2`` or ``s q . k``, ``s = scale_factor / sqrt(hd)``); each row sums to one, and
        weights on future keys are zero. Materialises ``(B, H, T, R + T)``: for small inputs and heatmaps.
        """
        if not isinstance(capture, AttentionCapture):
            raise TypeError(f"capture: expected an AttentionCapture, got {type(capture).__name__}")
        q, k = capture.q.float(), capture.k.float()
        if capture.register_k is not None:
            register_keys = capture.register_k.to(k).expand(k.shape[0], -1, -1, -1)
            k = torch.cat([register_keys, k], dim=2)
        scale = self.config.scale_factor * default_scale(q.shape[-1])
        if self.config.attention == "rbf":
            logits = rbf_logits_reference(q, k, scale)
        else:
            logits = scale * (q @ k.transpose(-2, -1))
        return causal_softmax(logits)
