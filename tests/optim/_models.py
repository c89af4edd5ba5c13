"""Small models shared by the optimizer tests."""

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in=7, hidden=13, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyBlock(nn.Module):
    """A GPT-style block with a fused QKV projection and a token embedding (no biases)."""

    def __init__(self, vocab=11, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.wte = nn.Embedding(vocab, dim)
        self.ln = nn.LayerNorm(dim, bias=False)
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.mlp_proj = nn.Linear(4 * dim, dim, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx)
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        x = x + self.mlp_proj(torch.relu(self.c_fc(self.ln(x))))
        return self.head(x)


def loss_of(model, batch):
    if isinstance(model, TinyBlock):
        logits = model(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def batch_for(model, gen):
    if isinstance(model, TinyBlock):
        return torch.randint(0, 11, (3, 6), generator=gen)
    return torch.randn(4, 7, generator=gen), torch.randn(4, 5, generator=gen)
