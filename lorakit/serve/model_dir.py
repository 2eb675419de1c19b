"""Random-weight decoder model directories with an offline-trained tokenizer, so the server runs without a hub.

`make_model(out_dir, arch="llama", ...)` writes a transformers directory: `config.json`, `generation_config.json`,
`model.safetensors` (fp32, seeded random weights) and a fast byte-level BPE tokenizer with a chat template.

- Weights: every matrix ~ N(0, config.initializer_range) drawn from one seeded generator in sorted-name order
  (the embedding's <pad> row zero, as transformers initializes it), norm weights 1, biases (Qwen2's q/k/v) 0.
  The same arguments always give the same bytes; transformers' slow per-module init is never run.
- Tokenizer corpus: the Python documentation topics shipped with the interpreter (`pydoc_data.topics`, the text
  `help("TOPIC")` shows; ~460 KB of English), sorted by topic. No network, deterministic for a given Python
  version. Special tokens <pad> <s> </s> <unk> are ids 0..3; `tokenizer(text)` prepends <s>. When the corpus
  yields fewer merges than `vocab_size`, the vocabulary is filled up with special `<|reserved_i|>` tokens (as
  Llama 3 does), so the model's vocab always equals `len(tokenizer)` == `vocab_size`.
- Chat template (in tokenizer_config.json): `<s>` then one `<|role|>\\ncontent</s>\\n` block per message, and
  `<|assistant|>\\n` when `add_generation_prompt`; a reply ends with </s>, the model's EOS.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ModelError
from ..io.files import dir_mode

ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
         "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
WEIGHTS_NAME = "model.safetensors"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # the order of lorakit.models.SPECIAL_TOKENS
BYTE_ALPHABET = 256
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def make_model(out_dir: str | os.PathLike, arch: str = "llama", hidden_size: int = 1024, num_layers: int = 8,
               num_heads: int | None = None, num_kv_heads: int | None = None, intermediate_size: int | None = None,
               vocab_size: int = 4096, max_position_embeddings: int = 2048, seed: int = 0) -> Path:
    """Write a random-weight `arch` (llama | mistral | qwen2) model directory with a tokenizer; returns its path.

    Defaults: num_heads = hidden_size / 64 (at least 1), num_kv_heads = num_heads, intermediate_size =
    hidden_size * 2.75 rounded to a multiple of 256 (2816 for 1024). `out_dir` must not exist or be empty; the
    directory appears complete or not at all (written next to it, then renamed).
    """
    out = Path(out_dir)
    _check_target(out)
    config = model_config(arch, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size,
                          max_position_embeddings)
    tokenizer = build_tokenizer(vocab_size, max_position_embeddings)
    if len(tokenizer) != config.vocab_size:  # cannot happen: build_tokenizer pads to vocab_size
        raise ModelError(f"tokenizer has {len(tokenizer)} tokens, the model vocab is {config.vocab_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp's 0700 would stay on `out`
        _write(tmp, config, tokenizer, random_state_dict(config, seed))
        _check_target(out)
        try:
            os.replace(tmp, out)  # atomic; replaces only a missing or empty directory
        except OSError as e:
            raise ModelError(f"cannot move the new model into {out}: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_config(arch: str = "llama", hidden_size: int = 1024, num_layers: int = 8, num_heads: int | None = None,
                 num_kv_heads: int | None = None, intermediate_size: int | None = None, vocab_size: int = 4096,
                 max_position_embeddings: int = 2048):
    """The transformers config `make_model` writes (validated; ModelError names the bad argument)."""
    import transformers

    if arch not in ARCHS:
        raise ModelError(f"unknown arch {arch!r}; valid: {sorted(ARCHS)}")
    num_heads = max(1, hidden_size // 64) if num_heads is None else num_heads
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if intermediate_size is None:
        intermediate_size = max(256, round(hidden_size * 2.75 / 256) * 256)
    for name, value, low in (("hidden_size", hidden_size, 1), ("num_layers", num_layers, 1),
                             ("num_heads", num_heads, 1), ("num_kv_heads", num_kv_heads, 1),
                             ("intermediate_size", intermediate_size, 1),
                             ("vocab_size", vocab_size, BYTE_ALPHABET + 4),
                             ("max_position_embeddings", max_position_embeddings, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ModelError(f"{name} must be an integer >= {low}, got {value!r}"
                             + (" (256 byte tokens + 4 special tokens)" if name == "vocab_size" else ""))
    if hidden_size % num_heads:
        raise ModelError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads:
        raise ModelError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    config_name, model_name = ARCHS[arch]
    extra = {"sliding_window": None} if arch == "mistral" else {}  # full attention, as the engine computes it
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, tie_word_embeddings=False, dtype="float32", **extra)
    config.architectures = [model_name]
    return config


def random_state_dict(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights for `config`'s causal LM: matrices ~ N(0, initializer_range), norms 1, biases 0."""
    import transformers

    with torch.device("meta"):  # names and shapes only; no memory, no init
        shapes = {k: tuple(v.shape) for k, v in
                  getattr(transformers, config.architectures[0])(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    std = float(config.initializer_range)
    tensors = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) >= 2:
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            if name.endswith("embed_tokens.weight") and config.pad_token_id is not None:
                t[config.pad_token_id] = 0.0
        elif name.endswith(".bias"):
            t = torch.zeros(shape, dtype=torch.float32)
        else:  # RMSNorm weights
            t = torch.ones(shape, dtype=torch.float32)
        tensors[name] = t
    return tensors


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """The tokenizer's training text: Python's documentation topics (`pydoc_data.topics`), sorted by topic.

    Interpreters built without pydoc_data fall back to the docstrings of the builtins, sorted by name.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        import builtins

        topics = {k: getattr(builtins, k).__doc__ for k in dir(builtins)}
    return tuple(topics[k] for k in sorted(topics) if isinstance(topics[k], str) and topics[k].strip())


def build_tokenizer(vocab_size: int = 4096, model_max_length: int = 2048):
    """The deterministic fast tokenizer `make_model` saves: `len(tokenizer) == vocab_size`, with a chat template."""
    from ..models import train_tokenizer

    tokenizer = train_tokenizer(list(corpus()), vocab_size=vocab_size)
    missing = vocab_size - len(tokenizer)
    if missing > 0:
        tokenizer.add_special_tokens({"additional_special_tokens": [f"<|reserved_{i}|>" for i in range(missing)]})
    tokenizer.model_max_length = model_max_length
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


NAMED_MODELS = ("smollm2",)


def resolve_model_dir(spec: str | os.PathLike) -> tuple[Path, str]:
    """(directory, served name) of a model: a local transformers directory (named after its folder), or a name
    lorakit knows — "smollm2" is SmolLM2-135M-Instruct's cached folder (`lorakit.models.smollm2_dir()`, fetched
    and converted on first use). A local directory of the same name wins over the known name."""
    text = os.fspath(spec)
    if text in NAMED_MODELS and not Path(text).is_dir():
        from ..models import smollm2_dir

        return Path(smollm2_dir()), text
    directory = Path(text)
    return directory, directory.resolve().name


def load_tokenizer(model_dir: str | os.PathLike):
    """The fast tokenizer saved in `model_dir` or of a known model name (ModelError when there is none)."""
    from transformers import AutoTokenizer

    where = resolve_model_dir(model_dir)[0].absolute()
    if not where.is_dir():
        raise ModelError(f"model directory {where} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"no usable tokenizer in {where} (expected tokenizer.json + tokenizer_config.json, "
                         f"e.g. written by `lorakit make-model`): {e}") from e
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"the tokenizer in {where} is a slow (Python) tokenizer; a fast one (tokenizer.json) "
                         f"is needed")
    return tokenizer


def parameter_count(model_dir: str | os.PathLike) -> int:
    """Number of weights in the directory's safetensors files (read from their headers, no tensor loaded)."""
    from safetensors import safe_open

    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors file in {Path(model_dir).absolute()}")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "is not empty"
        raise ModelError(f"output directory {out.absolute()} {what}; choose a new or empty directory")


def _write(directory: Path, config, tokenizer, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(directory)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(directory)
    tokenizer.save_pretrained(directory, save_jinja_files=False)  # chat template inside tokenizer_config.json
