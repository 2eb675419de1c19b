"""`lorakit ...` command line."""
from __future__ import annotations

import argparse
import sys


def inspect_adapter(args) -> None:
    """Print an adapter folder's config summary and tensors (validated, never unpickled)."""
    from .io import read_adapter

    config, tensors = read_adapter(args.dir)
    print(f"variant={config.variant} r={config.r} lora_alpha={config.lora_alpha} use_rslora={config.use_rslora} "
          f"targets={config.target_modules}")
    total = 0
    for key, t in sorted(tensors.items()):
        total += t.numel()
        print(f"  {key:70s} {str(tuple(t.shape)):>16s} {str(t.dtype).replace('torch.', '')}")
    print(f"{len(tensors)} tensors, {total:,} parameters")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-rank adapters for any PyTorch model.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, save, reload and route an adapter on MiniLM (offline)",
                          add_help=False)
    demo.set_defaults(run=lambda a, rest: __import__("lorakit.demo").demo.main(rest))
    ins = sub.add_parser("inspect", help="show an adapter folder's config and tensors")
    ins.add_argument("dir")
    ins.set_defaults(run=lambda a, rest: inspect_adapter(a))
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from .errors import LorakitError

    try:
        args.run(args, rest)
    except LorakitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
