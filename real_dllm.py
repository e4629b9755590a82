"""What a real diffusion LM on GPUs needs, kept out of the algorithm's way.

bgpo.py calls this module where a model is loaded, wrapped, sharded, saved
or measured; downstream, every model reads like a plain masked LM
(toy_dllm.forward_logits). 1. the adapter; 2. checkpoints; 3. memory: LoRA,
activation checkpointing, the activation meter; 4. torchrun + FSDP2; 5. model
code shipped for transformers 4.x, adjusted for 5.x. It imports no project
module, and raises ValueError for what cannot be used.
"""

import contextlib
import gc
import inspect
import json
import math
import os
import sys
import time
import types
import warnings
import weakref

import torch
import torch.distributed as dist

SHIFTED_MODEL_TYPES = ("dream",)  # adapted from autoregressive LMs: token i is predicted at i - 1

# -----------------------------------------------------------------------------
# 1. The adapter: ids and a 2-D padding mask in, aligned logits out

class MaskedLM(torch.nn.Module):
    """A masked LM presented as toy_dllm.forward_logits reads one: input_ids
    (B, T), attention_mask (B, T) 0 at left padding, position_ids.

    shifted: the model predicts token i at i - 1 (Dream, adapted from an
        autoregressive LM); the logits move one place right.
    padding (padding_form): "2d" (B, T) masks; "4d" (B, 1, T, T), for code
        that takes only those (Dream); "none" where padding cannot be hidden
        (LLaDA ignores its mask, and reads padding as tokens, as it does).
    """

    def __init__(self, model, shifted=False, padding="2d"):
        super().__init__()
        self.model, self.shifted, self.padding = model, shifted, padding
        forward = base_model(model).forward  # under any LoRA adapters (peft passes keywords on)
        self.takes_positions = "position_ids" in inspect.signature(forward).parameters

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self):
        return self.model.dtype

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        extra = {}
        if attention_mask is not None and self.padding != "none":
            if self.padding == "4d":  # row i of (T, T) is what position i may attend to
                T = attention_mask.shape[1]
                attention_mask = attention_mask.bool()[:, None, None, :].expand(-1, 1, T, T)
            extra["attention_mask"] = attention_mask
            if self.takes_positions and position_ids is not None:
                extra["position_ids"] = position_ids
        logits = self.model(input_ids=input_ids, **extra).logits                 # (B, T, V)
        if self.shifted:  # the prediction for token i sits at position i - 1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return types.SimpleNamespace(logits=logits)

def adapt(model, shifted=False):
    """model, or model in a MaskedLM if it does not read like a plain masked LM."""
    padding = padding_form(model)
    wrapped = MaskedLM(model, shifted, padding)
    plain = padding == "2d" and wrapped.takes_positions and not shifted
    return model if plain else wrapped

@torch.no_grad()
def padding_form(model):
    """The first of "2d", "4d" that the forward accepts and that hides padding
    (two rows differing only at a padded position give equal logits elsewhere),
    else "none"."""
    device = next(model.parameters()).device
    ids = torch.tensor([[0, 2, 2, 2], [1, 2, 2, 2]], device=device)
    real = torch.tensor([[0, 1, 1, 1]] * 2, device=device)  # both rows at the same positions
    for form in ("2d", "4d"):
        try:
            logits = MaskedLM(model, padding=form)(ids, real).logits.float()
        except (TypeError, ValueError, RuntimeError):  # the forward refuses this form
            continue
        if torch.allclose(logits[0, 1:], logits[1, 1:], rtol=1e-4, atol=1e-5):
            return form
    return "none"

def hides_padding(model):
    """False for a model that reads left padding as tokens (padding "none")."""
    return not isinstance(model, MaskedLM) or model.padding != "none"

def reads_shifted(model):
    return isinstance(model, MaskedLM) and model.shifted

def unwrap(model):
    """The transformers (or peft) model inside the adapter."""
    return model.model if isinstance(model, MaskedLM) else model

def rewrap(model, inner):
    """inner in the place of unwrap(model), with the same adapter around it."""
    return MaskedLM(inner, model.shifted, model.padding) if isinstance(model, MaskedLM) else inner

