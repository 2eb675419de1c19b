"""`report_to`: send each logged training record to TensorBoard or Weights & Biases as well as `metrics.jsonl`.

- `tensorboard`: scalars written with `torch.utils.tensorboard` to `<output_dir>/runs` (offline; needs the
  `tensorboard` package). Names follow transformers: `train/loss`, `train/learning_rate`, `eval/accuracy`, ...
  A resumed run purges the steps it logs again.
- `wandb`: `wandb.init(mode="offline", dir=output_dir)`; `wandb sync` uploads the run later, if wanted.

The sink opens on the first record (a `Trainer` that never logs leaves no files) and only in the main process.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_installed(report_to: str) -> None:
    """ConfigError when `report_to` needs a package that is not installed."""
    package = PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"report_to={report_to!r} needs the {package} package: pip install {package} "
                          f"(or use report_to 'none')")


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record under transformers' names: eval_x → eval/x, anything else → train/x."""
    return {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Reporter:
    """Sends records (`{"step": ..., "loss": ..., ...}`) to the sink `report_to` names; `none` does nothing."""

    def __init__(self, report_to: str, output_dir: str | Path):
        check_installed(report_to)
        self.report_to, self.output_dir, self.sink = report_to, Path(output_dir), None

    def log(self, record: dict) -> None:
        if self.report_to == "none":
            return
        if self.sink is None:
            self.sink = self._open(first_step=record["step"])
        values = scalars(record)
        if self.report_to == "tensorboard":
            for name, value in values.items():
                self.sink.add_scalar(name, value, record["step"])
            self.sink.flush()
        else:
            self.sink.log(values, step=record["step"])

    def close(self) -> None:
        if self.sink is None:
            return
        if self.report_to == "tensorboard":
            self.sink.close()
        else:
            self.sink.finish()
        self.sink = None

    def _open(self, first_step: int):
        if self.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(str(self.output_dir / "runs"), purge_step=first_step if first_step > 1 else None)
        import wandb

        return wandb.init(mode="offline", dir=str(self.output_dir), project="lorakit", name=self.output_dir.name)
