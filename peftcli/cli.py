"""The `peft` command: parse, call one function, print, exit code. No logic lives here."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from peftcli.errors import UserError

app = typer.Typer(
    help="Parameter-efficient fine-tuning of transformer models from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stdout = Console()
stderr = Console(stderr=True)

_debug = False


class _NoteHandler(logging.Handler):
    """peftcli's own log records (e.g. adapter fields it ignores) as `note:` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        stderr.print(f"[dim]note:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


def _show_version(value: bool) -> None:
    if value:
        from peftcli import __version__

        print(f"peftcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
    ),
):
    global _debug
    _debug = debug or bool(os.environ.get("PEFTCLI_DEBUG"))
    logger = logging.getLogger("peftcli")
    if not any(isinstance(h, _NoteHandler) for h in logger.handlers):
        logger.addHandler(_NoteHandler())
    logger.setLevel(logging.DEBUG if _debug else logging.INFO)


def _handle_errors(fn: Callable) -> Callable:
    """User errors: one line on stderr, exit code 2 (1 for failed self-checks), no traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if _debug:
                traceback.print_exc()
            if e.exit_code == 0:  # not a fault: something to say (a finished run asked to resume)
                stdout.print(escape(str(e)), highlight=False, soft_wrap=True)
                raise typer.Exit(0) from None
            stderr.print(
                f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True
            )
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt as e:
            stderr.print("terminated" if isinstance(e, Terminated) else "interrupted")
            raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, `timeout` and job schedulers send): unwinds like Ctrl-C, so that nothing is left
    half-written, and exits 143. Training checkpoints first (train/loop.py handles it between steps)."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' GGUF reader draws its own tqdm bar; ours is the only progress display.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Through the environment where transformers is not imported yet: importing its logging alone takes
    # ~1.4 s, which `peft count` need not spend when it answers from config.json.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------------


@app.command()
@_handle_errors
def train(
    recipe: Path = typer.Argument(..., help="The YAML recipe, or (with --resume) a run's output dir."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a recipe key: --set train.max_steps=10 (repeatable)."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue from the newest checkpoint: of RUN_DIR, or of the recipe's output_dir.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous run in output_dir."),
):
    """Train a PEFT adapter as the recipe says; writes the adapter, metrics and a report.

    `peft train RUN_DIR --resume` continues a run from its own recipe.yaml (with any --set changes that a
    resumed run may make, such as a larger train.max_steps)."""
    from peftcli.recipe import load_recipe, load_run_recipe

    if recipe.is_dir():
        if not resume:
            raise UserError(f"{recipe} is a directory: to continue the run in it, add --resume")
        loaded = load_run_recipe(recipe, set_)
    else:
        loaded = load_recipe(recipe, set_)
    _quiet_libraries()
    from peftcli.train.run import run

    run(loaded, resume=resume, overwrite=overwrite, console=stdout, recipe_path=str(recipe))


@app.command()
@_handle_errors
def compare(
    recipe: Path = typer.Argument(..., help="The YAML recipe: its model, data, steps, batch and seed."),
    method: list[str] = typer.Option(
        [],
        "--method",
        "-m",
        help="A row: a method, optionally with settings: lora:rank=4,alpha=8 (repeatable; "
        "default: every method that applies).",
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a recipe key for every row: --set train.max_steps=40 (repeatable)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted comparison: finished rows are not retrained."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous comparison in output_dir."),
):
    """Train several methods on the same data and budget; one table of cost and result (compare.md)."""
    from peftcli.compare.plan import make_plan

    plan = make_plan(recipe, set_, method)  # a bad recipe or flag is refused before torch is imported
    _quiet_libraries()
    from peftcli.compare.run import compare as run_compare

    run_compare(plan, resume=resume, overwrite=overwrite, console=stdout)


@app.command()
@_handle_errors
def count(
    model_or_recipe: str = typer.Argument(
        ..., help="A model (dir, .gguf, hub id, built-in name) or a recipe."
    ),
    method: list[str] = typer.Option(
        [], "--method", "-m", help="Method to count (repeatable); default lora."
    ),
    rank: int | None = typer.Option(None, help="Rank (LoRA, VeRA, LoHa, LoKr)."),
    alpha: float | None = typer.Option(None, help="Alpha (LoRA, LoHa, LoKr)."),
    target_modules: str | None = typer.Option(None, help="Comma-separated names, or all-linear."),
    num_virtual_tokens: int | None = typer.Option(None, help="Prefix/prompt tuning length."),
    bottleneck: int | None = typer.Option(None, help="Bottleneck adapter size."),
    task: str | None = typer.Option(
        None, help="causal-lm | sequence-classification (default: the config's)."
    ),
    dtype: str | None = typer.Option(
        None,
        help="auto | float32 | bfloat16 | float16: the base's, for the memory (default: recipe's, or auto).",
    ),
    quantize: str | None = typer.Option(
        None,
        help="auto | none | int8 | int4 | nf4: the frozen weights' storage (default: recipe's, or auto).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Compare methods: trainable vs total parameters, and the memory a run's weights need, without loading
    weights."""
    from peftcli.count import count_target

    _quiet_libraries()
    overrides = {
        "rank": rank,
        "alpha": alpha,
        "num_virtual_tokens": num_virtual_tokens,
        "bottleneck_size": bottleneck,
        "target_modules": target_modules,
    }
    model_name, counts, precision = count_target(model_or_recipe, method, overrides, task, dtype, quantize)
    if as_json:
        print(json.dumps([{**c.to_dict(), "precision": precision.to_dict()} for c in counts], indent=2))
        return
    from peftcli.count_tables import count_table, memory_table

    stdout.print(count_table(model_name, counts))
    stdout.print(memory_table(counts, precision))