def base_model(model):
    """The transformers model under the adapter and any LoRA adapters."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model

# -----------------------------------------------------------------------------
# 2. Loading and saving a checkpoint

def load_checkpoint(path, trust_remote_code=False, shifted="auto"):
    """(model, tokenizer) of a directory or hub name, adapted. A masked-LM
    head first, then AutoModel (LLaDA registers only that). Weights load in
    float32: a small RL update would vanish below bfloat16's resolution (CUDA
    forwards still run in bfloat16). Shipped code (trust_remote_code) is
    adjusted first (section 5). shifted: "auto" (SHIFTED_MODEL_TYPES) or a bool.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer
    looks_like_hub_name = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not os.path.exists(path) and not looks_like_hub_name:
        raise ValueError("no such file or directory")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            shipped = trust_remote_code and bool(getattr(config, "auto_map", None))
            if shipped:
                adapt_shipped_code(config, path)
            kwargs = dict(config=config, trust_remote_code=trust_remote_code, dtype=torch.float32)
            try:
                model = AutoModelForMaskedLM.from_pretrained(path, **kwargs)
            except ValueError:
                model = AutoModel.from_pretrained(path, **kwargs)
    except Exception as e:  # transformers raises many kinds; all mean "unusable"
        raise ValueError(f"cannot load a masked LM and tokenizer ({first_line(e)})") from e
    if shipped:
        finish_shipped_model(model)
    if shifted == "auto":
        shifted = str(getattr(config, "model_type", "")).lower() in SHIFTED_MODEL_TYPES
    return adapt(model.eval(), shifted), tokenizer

SETTINGS = "bgpo.json"  # beside a saved model: what using it again needs

def save_model(path, model, tokenizer, settings, weights=None):
    """The model (with LoRA: its adapters), tokenizer and settings; weights:
    the full weights of a sharded model (full_state)."""
    inner = unwrap(model)
    inner.save_pretrained(path, state_dict=weights)
    generation = getattr(inner, "generation_config", None)
    if generation is not None and not os.path.exists(os.path.join(path, "generation_config.json")):
        generation.save_pretrained(path)  # Dream's from_pretrained reads it back
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, SETTINGS), "w") as f:
        f.write(json.dumps(settings, indent=1) + "\n")

def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]

def saved_settings(path):
    """The settings saved beside a model (SETTINGS), or {}."""
    try:
        with open(os.path.join(path, SETTINGS)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}

def checkpoints(out):
    """A run's checkpoint directories, out/checkpoint-STEP, oldest first."""
    if not os.path.isdir(out):
        return []
    steps = [n.split("-", 1)[1] for n in os.listdir(out) if n.startswith("checkpoint-")]
    return [os.path.join(out, f"checkpoint-{s}") for s in sorted(
        (s for s in steps if s.isdigit()), key=int)]

def load_trainer_state(checkpoint, device):
    """A checkpoint's trainer_state.pt, for as many processes on the kind of
    device it was saved from (RNG states and optimizer shards need them)."""
    try:
        state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), map_location="cpu",
                           weights_only=True)
    except Exception as e:  # truncated or foreign file: torch raises many kinds
        raise ValueError(f"cannot read {os.path.basename(checkpoint)}/trainer_state.pt "
                         f"({first_line(e)})") from e
    if state["device_type"] != device.type:
        raise ValueError(f"{checkpoint} was saved on {state['device_type']}; "
                         f"resume it there (--device {state['device_type']})")
    if state["world_size"] != world()[1]:
        raise ValueError(f"{checkpoint} was saved by {state['world_size']} process(es); resume "
                         f"it with torchrun --nproc_per_node {state['world_size']}")
    return state

def check_fits(model, tokenizer, mask_id, n_tokens, padded):
    """ValueError unless mask_id is in the model's vocabulary (the tokenizer's
    if the config names none) and n_tokens fit its positions; a note if padded
    prompts will be read as tokens."""
    vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
    if not 0 <= mask_id < vocab:
        raise ValueError(f"--mask-id {mask_id} is outside the model's vocabulary of {vocab}")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and n_tokens > positions:
        raise ValueError(f"prompt and response ({n_tokens} tokens) exceed the model's "
                         f"{positions} positions")
    if padded and not hides_padding(model):
        print("note: the model does not hide padding with an attention mask; shorter prompts "
              "are read with the end tokens that pad them on the left", file=sys.stderr)

# -----------------------------------------------------------------------------
# 3. Memory: LoRA adapters, activation checkpointing, and the activations
#    that autograd saves for backward (what grows with n_t), measured

def has_lora(model):
    return hasattr(unwrap(model), "peft_config")

