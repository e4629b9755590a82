"""A stand-in for LLaDA's shipped model code, written for the tests of this
project: a tiny bidirectional transformer (rotary positions computed on the
fly, no [MASK]-specific parts) that keeps the traits of code written for
transformers 4.x which matter when loading it under 5.x:

- __init__ never calls post_init();
- tie_weights(self) takes no arguments;
- forward reads `self.config.use_cache`;
- forward accepts `attention_mask` and ignores it;
- importing the module registers the model with AutoModel itself;
- logits at position i predict token i (no shift).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada_like import LladaLikeConfig


def rotate(x, theta):
    """Rotary position embedding of x (B, H, T, D), positions 0..T-1."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angle = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)[:, None] * freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.theta = config.n_heads, config.rope_theta
        self.attn_norm = nn.LayerNorm(config.d_model)
        self.att_proj = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.ff_norm = nn.LayerNorm(config.d_model)
        self.ff_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, config.d_model, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.att_proj(self.attn_norm(x)).split(C, dim=-1)
        q, k, v = (z.view(B, T, self.n_heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(rotate(q, self.theta), rotate(k, self.theta), v)
        x = x + self.attn_out(a.transpose(1, 2).reshape(B, T, C))
        return x + self.ff_out(F.silu(self.ff_proj(self.ff_norm(x))))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.ff_out = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, input_ids):
        x = self.wte(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.ff_out(self.ln_f(x))


class LladaLikeModelLM(PreTrainedModel):
    config_class = LladaLikeConfig
    base_model_prefix = "model"

    def __init__(self, config, model=None, init_params=False):
        super().__init__(config)
        self.model = model or Transformer(config)        # trait: no self.post_init()

    def tie_weights(self):                                # trait: the 4.x signature
        if self.config.weight_tying:
            self.model.ff_out.weight = self.model.wte.weight

    def get_input_embeddings(self):
        return self.model.wte

    def forward(self, input_ids, attention_mask=None, use_cache=None, return_dict=None, **kwargs):
        use_cache = use_cache if use_cache is not None else self.config.use_cache  # trait
        if use_cache:
            raise NotImplementedError("this stand-in has no cache")
        # trait: attention_mask is accepted and ignored
        return CausalLMOutputWithPast(logits=self.model(input_ids))


AutoModel.register(LladaLikeConfig, LladaLikeModelLM)    # trait: registers itself
