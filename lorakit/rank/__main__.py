"""`python -m lorakit.rank --config run.yaml [--experiment loraprune|loram] [--metrics lora,random,...]
[--sparsity 0.5] [--align-data SPECS --align-samples N] [--out results.json]`: the pruning experiments on one run
config (flat YAML, as `lorakit train`). loraprune: one run per pruning score (`prune_experiment`), each in
output_dir/<metric>; loram: one LoRAM run (`loram_experiment`) in output_dir/loram.
"""
from __future__ import annotations

import argparse
import dataclasses as dc
import json

from ..train.args import RunConfig, read_yaml
from .loram import align_texts, loram_experiment
from .prune import prune_experiment


def main(argv=None) -> dict:
    """Run the experiment the arguments name, print its results as JSON (and write them to --out); returns them."""
    p = argparse.ArgumentParser(prog="python -m lorakit.rank")
    p.add_argument("--config", required=True)
    p.add_argument("--experiment", choices=["loraprune", "loram"], default="loraprune")
    p.add_argument("--metrics", default="lora,magnitude,random")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--align-data", default="", help="loram: comma-separated data specs whose training texts align "
                   "the pruned model (e.g. vader:tweets,vader:amazon,vader:nyt); empty: no alignment")
    p.add_argument("--align-samples", type=int, default=4000)
    p.add_argument("--align-epochs", type=int, default=1)
    p.add_argument("--align-lr", type=float, default=2e-4)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    config = RunConfig.from_flat(read_yaml(a.config))

    def under(sub):
        return dc.replace(config, training=dc.replace(config.training,
                                                      output_dir=f"{config.training.output_dir}/{sub}"))
    if a.experiment == "loram":
        texts = align_texts(a.align_data, a.align_samples, config.training.seed) if a.align_data else None
        results = {"loram": loram_experiment(under("loram"), a.sparsity, align=texts, align_epochs=a.align_epochs,
                                             align_lr=a.align_lr)}
    else:
        results = {m: prune_experiment(under(m), metric=m, sparsity=a.sparsity) for m in a.metrics.split(",")}
    text = json.dumps(results, indent=1, default=str)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
