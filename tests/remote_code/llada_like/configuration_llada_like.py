"""Configuration of a stand-in for LLaDA's shipped code (see modeling_llada_like.py)."""
from transformers import PretrainedConfig


class LladaLikeConfig(PretrainedConfig):
    model_type = "llada_like"

    def __init__(self, vocab_size=32, d_model=32, n_heads=2, n_layers=2, mlp_hidden_size=64,
                 max_sequence_length=64, rope_theta=10000.0, weight_tying=False,
                 mask_token_id=None, **kwargs):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.weight_tying = weight_tying
        self.mask_token_id = mask_token_id
        # Trait: `use_cache` travels in kwargs, as in configs written for
        # transformers 4.x; 5.x drops it there with the other generation settings.
        super().__init__(**kwargs)
