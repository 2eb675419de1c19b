"""The README's shell examples, run (issue 16 acceptance).

Every `lorakit ...` line of README.md's ```bash blocks (continuation lines joined, comments dropped) runs in-process
through `lorakit.cli.main`, in README order, in one working directory, so later examples use what earlier ones
wrote (`eval out/movies` after the `train` that made it). `run.yaml`, which the README leaves to the reader, is
written by the test; a `...` in an example stands for the reader's settings and becomes `--output-dir <own folder>`.

- Default suite (smoke): each command with a smoke override appended: `--max-steps 2` and few examples for
  training, few for evaluating, one learning rate and one seed for `compare` (its runs in this process),
  `make-model` at hidden size 64; the local sentiment file of test_cli.py for `vader:*` data and the tiny Llama
  for SmolLM2 (MiniLM is packaged, so it stays).
- Slow suite: the commands as written (VADER, SmolLM2, whole epochs; about an hour on 2 CPU cores).

Not run: `lorakit serve` (a server runs until it is stopped; its command line is parsed here, tests/serve runs
servers), and lines that are not lorakit commands (`torchrun`: tests/test_resume_ddp.py; `curl`; `make`).
"""
import contextlib
import importlib
import io
import json
import os
import shlex
from pathlib import Path

import pytest

from lorakit.cli import build_parser, main
from lorakit.train.args import read_yaml
from test_cli import write_sentiment

os.environ.setdefault("HF_HUB_OFFLINE", "1")
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[tuple[int, list[str]]]:
    """(README line, argv after `lorakit`) for every lorakit command in README.md's bash blocks."""
    found, in_bash, pending = [], False, None
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if not in_bash:
            continue
        start, text = pending or (number, "")
        text += " " + line.split(" #")[0].rstrip()  # a comment starts at " #" in these examples
        if text.endswith("\\"):
            pending = (start, text[:-1])
            continue
        pending = None
        words = shlex.split(text)
        if words and Path(words[0]).name == "lorakit":
            found.append((start, [w for w in words[1:] if w != "&"]))
    return found


COMMANDS = readme_commands()


def with_output_dir(line: int, argv: list[str]) -> list[str]:
    """`...` (the reader's settings) → an output folder of the example's own."""
    if "..." not in argv:
        return argv
    return [w for w in argv if w != "..."] + ["--output-dir", f"out/line{line}"]


def smoke(argv: list[str], data: str) -> list[str]:
    """The example with local data and a tiny model, and a smoke override appended."""
    swap = {"smollm2": "tiny-llama"} if argv[0] == "train" else {}
    argv = [data if w.startswith("vader:") else swap.get(w, w) for w in argv]
    extra = {"train": ["--max-steps", "2", "--max-train-samples", "48", "--max-eval-samples", "8",
                       "--per-device-train-batch-size", "8", "--disable-tqdm"],
             "eval": ["--max-eval-samples", "8"],
             "compare": ["--lrs", "1e-3", "--seeds", "1", "--max-steps", "2", "--max-train-samples", "48",
                         "--max-eval-samples", "8", "--disable-tqdm"],
             "make-model": ["--hidden-size", "64", "--num-layers", "2", "--vocab-size", "512"]}.get(argv[0], [])
    if argv[0] in ("train", "compare") and "--config" not in argv and "--data" not in argv:
        extra += ["--data", data]  # (the default data is VADER movies)
    return argv + extra


def check(argv: list[str], out: str) -> None:
    """What each command must have written or printed, beyond its exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "train":
        folder = getattr(args, "output_dir", None) or read_yaml(args.config)["output_dir"]
        assert json.loads((Path(folder) / "results.json").read_text())["steps"] > 0
    elif args.command == "eval":
        assert "test_accuracy" in out
    elif args.command == "inspect":
        assert "adapted layers" in out
    elif args.command == "merge":
        assert (Path(args.out_dir) / "config.json").is_file() and (Path(args.out_dir) / "model.safetensors").is_file()
    elif args.command == "export":
        assert json.loads((Path(args.out_dir) / "adapter_config.json").read_text())["peft_type"] == "LORA"
    elif args.command == "squeeze":
        assert json.loads((Path(args.dst) / "adapter_config.json").read_text())["r"] == args.r
    elif args.command == "compare":
        assert (Path(args.output_dir) / "results.md").is_file()
    elif args.command == "make-model":
        assert (Path(args.out_dir) / "config.json").is_file()


def run_all(workdir: Path, run_yaml: str, adapt=lambda argv: argv, patch=lambda mp: None
            ) -> dict[int, tuple[int, str, str]]:
    """Run every README command in `workdir`: {README line: (exit code, stdout, stderr)}; `serve` is parsed.
    `patch(monkeypatch)` may replace things while they run."""
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        patch(mp)
        mp.chdir(workdir)
        (workdir / "run.yaml").write_text(run_yaml)
        for line, argv in COMMANDS:
            argv = adapt(with_output_dir(line, argv))
            if argv[0] == "serve":
                build_parser().parse_args(argv)  # argparse errors raise: the README's flags exist
                results[line] = (0, "", "")
                continue
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
            results[line] = (code, out.getvalue(), err.getvalue())
            if code == 0:
                check(argv, out.getvalue())
    return results


def test_readme_has_the_examples():
    assert {argv[0] for _, argv in COMMANDS} >= {"train", "eval", "inspect", "compare", "merge", "export",
                                                 "squeeze", "make-model", "serve"}


def write_smoke_data(path) -> str:
    """test_cli's sentiment rows, each also as a prompt/completion chat: one file for every task of the README."""
    rows = [json.loads(line) for line in Path(write_sentiment(path)).read_text().splitlines()]
    path.write_text("".join(json.dumps({**row, "prompt": f"Positive or negative?\n\n{row['text']}",
                                        "completion": ("negative", "positive")[row["label"]]}) + "\n"
                            for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("readme")
    data = write_smoke_data(workdir / "sentiment.jsonl")
    run_yaml = f"model: minilm\ndata: {data}\noutput_dir: out/yaml\nmax_steps: 2\nmax_train_samples: 48\n" \
               f"max_eval_samples: 8\ndisable_tqdm: true\n"
    return run_all(workdir, run_yaml, adapt=lambda argv: smoke(argv, data), patch=compare_in_process)


def compare_in_process(mp) -> None:
    """compare's runs in this process (each in a spawned one is tested in test_compare.py): seconds, not tens."""
    from lorakit.train import train

    mp.setattr(importlib.import_module("lorakit.train.compare"), "run_one", lambda config, resume=False:
               train(config, resume))


@pytest.mark.parametrize("line, argv", COMMANDS, ids=[f"README.md:{line} {argv[0]}" for line, argv in COMMANDS])
def test_readme_example_smoke(smoke_runs, line, argv):
    code, _, err = smoke_runs[line]
    assert code == 0, f"README.md line {line}: lorakit {shlex.join(argv)}\n{err}"


@pytest.mark.full
def test_readme_examples_as_written(tmp_path):
    """Each example exactly as the README gives it (the whole data and models): about an hour on 2 cores, so only
    on request (`pytest -m full`), not in `make test-slow` / CI."""
    run_yaml = "model: minilm\ndata: vader:movies\noutput_dir: out/yaml\nr: 8\nmax_train_samples: 2000\n"
    results = run_all(tmp_path, run_yaml)
    failed = {line: err for line, (code, _, err) in results.items() if code != 0}
    assert not failed, failed
