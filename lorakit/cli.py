"""`lorakit ...` command line: train, eval, compare, inspect, reduce-intruders, merge, export, squeeze, claims, demo,
make-model, serve.

Run settings come from `--config run.yaml` and/or flags; a flag is a `RunConfig`, `AdapterConfig` or
`TrainingArguments` field with dashes (`--learning-rate 1e-3`, `--target-modules query value`, `--use-rslora`)
or, as transformers spells them, with underscores (`--learning_rate`); a boolean flag alone means true
(`--bf16`), or takes a value (`--bf16 false`), or is negated (`--no-bf16`). Flags override the YAML file.
`train` takes every setting; `eval` the ones that say what to evaluate on and how; `compare` every setting but
the ones it sweeps.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import secrets
import shutil
import sys
import typing
from pathlib import Path

from .compose.merge import METHODS as MERGE_METHODS, REPORT_NAME
from .errors import ConfigError, DataError, LorakitError, MergeError
from .train.args import TASK_DEFAULTS

HELP = {"model": "smollm2 | minilm | tiny-llama | a local transformers model directory",
        "data": "vader:<movies|tweets|amazon|nyt> | vader-task:<polarity|source|intensity|format|all>[@<domain>] "
                "(instruct tasks on VADER sentences) | a .csv/.jsonl file | a directory with train/validation/test",
        "task": "classification | regression | causal-lm | instruct (chat replies; unless set, instruct uses "
                + ", ".join(f"{k} {v}" for k, v in TASK_DEFAULTS["instruct"].items()) + ")",
        "bf16": "run the base in bfloat16 (adapters and optimizer state stay fp32)",
        "fp16": "run the base in float16 (adapters and optimizer state stay fp32)",
        "device": "auto (CUDA when present) | cpu | cuda | cuda:N",
        "quantize": "store the frozen base quantized: nf4 | fp4 | int8 (bitsandbytes)",
        "baselines": "instruct: also score the base k-shot (zero-shot is always scored)",
        "rank_pattern": "per-module ranks as a mapping, e.g. '{q_proj: 4}'",
        "target_modules": "module names (one or more), one regex (PEFT full match), or all-linear",
        "output_dir": "where the run's files go",
        "report_to": "none | tensorboard (scalars in <output_dir>/runs) | wandb (offline mode) (default: none)",
        "save_total_limit": "checkpoints kept in <output_dir>/checkpoints, oldest deleted first; 0 keeps all "
                            "(default: 1)",
        "eval_ranks": "also test the adapter at these ranks and report AURAC, e.g. 1,2,4,8 (plain LoRA: first k "
                      "components; dylora / matryoshka_lora: their nested form)",
        "attention_logit_every": "every N optimizer steps, log the largest attention logit |q·k|/√d per layer "
                                 "(attn_logit_max/<layer> in metrics.jsonl; 0: off)"}


# `lorakit eval`: what to evaluate on (data, model, task) and how (batching, length, device, precision)
EVAL_SETTINGS = ("model", "data", "task", "text_column", "label_column", "split_seed", "max_eval_samples",
                 "max_length", "per_device_eval_batch_size", "device", "bf16", "fp16", "quantize")
# `lorakit compare` sweeps these; their flags only point at the sweep flag
SWEPT = {"variant": "--variants", "use_rslora": "--variants (rslora, <variant>+rslora)", "learning_rate": "--lrs",
         "seed": "--seeds"}


class _UsageError(Exception):
    """A command line argparse refuses (bad value, missing argument): one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--lr 1e-3` must not silently mean --lr-scheduler-type
        super().__init__(*args, **kwargs)

    def error(self, message):  # argparse would print the whole usage block and raise SystemExit
        raise _UsageError(f"{self.prog}: {message}. See `{self.prog} --help`.")


def _setting_fields():
    from .config import AdapterConfig
    from .train.args import RunConfig, TrainingArguments, _keys

    for cls in (RunConfig, AdapterConfig, TrainingArguments):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in _keys(cls):
                yield cls.__name__, f, hints[f.name]


_WORDS = {"true": True, "false": False, "null": None}


def _parse_token(text: str):
    """One flag value as YAML would read it: a number, true/false/null, a [list] or {mapping}, else the text."""
    import yaml

    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return yaml.safe_load(text) if text[:1] in "[{" else text


def _bool(text: str) -> bool:
    """A boolean flag's value, as transformers' HfArgumentParser reads it (`--bf16 True`)."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"invalid bool value: {text!r} (true or false)")
    return value


def _help(name: str, default) -> str:
    if name == "variant":
        from .variants import variant_names

        return " | ".join(variant_names()) + f" | full (full fine-tuning: no adapter) (default: {default})"
    if name == "optim":
        from .optim import optimizer_names
        from .train.args import OPTIM_ALIASES

        return (" | ".join(optimizer_names()) + f" (default: {default}; transformers' "
                + ", ".join(OPTIM_ALIASES) + " = adamw)")
    return HELP.get(name, f"default: {default!r}")


def add_settings(parser: argparse.ArgumentParser, only=None, hidden=()) -> None:
    """One flag per run setting (`only` these, when given; `hidden` ones parse but stay out of --help); only flags
    the user gives end up in the namespace."""
    parser.add_argument("--config", help="a YAML file of settings (flags override it)")
    groups = {}
    for owner, f, hint in _setting_fields():
        if only is not None and f.name not in only:
            continue
        group = groups.setdefault(owner, parser.add_argument_group(owner))
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        text = argparse.SUPPRESS if f.name in hidden else _help(f.name, default)
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=text)
        if hint is bool:
            group.add_argument(flag, nargs="?", const=True, type=_bool, metavar="BOOL", **kw)
            group.add_argument("--no-" + flag[2:], action="store_false", dest=f.name, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)
        elif hint in (int, float, str):
            group.add_argument(flag, type=hint, metavar=hint.__name__.upper(), **kw)
        else:  # lists, unions, patterns: one or more tokens, numbers parsed, JSON/YAML for mappings
            group.add_argument(flag, nargs="+", type=_parse_token, metavar="VALUE", **kw)


def settings(args: argparse.Namespace, base: dict | None = None) -> dict:
    """YAML settings (if any) overlaid with the flags given."""
    from .train.args import read_yaml

    values = dict(base or {})
    if getattr(args, "config", None):
        values.update(read_yaml(args.config))
    names = {f.name for _, f, _ in _setting_fields()}
    for name in names & set(vars(args)):
        value = getattr(args, name)
        if isinstance(value, list) and len(value) == 1 and (name not in _LISTS or _pattern(name, value[0])):
            value = value[0]
        values[name] = value
    return values


_LISTS = {"target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"}


def _pattern(name: str, value) -> bool:
    """One `--target-modules`/`--exclude-modules` value meant as PEFT's string form: all-linear or a regex."""
    return name in ("target_modules", "exclude_modules") and isinstance(value, str) and (
        value == "all-linear" or re.search(r"[*+?\[\](){}|^$\\]", value) is not None)


def run_train(args) -> None:
    from .train import RunConfig, train
    from .train.run import saved_paths

    config = RunConfig.from_flat(settings(args))
    _prepare_output_dir(Path(config.training.output_dir), args.resume, args.overwrite_output_dir)
    results = train(config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one table
        _print_results(results)
        for path in saved_paths(config.training.output_dir):
            print(f"saved {path}")


def run_eval(args) -> None:
    from .train import RunConfig, evaluate

    reads = EVAL_SETTINGS + ("max_train_samples", "seed")  # of the run's settings (flags override them)
    base = {k: v for k, v in _run_settings(args.adapter).items() if k in reads}
    config = RunConfig.from_flat(settings(args, base))
    _print_results(evaluate(args.adapter, config, split=args.split))


def run_compare(args) -> None:
    from .train import compare

    given = [name for name in SWEPT if name in vars(args)]
    if given:
        raise ConfigError(f"compare sweeps {', '.join(given)}: use {', '.join(SWEPT[n] for n in given)} instead of "
                          f"{', '.join('--' + n.replace('_', '-') for n in given)}")
    try:
        seeds = list(range(int(args.seeds[0]))) if len(args.seeds) == 1 else [int(s) for s in args.seeds]
        learning_rates = [float(x) for x in args.lrs]
    except ValueError as e:
        raise ConfigError(f"--seeds takes a count or a list of integers and --lrs numbers ({e})") from None
    per_variant = {}
    if args.variant_settings:
        from .train.args import read_yaml

        per_variant = read_yaml(args.variant_settings)
        if not all(isinstance(v, dict) for v in per_variant.values()):
            raise ConfigError(f"{args.variant_settings} must map each sweep entry to a mapping of settings")
    variants = args.variants.split(",") if args.variants else list(per_variant) or ["lora", "rslora", "dora"]
    per_variant = {k: v for k, v in per_variant.items() if k in variants}  # --variants picks entries of the file
    texts = None
    if args.held_out_text:
        if not args.analyse:
            raise ConfigError("--held-out-text is the text --analyse measures forgetting on: add --analyse")
        texts = _paragraphs(args.held_out_text)
    compare(settings(args), variants=variants, learning_rates=learning_rates, seeds=seeds, per_variant=per_variant,
            analyse=args.analyse, texts=texts)


def _paragraphs(path: str) -> list[str]:
    """The blank-line separated paragraphs of a text file (whitespace collapsed)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the held-out text {path}: {e}") from None
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise DataError(f"{path} holds no text")
    return paragraphs


def run_inspect(args) -> None:
    from .analysis import describe_adapter
    from .train.run import adapter_folder

    folder = adapter_folder(args.dir)
    if args.base is None and not args.against and args.report is None:
        print(describe_adapter(folder))
        return
    from .analysis.report import analyse, summary_line, tables, write_report

    model = _adapted(folder, args.base).float() if args.base is not None else None
    result = analyse(folder, model, args.base, [adapter_folder(o) for o in args.against], k=args.top_k,
                     epsilon=args.epsilon)
    print(summary_line(result) + "\n")
    for title, header, rows in tables(result)[:-1]:  # the roll-ups and summaries; the layers are in the report
        print(f"{title}\n  " + " | ".join(header) + "".join("\n  " + " | ".join(r) for r in rows) + "\n")
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    if args.report is not None:
        print(f"report: {write_report(result, args.report) / 'report.html'}")


def run_reduce_intruders(args) -> None:
    from .analysis.intruders import reduce_intruders
    from .io import save_adapter
    from .train.run import adapter_folder

    folder, out = adapter_folder(args.src), Path(args.dst)
    _check_output_dir(out, args.overwrite)
    model = _adapted(folder, args.base)
    report = reduce_intruders(model, top_k=args.top_k, epsilon=args.epsilon, lam=args.lam,
                              keep_rank=not args.exact)
    _write_output_dir(out, lambda tmp: save_adapter(model, tmp, "intruders_reduced"))
    width = max(map(len, report))
    for path, r in report.items():
        print(f"{path:<{width}}  intruders {r['intruders']:>2}  rank {r['rank']:>3}  "
              f"re-projection error {r['reprojection_error']:.2e}")
    print(f"{sum(r['intruders'] for r in report.values())} intruder dimensions scaled by {args.lam}; wrote {out}")


def run_make_model(args) -> None:
    from .serve.model_dir import make_model, parameter_count

    out = make_model(args.out_dir, arch=args.arch, hidden_size=args.hidden_size, num_layers=args.num_layers,
                     num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                     intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                     max_position_embeddings=args.max_position_embeddings, seed=args.seed)
    print(f"{out}  {parameter_count(out):,} parameters")


def _add_intruder_flags(parser) -> None:
    parser.add_argument("--top-k", type=int, default=10, help="top singular vectors checked per matrix (10)")
    parser.add_argument("--epsilon", type=float, default=0.5,
                        help="an intruder's largest |cos| with every base singular vector is below this (0.5)")


def _engine_default(flag: str) -> str:
    """EngineConfig's default for a `serve` flag, as the help shows it."""
    from .serve.config import GiB, EngineConfig

    if flag == "--memory-gb":
        return f"{EngineConfig.memory_bytes / GiB:g}"
    value = getattr(EngineConfig, flag[2:].replace("-", "_"))
    return "none, bounded by --memory-gb" if value is None else str(value)


def run_serve(args) -> None:
    from .serve.config import GiB, EngineConfig
    from .serve.personal import parse_banks
    from .serve.server import parse_lora_descriptions, parse_lora_modules, serve

    given = {"max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank, "max_cpu_loras": args.max_cpu_loras,
             "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
             "max_waiting": args.max_waiting, "block_size": args.block_size, "dtype": args.dtype,
             "fp32_max_rows": args.fp32_max_rows, "lora_dtype": args.lora_dtype}
    if args.memory_gb is not None:
        if not args.memory_gb > 0:
            raise ConfigError(f"--memory-gb must be > 0, got {args.memory_gb}")
        given["memory_bytes"] = int(args.memory_gb * GiB)
    config = EngineConfig(**{k: v for k, v in given.items() if v is not None})
    serve(args.model_dir, parse_lora_modules(args.lora_modules or []), engine_config=config,
          adapter_roots=args.adapter_root, served_name=args.served_model_name, host=args.host, port=args.port,
          shutdown_timeout=args.shutdown_timeout, classify_model=args.classify_model,
          classify_modules=parse_lora_modules(args.classify_lora_modules or []), classify_labels=args.classify_labels,
          lenient=args.lenient, adapter_descriptions=parse_lora_descriptions(args.lora_description or []),
          max_merged_adapters=args.max_merged_adapters, reclora_banks=parse_banks(args.reclora_bank or []))


def run_merge(args) -> None:
    from .model import count_parameters, merge_and_unload
    from .models import _quiet
    from .train.run import adapter_folder

    folder, out = adapter_folder(args.adapter), Path(args.out_dir)
    _check_output_dir(out, args.overwrite)
    model, tokenizer = _adapted(folder, args.model, tokenizer=True)
    model = merge_and_unload(model, safe=True)

    def write(tmp: Path) -> None:
        with _quiet():  # (transformers' progress bar)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    _write_output_dir(out, write)
    print(f"wrote {out}: {type(model).__name__}, {count_parameters(model)[1]:,} parameters, {folder} merged in")


def run_export(args) -> None:
    from .io import export_lora, read_adapter
    from .train.run import adapter_folder

    folder, out = adapter_folder(args.adapter), Path(args.out_dir)
    _check_output_dir(out, args.overwrite)
    variant = read_adapter(folder)[0].variant
    model = _adapted(folder, args.model)
    if args.target == "vllm":
        return _export_for_vllm(model, folder, out, variant)
    try:
        _write_output_dir(out, lambda tmp: export_lora(model, tmp))
    except MergeError as e:  # DoRA: its effective ΔW is full rank
        raise MergeError(f"{e}; `lorakit squeeze` writes its best low-rank plain LoRA, `lorakit merge` folds it into "
                         f"the base") from None
    config = read_adapter(out)[0]
    ranks = sorted({config.r, *config.rank_pattern.values()})
    print(f"wrote {out}: {variant} adapter {folder} as a PEFT LoRA, rank {'/'.join(map(str, ranks))}")


def run_merge_adapters(args) -> None:
    from .compose import merge_folders
    from .compose.merge import merge_on_model
    from .io import read_adapter
    from .rank.squeeze import is_plain_lora
    from .train.tasks import format_number

    out = Path(args.output_dir)
    _check_output_dir(out, args.overwrite)
    options = {k: getattr(args, k) for k in MERGE_FLAGS if getattr(args, k) is not None}
    options.update(method=args.method, target_rank=args.r, energy=args.energy)

    def on_base(tmp: Path) -> dict:  # other variants: through the adapters on their base model
        model = _adapted(Path(args.sources[0]), args.model)
        return merge_on_model(model, args.sources, args.weights, tmp, **options)
    plain = all(is_plain_lora(read_adapter(s)[0]) for s in args.sources)  # then no model is needed
    report = _write_output_dir(out, (lambda tmp: merge_folders(args.sources, args.weights, tmp, **options))
                               if plain else on_base)
    width = max(map(len, report))
    for path, row in report.items():
        kept = f"  kept {format_number(sum(row['kept']) / len(row['kept']))}" if "kept" in row else ""
        print(f"{path:<{width}}  rank {row['rank']:>4}  truncation error {format_number(row['error'])}  "
              f"from Σ wΔW {format_number(row['from_sum'])}{kept}")
    print(f"wrote {out}: {args.method} of {len(args.sources)} adapters, a PEFT LoRA at scale 1 "
          f"(choices and per-layer report in {out.name}/{REPORT_NAME})")


MERGE_FLAGS = ("density", "seed", "sign", "sign_method", "divide", "epsilon", "gamma", "lam", "k", "knots_inner")


def _export_for_vllm(model, folder: Path, out: Path, variant: str) -> None:
    """`export --for vllm`: the folder vLLM's LoRA loader accepts, and the `vllm serve` line that loads it."""
    from .io import read_adapter
    from .io.vllm import VLLM_RELEASE, export_vllm

    result = _write_output_dir(out, lambda tmp: export_vllm(model, tmp))
    base = read_adapter(out)[0].base_model_name_or_path or "<base model>"
    print(f"wrote {out}: {variant} adapter {folder} as a LoRA for vLLM {VLLM_RELEASE}, max rank {result.max_rank}")
    print(f"vllm serve {base} --enable-lora --lora-modules {out.name}={out} --max-lora-rank {result.max_lora_rank}")


def run_squeeze(args) -> None:
    from .io import read_adapter, save_adapter
    from .rank.squeeze import is_plain_lora, squeeze_adapter, squeeze_folder
    from .train.run import adapter_folder

    if args.rank is not None:
        if args.r is not None:
            raise ConfigError("give --r only (--rank is its deprecated name)")
        print("warning: `lorakit squeeze --rank` is deprecated; use --r (as `lorakit train`)", file=sys.stderr)
        args.r = args.rank
    if (args.r is None) == (args.energy is None):
        raise ConfigError("squeeze needs exactly one of --r K or --energy E")
    folder, out = adapter_folder(args.src), Path(args.dst)
    _check_output_dir(out, args.overwrite)
    options = dict(target_rank=args.r, energy=args.energy, method=args.method)

    def squeeze_on_base(tmp: Path) -> dict:  # any other variant: through the adapter on its base model
        model = _adapted(folder, args.model)
        report = squeeze_adapter(model, "default", **options)
        save_adapter(model, tmp)
        return report
    plain = is_plain_lora(read_adapter(folder)[0])  # needs no model
    report = _write_output_dir(out, (lambda tmp: squeeze_folder(folder, tmp, **options)) if plain else squeeze_on_base)
    width = max(map(len, report))
    for path, r in report.items():
        print(f"{path:<{width}}  r {r['from']:>3} -> {r['to']:<3}  energy kept {r['energy']:.4f}")
    print(f"wrote {args.dst}")


# ---- output folders and base models -------------------------------------------------------------
def _check_output_dir(folder: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """ConfigError unless `folder` is missing or empty, or `overwrite` (then it must not hold the working
    directory)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output folder {folder} is a file")
    if overwrite:
        if Path.cwd().resolve().is_relative_to(folder.resolve()):
            raise ConfigError(f"{flag} would delete {folder}, which holds the working directory")
    elif folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(f"output folder {folder} exists and is not empty; choose another or pass {flag} to "
                          f"replace it")


def _write_output_dir(folder: Path, write):
    """`write(tmp)` into a new folder beside `folder`, which then replaces `folder`; returns what `write` returns.
    A failed write leaves `folder` as it was."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        result = write(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _prepare_output_dir(folder: Path, resume: bool, overwrite: bool) -> None:
    """`lorakit train`'s output_dir: a run to resume, or empty, or (overwrite) removed first. Main process only."""
    from .train.checkpoint import checkpoints

    if resume and overwrite:
        raise ConfigError("choose one of --resume (continue the run in output_dir) and --overwrite-output-dir")
    if resume or os.environ.get("RANK", "0") != "0":
        return
    if checkpoints(folder / "checkpoints") and not overwrite:
        raise ConfigError(f"{folder} already holds a run; pass --resume to continue it, --overwrite-output-dir to "
                          f"replace it, or choose another output_dir")
    _check_output_dir(folder, overwrite, "--overwrite-output-dir")
    if overwrite and folder.exists():
        shutil.rmtree(folder)


def _run_settings(path) -> dict:
    """The settings of the run that holds `path` (its output_dir, or an adapter folder inside it), else {}."""
    from .train.args import read_yaml

    found = [f / "run_config.yaml" for f in (Path(path), Path(path).parent) if (f / "run_config.yaml").is_file()]
    return read_yaml(found[0]) if found else {}


def _adapted(folder: Path, base: str | None, tokenizer: bool = False):
    """`lorakit.from_pretrained(folder)`: the adapter on its base (`base`, else the folder's
    base_model_name_or_path when that is a folder, else its run's model, else the model name it was saved as)."""
    from .hf import from_pretrained
    from .io import read_adapter
    from .models import MODELS

    saved = read_adapter(folder)[0].base_model_name_or_path or ""
    if base is None and not saved:
        raise ConfigError(f"{folder} names no base model (base_model_name_or_path); pass --model")
    if base is None and not os.path.isdir(saved):  # e.g. smollm2, recorded as <cwd>/smollm2
        base = _run_settings(folder).get("model") or (Path(saved).name if Path(saved).name in MODELS else None)
    return from_pretrained(folder, base=base, return_tokenizer=tokenizer)


def _print_results(results: dict) -> None:
    """One `name  value` line per result (floats to 4 significant digits), then its warnings."""
    from .train.tasks import format_number

    shown = {k: v for k, v in results.items() if k != "warnings"}
    width = max(map(len, shown))
    for k, v in shown.items():
        print(f"{k:<{width}}  {format_number(v)}")
    for warning in results.get("warnings", ()):
        print(f"warning: {warning}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="lorakit", description="Low-rank adapters for any PyTorch model.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train an adapter (flags or --config YAML)", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--overwrite-output-dir", "--overwrite", action="store_true",
                       help="delete a non-empty output_dir (a finished or interrupted run) first")
    add_settings(train)
    train.set_defaults(run=run_train)

    ev = sub.add_parser("eval", help="evaluate a saved adapter (a run folder or an adapter folder) on a dataset",
                        description="Evaluate a saved adapter. Unless given, model, data and task are the run's "
                                    "(run_config.yaml beside the adapter); the base is the adapter's "
                                    "base_model_name_or_path when that is a local folder.")
    ev.add_argument("adapter", help="a run's output_dir or an adapter folder")
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"])
    add_settings(ev, only=EVAL_SETTINGS)
    ev.set_defaults(run=run_eval)

    cmp = sub.add_parser("compare", help="variants x learning rates x seeds on one task: table + plots")
    cmp.add_argument("--variants", default=None,
                     help="comma-separated: registered variants, rslora / <variant>+rslora, or full (full "
                          "fine-tuning) (default: the entries of --variant-settings, else lora,rslora,dora)")
    cmp.add_argument("--variant-settings", default=None, metavar="YAML",
                     help="a mapping entry → settings for that entry only (e.g. vera: {r: 256, options: {...}, "
                          "learning_rates: [...]}); an entry with its own `variant` key is a free label")
    cmp.add_argument("--lrs", nargs="+", default=["1e-4", "5e-4", "2e-3"], help="learning rates")
    cmp.add_argument("--seeds", nargs="+", default=["2"], help="a count N (seeds 0..N-1) or a list of seeds")
    cmp.add_argument("--analyse", action="store_true",
                     help="also measure what each run did to its model: intruder dimensions against the base, "
                          "calibration (classification) or forgetting on held-out text (causal LMs); e.g. "
                          "--variants lora,full for LoRA vs full fine-tuning")
    cmp.add_argument("--held-out-text", default=None, metavar="FILE",
                     help="with --analyse on a causal LM: the text to measure forgetting on, paragraphs separated "
                          "by blank lines (default: 200 Python standard-library docstrings)")
    add_settings(cmp, hidden=SWEPT)
    cmp.set_defaults(run=run_compare)

    ins = sub.add_parser("inspect", help="an adapter folder: config, per-layer ranks, norms; with --base, --against "
                                         "or --report: spectra, intruder dimensions, interference, an HTML report")
    ins.add_argument("dir", help="an adapter folder, or a run's output_dir")
    ins.add_argument("--base", default=None, metavar="MODEL",
                     help="the base model (a lorakit model name or a local folder): intruder dimensions, spectra of "
                          "W0 + ΔW, and the effective ΔW of any variant")
    ins.add_argument("--against", nargs="+", default=[], metavar="ADAPTER",
                     help="other plain LoRA adapters: principal angles, ΔW cosine, sign conflicts per layer")
    ins.add_argument("--report", default=None, metavar="OUT",
                     help="write OUT/report.html, report.md, report.json and the plots")
    _add_intruder_flags(ins)
    ins.set_defaults(run=run_inspect)

    ri = sub.add_parser("reduce-intruders", help="scale an adapter's intruder dimensions down (Shuttleworth et al.) "
                                                 "and write it as a plain PEFT LoRA")
    ri.add_argument("src", help="a run's output_dir or an adapter folder (any mergeable variant)")
    ri.add_argument("dst", help="where the new adapter folder goes")
    ri.add_argument("--base", default=None, metavar="MODEL", help="the base model (default: the adapter's own)")
    ri.add_argument("--lam", type=float, default=0.75, help="the share of each intruder direction kept (0.75)")
    ri.add_argument("--exact", action="store_true",
                    help="keep rank r + #intruders so the new ΔW is exact (default: back to rank r, as PEFT)")
    ri.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    _add_intruder_flags(ri)
    ri.set_defaults(run=run_reduce_intruders)

    mk = sub.add_parser("make-model", help="write a random-weight decoder model directory with an offline tokenizer")
    mk.add_argument("arch", choices=["llama", "mistral", "qwen2"])
    mk.add_argument("out_dir", help="a new or empty directory")
    for flag, default in (("--hidden-size", 1024), ("--num-layers", 8), ("--num-heads", None),
                          ("--num-kv-heads", None), ("--intermediate-size", None), ("--vocab-size", 4096),
                          ("--max-position-embeddings", 2048), ("--seed", 0)):
        mk.add_argument(flag, type=int, default=default, metavar="INT",
                        help=f"default: {default}" if default is not None else "default: derived (see make_model)")
    mk.set_defaults(run=run_make_model)

    srv = sub.add_parser("serve", help="OpenAI-compatible server for a decoder model and many LoRA adapters "
                                       "(flags as `vllm serve`)")
    srv.add_argument("model_dir", help="a local Llama/Mistral/Qwen2 directory (config.json + *.safetensors), or "
                                       "smollm2 (SmolLM2-135M-Instruct, fetched and cached on first use)")
    srv.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                     help='adapters to register at start: name=path or JSON {"name": ..., "path": ...}')
    srv.add_argument("--lora-description", action="append", default=None, metavar="NAME=TEXT",
                     help="what an adapter of --lora-modules is for (repeatable): requests with "
                          "\"retrieve\": {\"k\": 1} go to the adapter whose description is nearest to their text "
                          "(MiniLM embeddings, loaded at the first such request)")
    srv.add_argument("--max-merged-adapters", type=int, default=8, metavar="INT",
                     help="merged adapters built for \"merged_adapters\" requests that are kept (LRU; default: 8)")
    srv.add_argument("--reclora-bank", action="append", default=None, metavar="NAME=FOLDER",
                     help="a saved RecLoRA adapter (repeatable): requests with \"reclora\": {\"bank\": NAME, "
                          "\"user\": [...]} run with that user's adapter, built once and cached with the merges")
    srv.add_argument("--adapter-root", action="append", default=None, metavar="DIR",
                     help="a directory /v1/load_lora_adapter may load from (repeatable; default: the parent "
                          "directories of the --lora-modules paths)")
    for flag, kind, text in (("--max-loras", int, "distinct adapters per step"),
                             ("--max-lora-rank", int, "adapters of a higher rank are refused"),
                             ("--max-cpu-loras", int, "adapters kept in RAM (LRU)"),
                             ("--memory-gb", float, "one budget for KV cache blocks and loaded adapters"),
                             ("--max-num-seqs", int, "running requests"),
                             ("--max-num-batched-tokens", int, "tokens computed per step"),
                             ("--max-waiting", int, "queued requests before 429"),
                             ("--block-size", int, "tokens per KV cache block"),
                             ("--fp32-max-rows", int, "with a 16-bit --dtype, steps of at most this many tokens "
                                                      "compute in fp32 on fp32 copies of the weights (faster on CPU "
                                                      "for few rows); 0 = never, no copies")):
        srv.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(),
                         help=f"{text} (default: {_engine_default(flag)})")
    srv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="weights, activations and KV cache; adapters are cast to it. auto (default) = the "
                          "checkpoint's dtype (config.json dtype/torch_dtype): bf16 or fp16 checkpoints stay 16-bit, "
                          "anything else is served in float32. bfloat16 is faster on CPUs with avx512_bf16/AMX "
                          "from a few concurrent requests on (see BENCHMARKS.md); float16 is not tuned on CPU")
    srv.add_argument("--lora-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="the dtype adapters are held in (default auto = --dtype). bfloat16 on a float32 model "
                          "halves adapter memory and the bytes each step reads; the factors are rounded once at load, "
                          "the CPU kernels widen them exactly and accumulate in fp32")
    srv.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: the "
                                                              "directory's name, or smollm2)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                     help="on SIGINT/SIGTERM, seconds running requests get to finish")
    srv.add_argument("--classify-model", default=None, metavar="MODEL",
                     help="also serve POST /v1/classify with this encoder (minilm or a local directory)")
    srv.add_argument("--classify-lora-modules", nargs="+", metavar="NAME=PATH",
                     help="classifier adapters (each may carry its classification head)")
    srv.add_argument("--classify-labels", type=int, default=2, metavar="N", help="classes of the classifier head")
    srv.add_argument("--lenient", action="store_true",
                     help="ignore (with a logged warning) OpenAI/vLLM request options this server does not implement "
                          "(top_k, min_p, repetition_penalty, use_beam_search, ...) instead of answering 400")
    srv.set_defaults(run=run_serve)

    mg = sub.add_parser("merge", help="fold an adapter into its base: a full transformers model folder")
    mg.add_argument("adapter", help="a run's output_dir or an adapter folder")
    mg.add_argument("out_dir", help="where the merged model goes (config.json, safetensors, tokenizer)")
    _add_base_flags(mg)
    mg.set_defaults(run=run_merge)

    ex = sub.add_parser("export", help="write any low-rank adapter as a plain PEFT LoRA (same ΔW; PEFT and vLLM "
                                       "load it)")
    ex.add_argument("adapter", help="a run's output_dir or an adapter folder")
    ex.add_argument("out_dir", help="where the LoRA folder goes")
    ex.add_argument("--for", dest="target", default="peft", choices=["peft", "vllm"],
                    help="vllm: also check the rules of vLLM's LoRA loader (refusing, with the rule, what it cannot "
                         "load) and print the `vllm serve` line")
    _add_base_flags(ex)
    ex.set_defaults(run=run_export)

    mg = sub.add_parser("merge-adapters", help="combine PEFT LoRA folders into one (exact Σ wᵢ·ΔWᵢ by default; "
                                               "TIES, DARE, DELLA, Breadcrumbs, LoRA-LEGO, KnOTS, PEFT's modes)")
    mg.add_argument("sources", nargs="+", metavar="SRC", help="adapter folders: PEFT LoRA (any ranks, rsLoRA, "
                    "patterns; merged from the files alone) or any lorakit variant with an additive ΔW (merged on "
                    "the base model)")
    mg.add_argument("--weights", nargs="+", type=float, required=True, metavar="W", help="one weight per SRC "
                    "(negative: task negation)")
    mg.add_argument("--method", default="linear", choices=list(MERGE_METHODS), metavar="NAME",
                    help="cat: concatenated factors, rank Σrᵢ; linear (default): exact Σ wᵢΔWᵢ re-factored, or its "
                         "optimal rank-K approximation with --r / --energy; ties, dare_linear, dare_ties, della, "
                         "magnitude_prune, breadcrumbs: entry by entry on each layer's ΔW (need --density and "
                         "--r or --energy); lego: LoRA-LEGO clusters of rank-1 units (--k); knots: a shared SVD "
                         "basis, coefficients merged by --knots-inner; peft_linear, peft_ties, peft_dare_linear, "
                         "peft_dare_ties, peft_magnitude_prune, peft_svd: PEFT 0.21.2's add_weighted_adapter")
    mg.add_argument("--r", type=int, default=None, metavar="K", help="the rank of every merged layer (the optimal "
                    "rank-K approximation of the method's result)")
    mg.add_argument("--energy", type=float, default=None, metavar="E",
                    help="instead of --r: per layer, the smallest rank keeping this fraction of Σσ²")
    mg.add_argument("--density", type=float, default=None, metavar="D", help="the fraction of entries kept "
                    "(ties, dare_*, della, magnitude_prune, breadcrumbs, peft_* pruning modes, knots)")
    mg.add_argument("--seed", type=int, default=None, help="random draws (DARE, DELLA, LEGO's k-means); default 0")
    mg.add_argument("--sign", choices=["weighted", "unweighted"], default=None,
                    help="TIES-style sign vote on the weighted (default) or unweighted deltas")
    mg.add_argument("--sign-method", choices=["total", "frequency"], default=None,
                    help="the vote: sign of the sum (default) or of the count of signs")
    mg.add_argument("--divide", choices=["count", "weight_sum", "none"], default=None,
                    help="TIES-style mean over agreeing adapters: by their count (default), by Σ|w|, or a plain sum")
    mg.add_argument("--epsilon", type=float, default=None, help="della: keep probabilities span density ± epsilon "
                    "(default 0.1)")
    mg.add_argument("--gamma", type=float, default=None, help="breadcrumbs: fraction of largest entries dropped "
                    "(default 0.01)")
    mg.add_argument("--lam", type=float, default=None, help="λ multiplying an element-wise result (default 1)")
    mg.add_argument("--k", type=int, default=None, help="lego: number of clusters (default: the largest rank)")
    mg.add_argument("--knots-inner", choices=["ta", "ties", "dare_linear", "dare_ties", "magnitude_prune"],
                    default=None,
                    help="knots: how the per-task coefficients are merged (default ties)")
    mg.add_argument("--output-dir", required=True, help="the new PEFT LoRA folder")
    _add_base_flags(mg)  # --model: the base, for sources that are not plain LoRA (merged through the model)
    mg.set_defaults(run=run_merge_adapters)

    sq = sub.add_parser("squeeze", help="compress an adapter to a lower rank as a plain PEFT LoRA (LoRA-Squeeze; "
                                        "plain LoRA needs no model, other variants load their base)")
    sq.add_argument("src", help="a run's output_dir or an adapter folder (any mergeable variant)")
    sq.add_argument("dst", help="where the squeezed folder goes")
    sq.add_argument("--r", type=int, default=None, metavar="INT", help="target rank of every layer")
    sq.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)  # deprecated name of --r
    sq.add_argument("--energy", type=float, default=None,
                    help="per layer, the smallest rank keeping this fraction of the spectral energy (e.g. 0.9)")
    sq.add_argument("--method", default="exact", choices=["exact", "rsvd"],
                    help="exact: QR of the factors (never forms ΔW); rsvd: randomized SVD on the factors")
    _add_base_flags(sq)
    sq.set_defaults(run=run_squeeze)

    from .claims.command import add_arguments as claims_arguments, run as run_claims

    cl = sub.add_parser("claims", help="regenerate docs/claims.md: each method's paper claim tested on our data "
                                       "(same as python -m lorakit.claims)")
    claims_arguments(cl)
    cl.set_defaults(run=run_claims)

    demo = sub.add_parser("demo", help="the README demo: baseline vs LoRA on VADER movies with MiniLM",
                          add_help=False)
    demo.set_defaults(run=None)
    return parser


def _add_base_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="the base model (default: the adapter's base_model_name_or_path, "
                                                      "else the run's model): " + HELP["model"])
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _dashes(token: str) -> str:
    """`--per_device_train_batch_size=8` (transformers' spelling) → `--per-device-train-batch-size=8`."""
    if not token.startswith("--") or token == "--":
        return token
    name, sep, value = token.partition("=")
    return name.replace("_", "-") + sep + value


def _check_command(argv: list[str], parser: argparse.ArgumentParser) -> None:
    """ConfigError naming the nearest command when the first word is not one."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is not None and word not in commands:
        near = difflib.get_close_matches(word, list(commands), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"unknown command {word!r}{hint}; commands: {', '.join(commands)}. See `lorakit --help`.")


def main(argv=None) -> int:
    """Run a command; returns the exit code (0, or 2 with a one-line `error: ...` on stderr for bad input)."""
    argv = [_dashes(a) for a in (sys.argv[1:] if argv is None else argv)]
    parser = build_parser()
    try:
        _check_command(argv, parser)
        args, rest = parser.parse_known_args(argv)
        if args.command == "demo":
            from .demo import main as demo_main

            demo_main(rest)
            return 0
        if rest:
            raise ConfigError(_unknown_flags(rest, parser, args.command))
        args.run(args)
    except (LorakitError, _UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help (0), or the demo's own argument errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BrokenPipeError:  # `lorakit inspect DIR | head`
        sys.stderr.close()
    return 0


def _unknown_flags(rest: list[str], parser: argparse.ArgumentParser, command: str) -> str:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    known = sorted(s for a in sub._actions for s in a.option_strings if s.startswith("--"))
    setting_flags = {"--" + f.name.replace("_", "-") for _, f, _ in _setting_fields()}
    parts = []
    for flag in (r for r in rest if r.startswith("-")) or rest:
        name = flag.split("=")[0]
        if name in setting_flags:  # e.g. a training setting given to eval
            parts.append(f"`lorakit {command}` does not take the run setting {name}")
            continue
        near = difflib.get_close_matches(name, known, n=3)
        parts.append(f"unknown option {flag!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    return "; ".join(parts) + f". See `lorakit {command} --help`."


if __name__ == "__main__":
    sys.exit(main())