def add_lora(model, rank, alpha=None, targets=None, seed=0):
    """peft LoRA adapters of this rank, scaled by alpha / rank, on the target
    modules (default: every linear layer but the head, found by its output
    size: LLaDA's does not have the name peft looks for); only they train.
    A model with adapters already (a LoRA checkpoint) keeps them."""
    if has_lora(model):
        held = unwrap(model).peft_config["default"].r
        if held != rank:
            raise ValueError(f"the model holds adapters of rank {held}")
        return model
    import peft  # only here: importing it takes seconds
    vocab = unwrap(model).config.vocab_size
    targets = targets or [name for name, m in unwrap(model).named_modules()
                          if isinstance(m, torch.nn.Linear) and m.out_features != vocab]
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0,
                             target_modules=targets)
    torch.manual_seed(seed)  # the adapters' random initialisation
    try:
        return rewrap(model, peft.get_peft_model(unwrap(model), config))
    except ValueError as e:  # "Target modules ... not found in the base model"
        raise ValueError(first_line(e)) from e

def load_lora(model, path):
    """The LoRA adapters saved in path, on model (their base), trainable."""
    import peft
    try:
        return rewrap(model, peft.PeftModel.from_pretrained(unwrap(model), path, is_trainable=True))
    except Exception as e:  # a damaged or foreign adapter: many kinds
        raise ValueError(f"cannot load its LoRA adapters ({first_line(e)})") from e

def set_checkpointing(model, on):
    """Activation checkpointing on or off: each layer keeps only its input and
    recomputes the rest in backward."""
    try:
        if on:
            base_model(model).activation_checkpointing_enable()
        else:
            base_model(model).activation_checkpointing_disable()
    except ValueError as e:  # "... does not support activation checkpointing"
        raise ValueError(first_line(e)) from e
    eval_mode(model)

def eval_mode(model):
    """model.eval(): no dropout, so old and new policy are the same network;
    but layers set to checkpoint are put back in training mode (the layer
    alone, not its dropout), as transformers checkpoints only there."""
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", None) is True:
            module.training = True

class SavedTensorMeter(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: peak bytes autograd holds for backward inside it, each
    storage counted once while held; `exclude` (parameters) not at all.

    >>> w = torch.randn(1000, requires_grad=True)
    >>> with SavedTensorMeter(exclude=[w]) as meter:
    ...     loss = w.exp().sum()          # exp saves its output: 1000 floats
    >>> meter.peak_bytes
    4000
    """

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.holders = {}  # storage -> how many saved tensors hold it
        self.current_bytes = self.peak_bytes = 0
        super().__init__(self.pack, lambda held: held)

    def __enter__(self):
        super().__enter__()
        return self

    def pack(self, tensor):
        key, nbytes = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
        if key in self.exclude:
            return tensor
        if key not in self.holders:
            self.holders[key] = 0
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self.holders[key] += 1
        held = tensor.detach()  # what autograd keeps: freed with the graph, then released
        weakref.finalize(held, self.release, key, nbytes)
        return held

    def release(self, key, nbytes):
        self.holders[key] -= 1
        if self.holders[key] == 0:
            del self.holders[key]
            self.current_bytes -= nbytes

def activation_meter(model):
    """A SavedTensorMeter that leaves out the model's parameters and buffers."""
    return SavedTensorMeter(exclude=list(model.parameters()) + list(model.buffers()))

def clock(device):
    """time.perf_counter() once the device's queued work is done (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

def measure(fn, model, device):
    """Run fn() once: (its result, peak activation bytes, seconds, CUDA peak bytes or None)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = clock(device)
    with activation_meter(model) as meter:
        result = fn()
    seconds = clock(device) - start
    return result, meter.peak_bytes, seconds, torch.cuda.max_memory_allocated() - base if cuda else None

# -----------------------------------------------------------------------------
# 4. Many processes: torchrun + FSDP2
#    `torchrun --nproc_per_node W bgpo.py ...` starts W copies of the script.
#    FSDP2 (fully_shard) keeps 1/W of every weight, gradient and AdamW state
#    on each rank, all-gathers a block's weights for its forward and backward,
#    and reduce-scatters the gradients as their mean after each backward (its
#    default, as an 8B model needs). The mean of the ranks' mean losses is the
#    global batch's: the gradient is the single-process one. Every forward and
#    backward is collective: all ranks must make the same number of them.

def world():
    """(rank, world size); (0, 1) in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

def torchrun_processes():
    """Processes torchrun started (1 without it), known before the group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))

