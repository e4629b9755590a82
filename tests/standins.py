"""Checkpoint directories laid out like LLaDA's and Dream's on the hub (config
with an auto_map, shipped .py files, safetensors weights, tokenizer files),
with tiny random weights and the stand-in code in tests/remote_code."""
import contextlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.dynamic_module_utils import get_class_from_dynamic_module

CODE = Path(__file__).parent / "remote_code"
CHARS = list("0123456789+=")

LLADA = dict(  # a mask id past the tokenizer's tokens, which name no mask (LLaDA: 126336)
    code="llada_like", config="configuration_llada_like.LladaLikeConfig",
    model="modeling_llada_like.LladaLikeModelLM", auto="AutoModel",
    specials={"<|endoftext|>": 12, "<|mdm_mask|>": 15}, mask_token=None,
    config_kwargs=dict(use_cache=False, max_sequence_length=64, vocab_size=16))
# LLaDA's own vocabulary size and special ids, for trying the README's command
# (slower: its 126464-way output layer dominates)
LLADA_FULL_VOCAB = dict(LLADA, specials={"<|endoftext|>": 126081, "<|mdm_mask|>": 126336},
                        config_kwargs=dict(LLADA["config_kwargs"], vocab_size=126464))
DREAM = dict(
    code="dream_like", config="configuration_dream_like.DreamLikeConfig",
    model="modeling_dream_like.DreamLikeModel", auto="AutoModel",
    specials={"<|endoftext|>": 12, "<|mask|>": 13}, mask_token="<|mask|>",
    config_kwargs=dict(max_position_embeddings=64, vocab_size=16),
    generation_config=dict(steps=8, alg="origin", temperature=0.0))


def tokenizer_files(path, specials, mask_token):
    """One token per character of the task, and the special tokens at their ids."""
    end = next(iter(specials))
    vocab = {**{t: i for i, t in enumerate(CHARS)}, **specials}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=end))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=end, pad_token=end,
                                        mask_token=mask_token)
    tokenizer.save_pretrained(path)
    return tokenizer


@contextlib.contextmanager
def rope_default_of_transformers_4():
    """The checkpoint was written under 4.x, whose ROPE_INIT_FUNCTIONS had a
    "default" entry; building its random weights here needs it back."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    import real_dllm
    added = "default" not in ROPE_INIT_FUNCTIONS
    ROPE_INIT_FUNCTIONS.setdefault("default", real_dllm.default_rope_parameters)
    try:
        yield
    finally:
        if added:
            del ROPE_INIT_FUNCTIONS["default"]


def make_standin(kind, path, seed=0):
    """Write a tiny random checkpoint of `kind` (LLADA or DREAM) to `path`,
    as its authors' 4.x code would have saved it. Returns the tokenizer."""
    path = Path(path)
    build = path.parent / f"build-{path.name}"          # the stand-in code, imported from here
    shutil.copytree(CODE / kind["code"], build, dirs_exist_ok=True)
    shutil.copytree(CODE / kind["code"], path, dirs_exist_ok=True)
    tokenizer = tokenizer_files(path, kind["specials"], kind["mask_token"])
    config_cls = get_class_from_dynamic_module(kind["config"], build)
    model_cls = get_class_from_dynamic_module(kind["model"], build)
    config = config_cls(**kind["config_kwargs"])
    torch.manual_seed(seed)
    with rope_default_of_transformers_4():
        model = model_cls(config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              path / "model.safetensors", metadata={"format": "pt"})
    saved = dict(config.to_dict(), **kind["config_kwargs"],
                 architectures=[model_cls.__name__],
                 auto_map={"AutoConfig": kind["config"], kind["auto"]: kind["model"]})
    (path / "config.json").write_text(json.dumps(saved, indent=1))
    if "generation_config" in kind:
        (path / "generation_config.json").write_text(json.dumps(kind["generation_config"]))
    return tokenizer
