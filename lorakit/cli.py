"""`lorakit ...` command line: train, eval, compare, inspect, squeeze, demo, make-model, serve.

Run settings come from `--config run.yaml` and/or flags; a flag is a `RunConfig`, `AdapterConfig` or
`TrainingArguments` field with dashes (`--learning-rate 1e-3`, `--target-modules query value`, `--use-rslora`).
Flags override the YAML file.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import typing

from .errors import ConfigError, LorakitError
from .train.args import TASK_DEFAULTS

HELP = {"model": "smollm2 | minilm | tiny-llama | a local transformers model directory",
        "data": "vader:<movies|tweets|amazon|nyt> | a .csv/.jsonl file | a directory with train/validation/test",
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
        "eval_ranks": "also test the adapter at these ranks and report AURAC, e.g. 1,2,4,8 (plain LoRA: first k "
                      "components; dylora / matryoshka_lora: their nested form)"}


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


def add_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per run setting; only flags the user gives end up in the namespace."""
    parser.add_argument("--config", help="a YAML file of settings (flags override it)")
    groups = {}
    for owner, f, hint in _setting_fields():
        group = groups.setdefault(owner, parser.add_argument_group(owner))
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.name == "variant":
            from .variants import variant_names

            text = " | ".join(variant_names()) + f" (default: {default})"
        else:
            text = HELP.get(f.name, f"default: {default!r}")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=text)
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
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
    results = train(config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one table
        _print_results(results)
        for path in saved_paths(config.training.output_dir):
            print(f"saved {path}")


def run_eval(args) -> None:
    from pathlib import Path

    from .train import RunConfig, evaluate
    from .train.args import read_yaml

    folder = Path(args.adapter)  # a run's output_dir, or an adapter folder (inside a run's output_dir or not)
    found = [f / "run_config.yaml" for f in (folder, folder.parent) if (f / "run_config.yaml").is_file()]
    base = read_yaml(found[0]) if found else {}  # the run's settings; flags override them
    config = RunConfig.from_flat(settings(args, base))
    _print_results(evaluate(args.adapter, config, split=args.split))


def run_compare(args) -> None:
    from .train import compare

    swept = {"variant": "--variants", "use_rslora": "--variants (rslora, <variant>+rslora)",
             "learning_rate": "--lrs", "seed": "--seeds"}
    given = [name for name in swept if name in vars(args)]
    if given:
        raise ConfigError(f"compare sweeps {', '.join(given)}: use {', '.join(swept[n] for n in given)} instead of "
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
    compare(settings(args), variants=variants, learning_rates=learning_rates, seeds=seeds, per_variant=per_variant)


def run_inspect(args) -> None:
    from .analysis import describe_adapter
    from .train.run import adapter_folder

    print(describe_adapter(adapter_folder(args.dir)))


def run_make_model(args) -> None:
    from .serve.model_dir import make_model, parameter_count

    out = make_model(args.out_dir, arch=args.arch, hidden_size=args.hidden_size, num_layers=args.num_layers,
                     num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                     intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                     max_position_embeddings=args.max_position_embeddings, seed=args.seed)
    print(f"{out}  {parameter_count(out):,} parameters")


def run_serve(args) -> None:
    from .serve.config import GiB, EngineConfig
    from .serve.server import parse_lora_modules, serve

    given = {"max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank, "max_cpu_loras": args.max_cpu_loras,
             "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
             "max_waiting": args.max_waiting, "block_size": args.block_size, "dtype": args.dtype,
             "fp32_max_rows": args.fp32_max_rows}
    if args.memory_gb is not None:
        if not args.memory_gb > 0:
            raise ConfigError(f"--memory-gb must be > 0, got {args.memory_gb}")
        given["memory_bytes"] = int(args.memory_gb * GiB)
    config = EngineConfig(**{k: v for k, v in given.items() if v is not None})
    serve(args.model_dir, parse_lora_modules(args.lora_modules or []), engine_config=config,
          adapter_roots=args.adapter_root, served_name=args.served_model_name, host=args.host, port=args.port,
          shutdown_timeout=args.shutdown_timeout, classify_model=args.classify_model,
          classify_modules=parse_lora_modules(args.classify_lora_modules or []), classify_labels=args.classify_labels)


def run_squeeze(args) -> None:
    from .rank.squeeze import squeeze_folder

    if (args.rank is None) == (args.energy is None):
        raise ConfigError("squeeze needs exactly one of --rank K or --energy E")
    report = squeeze_folder(args.src, args.dst, target_rank=args.rank, energy=args.energy, method=args.method)
    width = max(map(len, report))
    for path, r in report.items():
        print(f"{path:<{width}}  r {r['from']:>3} -> {r['to']:<3}  energy kept {r['energy']:.4f}")
    print(f"wrote {args.dst}")


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
    parser = _Parser(prog="lorakit", description="Low-rank adapters for any PyTorch model.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train an adapter (flags or --config YAML)", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    add_settings(train)
    train.set_defaults(run=run_train)

    ev = sub.add_parser("eval", help="evaluate a saved adapter (a run folder or an adapter folder) on a dataset")
    ev.add_argument("adapter", help="a run's output_dir or an adapter folder")
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"])
    add_settings(ev)
    ev.set_defaults(run=run_eval)

    cmp = sub.add_parser("compare", help="variants x learning rates x seeds on one task: table + plots")
    cmp.add_argument("--variants", default=None,
                     help="comma-separated: registered variants, or rslora / <variant>+rslora (default: the entries "
                          "of --variant-settings, else lora,rslora,dora)")
    cmp.add_argument("--variant-settings", default=None, metavar="YAML",
                     help="a mapping entry → settings for that entry only (e.g. vera: {r: 256, options: {...}, learning_rates: [...]}); an "
                          "entry with its own `variant` key is a free label")
    cmp.add_argument("--lrs", nargs="+", default=["1e-4", "5e-4", "2e-3"], help="learning rates")
    cmp.add_argument("--seeds", nargs="+", default=["2"], help="a count N (seeds 0..N-1) or a list of seeds")
    add_settings(cmp)
    cmp.set_defaults(run=run_compare)

    ins = sub.add_parser("inspect", help="an adapter folder: config, per-layer ranks, parameter counts, norms")
    ins.add_argument("dir", help="an adapter folder, or a run's output_dir")
    ins.set_defaults(run=run_inspect)

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
                         help=f"{text} (default: EngineConfig's)")
    srv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="weights, activations and KV cache; adapters are cast to it. auto (default) = the "
                          "checkpoint's dtype (config.json dtype/torch_dtype): bf16 or fp16 checkpoints stay 16-bit, "
                          "anything else is served in float32. bfloat16 is faster on CPUs with avx512_bf16/AMX "
                          "from a few concurrent requests on (see BENCHMARKS.md); float16 is not tuned on CPU")
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
    srv.set_defaults(run=run_serve)

    sq = sub.add_parser("squeeze", help="compress a PEFT LoRA folder to a lower rank (LoRA-Squeeze, no model needed)")
    sq.add_argument("src", help="a PEFT LoRA folder")
    sq.add_argument("dst", help="where the squeezed folder goes")
    sq.add_argument("--rank", type=int, default=None, help="target rank of every layer")
    sq.add_argument("--energy", type=float, default=None,
                    help="per layer, the smallest rank keeping this fraction of the spectral energy (e.g. 0.9)")
    sq.add_argument("--method", default="exact", choices=["exact", "rsvd"],
                    help="exact: QR of the factors (never forms ΔW); rsvd: randomized SVD on the factors")
    sq.set_defaults(run=run_squeeze)

    demo = sub.add_parser("demo", help="the README demo: baseline vs LoRA on VADER movies with MiniLM",
                          add_help=False)
    demo.set_defaults(run=None)
    return parser


def main(argv=None) -> int:
    """Run a command; returns the exit code (0, or 2 with a one-line `error: ...` on stderr for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
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
    parts = []
    for flag in (r for r in rest if r.startswith("-")) or rest:
        near = difflib.get_close_matches(flag.split("=")[0], known, n=3)
        parts.append(f"unknown option {flag!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    return "; ".join(parts) + f". See `lorakit {command} --help`."


if __name__ == "__main__":
    sys.exit(main())