@app.command()
@_handle_errors
def merge(
    adapter_dir: Path = typer.Argument(
        ..., help="An adapter directory (ours or HF PEFT's) of a method that folds into the weights."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Where to write the merged model (must not exist)."
    ),
    base: str | None = typer.Option(
        None, help="Base model (default: the adapter's base_model_name_or_path)."
    ),
    dtype: str | None = typer.Option(None, help="fp32 | bf16 | fp16 (default: the base's dtype)."),
    no_verify: bool = typer.Option(
        False, "--no-verify", help="Skip the reload-and-compare check (it loads the model once, in fp32)."
    ),
):
    """Fold a trained adapter into the base weights and write a standard transformers model."""
    _quiet_libraries()
    from peftcli.merge.to_dir import merge_to_dir

    merge_to_dir(adapter_dir, output, base=base, dtype=dtype, console=stdout, verify=not no_verify)


@app.command()
@_handle_errors
def generate(
    run_dir: Path = typer.Argument(..., help="A training output dir or an adapter dir."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt (or text to classify)."),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature (with --sample)."),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0, help="Nucleus sampling (with --sample)."),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    base: str | None = typer.Option(None, help="Base model (default: the adapter's)."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the chat template."),
):
    """Load base + adapter and print a completion (or the predicted label for a classifier)."""
    _quiet_libraries()
    from peftcli.infer import run_generate

    run_generate(
        run_dir,
        prompt,
        max_new_tokens=max_new_tokens,
        sample=sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        base=base,
        raw=raw,
        on_text=_write_now,
    )
    print()


def _write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
@_handle_errors
def chat(
    run_dir: Path = typer.Argument(..., help="A training output dir or an adapter dir."),
    max_new_tokens: int = typer.Option(256, min=1, help="Most tokens per reply."),
    system: str | None = typer.Option(None, help="A system message to start the conversation with."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature (with --sample)."),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0, help="Nucleus sampling (with --sample)."),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    base: str | None = typer.Option(None, help="Base model (default: the adapter's)."),
):
    """Talk to a run: replies stream as they are written; /reset forgets, /exit or Ctrl-D ends."""
    _quiet_libraries()
    from peftcli.infer.chat import run_chat

    interactive = sys.stdin.isatty()
    if interactive:
        stderr.print(f"chat with {run_dir}: /reset forgets the conversation, /exit or Ctrl-D ends it")

    def lines():
        while True:
            try:
                yield input("> " if interactive else "")
            except EOFError:
                return

    sampling = (
        {"temperature": temperature, "top_p": top_p, "seed": seed} if sample and temperature > 0 else None
    )
    try:
        run_chat(
            run_dir,
            lines(),
            _write_now,
            max_new_tokens=max_new_tokens,
            system=system,
            base=base,
            sampling=sampling,
        )
    except KeyboardInterrupt:  # at the prompt: the end of the conversation, not an error
        print()
    if interactive:
        print()


@app.command()
@_handle_errors
def export(
    run_dir: Path = typer.Argument(..., help="A training output dir or an adapter dir."),
    gguf: Path = typer.Option(..., "--gguf", help="The GGUF file to write (must not exist)."),
    quant: str | None = typer.Option(
        None, help="f16 | bf16 | q8_0 | q4_0 | q4_1 (f32 too); default: a GGUF base's own types, else f16."
    ),
    adapter_only: bool = typer.Option(
        False, "--adapter-only", help="Write the LoRA alone, as llama.cpp's --lora reads it."
    ),
    ollama: Path | None = typer.Option(
        None, "--ollama", help="Also write an Ollama Modelfile into this dir."
    ),
    base: str | None = typer.Option(None, help="Base model (default: the adapter's)."),
    probe: list[str] = typer.Option([], "--probe", help="A probe prompt for the check (repeatable)."),
    no_verify: bool = typer.Option(
        False, "--no-verify", help="Skip the check that llama.cpp loads the file and answers like peftcli."
    ),
):
    """Write a run as GGUF for llama.cpp, Ollama and LM Studio, checked by llama.cpp itself."""
    _quiet_libraries()
    from peftcli.export.run import export_run
    from peftcli.export.verify import PROBES

    export_run(
        run_dir,
        gguf,
        quant=quant,
        adapter_only=adapter_only,
        ollama=ollama,
        base=base,
        verify=not no_verify,
        probes=tuple(probe) or PROBES,
        console=stdout,
    )


@app.command()
@_handle_errors
def predict(
    run_dir: Path = typer.Argument(..., help="A classification training output dir or adapter dir."),
    text: str = typer.Option(..., "--text", "-t", help="The text to classify."),
    base: str | None = typer.Option(None, help="Base model (default: the adapter's)."),
):
    """Print the predicted label of a classification adapter, with its probability."""
    _quiet_libraries()
    from peftcli.infer import run_predict

    print(run_predict(run_dir, text, base=base))


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except BrokenPipeError:  # `peft count ... | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
