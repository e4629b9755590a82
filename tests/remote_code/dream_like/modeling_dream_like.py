"""A stand-in for Dream's shipped model code, written for the tests of this
project: a tiny bidirectional transformer with rotary positions that keeps
the traits of code written for transformers 4.x which matter under 5.x:

- the rotary embedding looks up ROPE_INIT_FUNCTIONS["default"] (removed in 5.x);
- its inverse frequencies are a non-persistent buffer that _init_weights does
  not set (5.x leaves such buffers uninitialised); reset_rope_parameters()
  computes them again;
- from_pretrained loads a GenerationConfig subclass whose validate has the
  4.x signature;
- _tied_weights_keys is a list (5.x expects a dict);
- forward takes no mask, "full", or a 4-D boolean mask; a 2-D mask raises;
- the model predicts shifted: logits at position i are its prediction for
  token i + 1, as in the autoregressive model it would be adapted from.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_dream_like import DreamLikeConfig
from .generation_utils import DreamLikeGenerationConfig


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class RotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_scaling or {}).get("rope_type", "default")
        self.rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]          # trait
        inv_freq, self.attention_scaling = self.rope_init_fn(config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)    # trait
        self.original_inv_freq = self.inv_freq

    def reset_parameters(self):
        inv_freq, self.attention_scaling = self.rope_init_fn(self.config, self.inv_freq.device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_inv_freq = self.inv_freq

    def forward(self, position_ids):
        angle = position_ids[..., None].float() * self.inv_freq              # (B, T, D/2)
        return angle.cos(), angle.sin()


def rotate(x, cos, sin):
    d = x.shape[-1] // 2
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return torch.cat([x[..., :d] * cos - x[..., d:] * sin, x[..., :d] * sin + x[..., d:] * cos], -1)


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, self.heads = config.hidden_size, config.num_attention_heads
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(h, h) for _ in range(3))
        self.o_proj = nn.Linear(h, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.up_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, h, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, C = x.shape
        y = self.input_layernorm(x)
        q, k, v = (p(y).view(B, T, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v,
                                           attn_mask=mask)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.down_proj(F.silu(self.up_proj(self.post_attention_layernorm(x))))


class DreamLikePreTrainedModel(PreTrainedModel):
    config_class = DreamLikeConfig
    base_model_prefix = "model"

    def _init_weights(self, module):                      # trait: Linear and Embedding only
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.generation_config = DreamLikeGenerationConfig.from_pretrained(  # trait
            pretrained_model_name_or_path)
        return model


class DreamLikeBaseModel(DreamLikePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = self.rotary_emb(position_ids)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attention_mask)
        return self.norm(x)


class DreamLikeModel(DreamLikePreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]               # trait: a list

    def __init__(self, config):
        super().__init__(config)
        self.model = DreamLikeBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def reset_rope_parameters(self):
        self.model.rotary_emb.reset_parameters()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        if isinstance(attention_mask, str) and attention_mask == "full":
            attention_mask = None
        elif attention_mask is not None and attention_mask.dim() != 4:    # trait
            raise ValueError("attention_mask must be None, 'full' or a 4-D boolean mask")
        elif attention_mask is not None:
            attention_mask = attention_mask.bool()
        hidden = self.model(input_ids, attention_mask, position_ids)
        return MaskedLMOutput(logits=self.lm_head(hidden))  # trait: position i predicts i + 1