def start(name="auto"):
    """(device, joined): "cpu", "cuda" or "auto"; under torchrun this rank's
    GPU, in the group (gloo or nccl) joined here unless already (then stop())."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    device = torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if torchrun_processes() == 1:
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():  # a caller joined already
        return device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True

def stop(clean=True):
    """Leave the group while the interpreter lives (clean: all ranks done). The sharded model
    holds it: collected first, the group's gloo threads end now, not at shutdown, where one
    freeing a work aborts the process (torch 2.13, pytorch/pytorch#190489; tests/teardown.py)."""
    if clean:
        dist.barrier()
    gc.collect()  # the caller has dropped the model; its reference cycles hold the group
    dist.destroy_process_group()

@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block, then the others (the warm start: trained, then loaded)."""
    rank, size = world()
    if rank > 0:
        dist.barrier()
    try:
        yield
    finally:
        if size > 1 and rank == 0:
            dist.barrier()

def shard(model):
    """FSDP2: each block of the longest layer list, then the rest (tied weights too)."""
    from torch.distributed.fsdp import fully_shard
    inner = unwrap(model)
    layer_lists = [m for m in inner.modules() if isinstance(m, torch.nn.ModuleList)]
    for block in max(layer_lists, key=len, default=[]):
        fully_shard(block)
    fully_shard(inner)
    return model

def rank_generator(generator):
    """A generator of this rank's own, seeded from the state all ranks share."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator(generator.device).manual_seed(seed + world()[0])

def rank_share(items, most):
    """This rank's share of items (every W-th) and a batch size of at most
    `most` that gives every rank the same number of batches."""
    rank, size = world()
    widest = -(-len(items) // size)                 # the busiest rank's share (ceil division)
    batches = -(-widest // most)
    return items[rank::size], -(-widest // batches)

def all_finite(loss, grad_norm):
    """Whether the loss and gradient norm (of a sharded model too) are finite on every rank."""
    if hasattr(grad_norm, "full_tensor"):  # the norm of a sharded gradient
        grad_norm = grad_norm.full_tensor()
    finite = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
    return global_mean(float(finite)) == 1

def global_mean(value):
    """The mean over ranks of a number each rank has."""
    if world()[1] == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world()[1]

def all_ranks(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world()[1] == 1:
        return [obj]
    gathered = [None] * world()[1]
    dist.all_gather_object(gathered, obj)
    return gathered

def full_state(model, optimizer=None):
    """(weights, optimizer state) to save: None and state_dict() in one
    process; under torchrun both gathered on the CPU (every rank calls it)."""

    if world()[1] == 1:
        return None, optimizer and optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(unwrap(model), options=options)
    return weights, optimizer and get_optimizer_state_dict(unwrap(model), optimizer,
                                                          options=options)

def load_optimizer_state(model, optimizer, state):
    """The inverse of full_state's optimizer state."""
    if world()[1] == 1:
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(unwrap(model), optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))

def peak_memory_per_rank():
    """Each rank's peak resident memory in bytes (Linux reports kilobytes)."""
    import resource
    return all_ranks(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

# -----------------------------------------------------------------------------
# 5. Model code shipped with a checkpoint (LLaDA, Dream), written for
#    transformers 4.x, under the pinned 5.x. Each fix names the change that
#    made it necessary and applies only where the loaded code needs it, to the
#    classes in memory after transformers imported them; no file is edited.

def adapt_shipped_code(config, path):
    """Import the model classes the config's auto_map names (as from_pretrained
    would) and adjust them, before any model is built."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    if not hasattr(config, "use_cache"):
        # 5.x's PreTrainedConfig drops generation settings such as use_cache
        # from a config's kwargs; 4.x forwards read it. No forward here caches.
        config.use_cache = False
    for auto, ref in config.auto_map.items():
        if auto.startswith("AutoModel"):
            cls = get_class_from_dynamic_module(ref, path)
            package = cls.__module__.rpartition(".")[0] + "."
            for name, module in list(sys.modules.items()):
                if name.startswith(package):
                    adapt_module(module)

def adapt_module(module):
    from transformers import GenerationConfig, PreTrainedModel
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    table = getattr(module, "ROPE_INIT_FUNCTIONS", None)
    if table is ROPE_INIT_FUNCTIONS and "default" not in table:
        # 5.x removed the "default" entry (each model computes its own); this
        # module's copy of the table gets it back, transformers' own does not.
        module.ROPE_INIT_FUNCTIONS = {**table, "default": default_rope_parameters}
    for cls in vars(module).values():
        if isinstance(cls, type) and cls.__module__ == module.__name__:
            if issubclass(cls, GenerationConfig):
                accept_new_keywords(cls, "validate")  # 5.x: validate(strict=, user_set_attributes=)
            elif issubclass(cls, PreTrainedModel):
                accept_new_keywords(cls, "tie_weights")  # 5.x: tie_weights(missing_keys=, ...)
                call_post_init(cls)
                tied_keys_as_mapping(cls)

def accept_new_keywords(cls, method):
    """Let cls.method(self, ...) written for 4.x be called with the keywords
    5.x passes: those it does not take are dropped."""

    original = cls.__dict__.get(method)
    if original is None or getattr(original, "adapted", False):
        return
    takes = inspect.signature(original).parameters
    if any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        return

    def adapted(self, *args, **kwargs):
        return original(self, *args, **{k: v for k, v in kwargs.items() if k in takes})
    adapted.adapted = True
    setattr(cls, method, adapted)

def call_post_init(cls):
    """5.x's from_pretrained reads what post_init() sets (all_tied_weights_keys);
    4.x code could skip calling it. Call it after an __init__ that did not."""
    original = cls.__dict__.get("__init__")
    if original is None or getattr(original, "adapted", False):
        return

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        outermost = type(self).__init__ is __init__  # not a parent's __init__ called by super()
        if outermost and not hasattr(self, "all_tied_weights_keys"):
            self.post_init()
    __init__.adapted = True
    cls.__init__ = __init__

def tied_keys_as_mapping(cls):
    """5.x reads _tied_weights_keys as {tied parameter: its source}; 4.x code
    lists the tied parameters, which were tied to the input embeddings."""
    keys = cls.__dict__.get("_tied_weights_keys")
    if not isinstance(keys, (list, tuple)):
        return

    def mapping(self):
        embeddings = self.get_input_embeddings()
        source = [n for n, m in self.named_modules() if m is embeddings]
        return {key: f"{source[0]}.weight" for key in keys} if source else {}
    cls._tied_weights_keys = property(mapping)

def default_rope_parameters(config, device=None, seq_len=None, **kwargs):
    """Rotary inverse frequencies 1 / theta^(2i/d), as 4.x's "default" entry
    computed them: (inv_freq, attention scaling 1.0)."""
    head_dim = (getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads)
    dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    base = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base ** exponent), 1.0

def finish_shipped_model(model):
    """After loading: no buffer that 5.x left uninitialised reaches training,
    and save_pretrained copies the model's code into every checkpoint."""
    bad = uninitialised_buffers(model)
    if bad:
        # 5.x builds models on the meta device, fills non-persistent buffers
        # with torch.empty and relies on _init_weights to set them; 4.x code
        # computed them in __init__ and its _init_weights may not know them.
        if hasattr(model, "reset_rope_parameters"):
            model.reset_rope_parameters()
        for name in bad:
            module = model.get_submodule(name.rpartition(".")[0])
            if hasattr(module, "reset_parameters") and not list(module.parameters(recurse=False)):
                module.reset_parameters()
        still = uninitialised_buffers(model)
        if still:
            raise ValueError(f"buffer {still[0]} was left uninitialised by transformers 5.x "
                             "and the model has no reset_parameters() to compute it")
    cls = type(model)
    if cls._auto_class is None:
        # The code registered the class with an auto class itself, so
        # from_pretrained did not, and save_pretrained would not copy the code.
        auto = [a for a, ref in getattr(model.config, "auto_map", {}).items()
                if a.startswith("AutoModel") and ref.endswith("." + cls.__name__)]
        if auto:
            cls.register_for_auto_class(auto[0])

def uninitialised_buffers(model):
    """Non-persistent float buffers holding what uninitialised memory would:
    non-finite values, or rotary inverse frequencies that are not decreasing
    values in (0, 1]."""
    bad = []
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if (name not in module._non_persistent_buffers_set or buffer is None
                    or not buffer.is_floating_point()):
                continue
            fine = bool(torch.isfinite(buffer).all())
            if fine and "inv_freq" in name:
                fine = bool((buffer > 0).all() and (buffer <= 1).all()
                            and (buffer.flatten().diff() <= 0).all())
            if not fine:
                bad.append(f"{module_name}.{name}" if module_name else name)
    return bad
