"""A small generative retriever over semantic IDs (the model ``semid evaluate`` trains).

An item is its ID, M tokens: the L codes, then the dedup code, each level with its own
vocabulary (M = 1 with one token per item). The model has two parts:

* the history encoder: a causal transformer over a user's items, one position per item, the
  item's vector being the sum of its M code embeddings (so items sharing codes share
  parameters: the point of semantic IDs) plus a position embedding;
* the ID decoder: it generates the next item's M codes one level at a time, from the encoder's
  output at the last history position followed by the embeddings of the codes chosen so far;
  ``decoder_layers`` causal transformer blocks over those M tokens, or, with 0, a running sum
  of them (the cheapest autoregressive head). Each level has its own output layer.

TIGER (Rajput et al. 2023) is an encoder-decoder T5 whose decoder cross-attends to every history
token; here the decoder sees the history through one summary vector. One position per item
instead of M keeps the encoder's cost M times lower, which is what lets a useful model train on
2 CPU cores; ``encoder_layers``, ``decoder_layers``, ``heads`` x ``head_dim`` and ``mlp_dim``
reach TIGER's sizes (4 + 4 layers, 6 heads of 64, d_model 128, MLP 1024) for GPU runs.

Histories are left-aligned and padded on the right (item -1): with causal attention a position
never sees the padding after it, so no padding mask is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm causal self-attention and a GELU MLP (heads x head_dim need not equal d_model)."""

    def __init__(self, d_model: int, heads: int, head_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        qkv = self.qkv(self.norm1(x_BSD)).view(B, S, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x_BSD = x_BSD + self.drop(self.proj(a.transpose(1, 2).reshape(B, S, -1)))
        return x_BSD + self.drop(self.mlp(self.norm2(x_BSD)))


class Retriever(nn.Module):
    def __init__(
        self,
        vocab_sizes: list[int],
        max_history: int = 20,
        d_model: int = 128,
        encoder_layers: int = 2,
        decoder_layers: int = 1,
        heads: int = 4,
        head_dim: int = 32,
        mlp_dim: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.M = len(self.vocab_sizes)
        block = lambda: Block(d_model, heads, head_dim, mlp_dim, dropout)  # noqa: E731
        self.item_emb = nn.ModuleList(nn.Embedding(v, d_model) for v in self.vocab_sizes)
        self.pos_emb = nn.Embedding(max_history + 1, d_model)
        self.encoder = nn.ModuleList(block() for _ in range(encoder_layers))
        self.enc_norm = nn.LayerNorm(d_model)
        # the decoder's inputs: level embeddings of the codes chosen so far (not the last level's)
        self.code_emb = nn.ModuleList(nn.Embedding(v, d_model) for v in self.vocab_sizes[:-1])
        self.level_emb = nn.Embedding(self.M, d_model)
        self.decoder = nn.ModuleList(block() for _ in range(decoder_layers))
        self.dec_norm = nn.LayerNorm(d_model)
        self.heads = nn.ModuleList(nn.Linear(d_model, v) for v in self.vocab_sizes)
        self.drop = nn.Dropout(dropout)
        self.apply(_init)

    # --- the history -------------------------------------------------------------------------
    def encode_history(self, codes_BSM: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
        """(B, S, d): position t summarises items 0..t. codes_BSM: codes of each history item
        (any value where valid_BS is False: those rows embed to zero)."""
        x = sum(emb(codes_BSM[..., m]) for m, emb in enumerate(self.item_emb))
        x = x * valid_BS.unsqueeze(-1)
        x = self.drop(x + self.pos_emb.weight[: x.shape[1]])
        for blk in self.encoder:
            x = blk(x)
        return self.enc_norm(x)

    # --- the ID ---------------------------------------------------------------------------------
    def decode(self, h_ND: torch.Tensor, prefix_NP: torch.Tensor) -> torch.Tensor:
        """Decoder states (N, P+1, d) for the codes after prefix_NP (P codes already chosen):
        state p predicts level p."""
        toks = [h_ND.unsqueeze(1)]
        toks += [self.code_emb[p](prefix_NP[:, p]).unsqueeze(1) for p in range(prefix_NP.shape[1])]
        z = torch.cat(toks, dim=1) + self.level_emb.weight[: len(toks)]
        if not self.decoder:
            return self.dec_norm(z.cumsum(dim=1))
        for blk in self.decoder:
            z = blk(z)
        return self.dec_norm(z)

    def loss(self, codes_BSM: torch.Tensor, valid_BS: torch.Tensor, target_BS: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy over the M levels of every target position (t >= 1: item t is
        predicted from items 0..t-1): a sum, so that ranks can add their shares of a batch."""
        h_BSD = self.encode_history(codes_BSM, valid_BS)
        b, t = torch.nonzero(target_BS, as_tuple=True)
        if b.numel() == 0:
            return h_BSD.sum() * 0.0  # still a graph: every rank takes part in the step
        want_TM = codes_BSM[b, t]
        g_TMD = self.decode(h_BSD[b, t - 1], want_TM[:, :-1])
        return sum(
            F.cross_entropy(head(g_TMD[:, m]), want_TM[:, m], reduction="sum")
            for m, head in enumerate(self.heads)
        )

    def next_logprobs(self, h_QD: torch.Tensor, prefix_QBd: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (Q, B, V_d) of level d's code after each beam's prefix."""
        Q, B, d = prefix_QBd.shape
        h = h_QD.unsqueeze(1).expand(Q, B, h_QD.shape[1]).reshape(Q * B, -1)
        g = self.decode(h, prefix_QBd.reshape(Q * B, d))[:, d]
        return F.log_softmax(self.heads[d](g).float(), dim=-1).view(Q, B, -1)


def _init(m: nn.Module) -> None:
    """GPT-style: small normal weights, zero biases."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
