"""Configuration of a stand-in for Dream's shipped code (see modeling_dream_like.py)."""
from transformers import PretrainedConfig


class DreamLikeConfig(PretrainedConfig):
    model_type = "dream"  # as Dream's checkpoints say: bgpo reads logits shifted for it

    def __init__(self, vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=64, rope_theta=10000.0,
                 rope_scaling=None, initializer_range=0.02, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, mask_token_id=None, pad_token_id=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.mask_token_id = mask_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         **kwargs)
