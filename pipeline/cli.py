"""``labelcat``: a thin click layer over the pipeline stages.

Why thin: everything the CLI does is reachable from Python (``pipeline.run``),
so tests and other schedulers drive the same code. Options shared by several
commands are defined once as decorators, in the manner of sqlite-utils.
Exit status: 0 the run completed (rows may still carry errors), 1 the run
failed, 2 usage error (bad option, unusable manifest, unknown model).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ chatter out of cron mail

from . import __version__  # noqa: E402
from .dedupe import DEFAULT_COLOR_THRESHOLD, DEFAULT_FINE_THRESHOLD, DEFAULT_PHASH_THRESHOLD, DedupeConfig  # noqa: E402
from .decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS  # noqa: E402
from .junk import JunkConfig  # noqa: E402

DEFAULT_OUT = "labelcat-output/labels.parquet"


def quiet_option(fn: Callable) -> Callable:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars and no summary (for cron).")(fn)


def model_options(fn: Callable) -> Callable:
    """--model, --taxonomy and --precision, shared by every command that classifies."""
    from .infer import MODELS, PRECISIONS

    fn = click.option(
        "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
        help="auto: mixed precision on a GPU, float32 on a CPU.",
    )(fn)
    fn = click.option(
        "--taxonomy", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="JSON file mapping ImageNet classes to shop categories (default: the packaged one).",
    )(fn)
    fn = click.option(
        "--model", "-m", type=click.Choice(MODELS.list()), default="efficientnet_lite0", show_default=True,
        help="Registered model (see `labelcat models list`).",
    )(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="labelcat")
def cli() -> None:
    """labelcat: label a shop's product photos every night, unattended.

    Ingests a folder or CSV manifest, drops duplicates and junk, classifies
    the rest with a TensorFlow model and writes one Parquet row per input.
    """


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="Parquet file to write (atomically replaced).")
@click.option("--summary-json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the run summary as JSON here.")
@model_options
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True, help="Images per model call.")
@click.option("--top-k", type=click.IntRange(1, 20), default=3, show_default=True, help="Alternatives kept per row.")
@click.option("--workers", type=click.IntRange(0, 512), default=0, show_default=True,
              help="Threads for reading and hashing (0: one per core).")
@click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse images with more pixels (decompression-bomb guard).")
@click.option("--max-bytes", type=click.IntRange(1), default=DEFAULT_MAX_BYTES, show_default=True,
              help="Refuse files larger than this.")
@click.option("--phash-threshold", type=click.IntRange(0, 32), default=DEFAULT_PHASH_THRESHOLD, show_default=True,
              help="Max Hamming distance (of 64 bits) for near-duplicate candidates.")
@click.option("--fine-threshold", type=click.IntRange(0, 128), default=DEFAULT_FINE_THRESHOLD, show_default=True,
              help="Max Hamming distance (of 256 bits) to confirm a near duplicate.")
@click.option("--color-threshold", type=click.FloatRange(0, 1), default=DEFAULT_COLOR_THRESHOLD, show_default=True,
              help="Max colour-grid distance to confirm a near duplicate (keeps colour variants apart).")
@click.option("--min-size", type=click.IntRange(1), default=JunkConfig.min_side, show_default=True,
              help="Photos with a shorter side are junk (too_small).")
@click.option("--not-product-threshold", type=click.FloatRange(0, 1), default=JunkConfig.not_product, show_default=True,
              help="Not-product evidence (animal, remote, circuit board...) that makes a photo junk.")
@click.option("--mismatch-confidence", type=click.FloatRange(0, 1), default=JunkConfig.mismatch_confidence,
              show_default=True, help="Confidence at which contradicting the category hint makes a photo junk.")
@quiet_option
def run(
    input_path: Path, out: Path, summary_json: Path | None, model: str, taxonomy: Path | None, precision: str,
    batch_size: int, top_k: int, workers: int, max_pixels: int, max_bytes: int, phash_threshold: int,
    fine_threshold: int, color_threshold: float, min_size: int, not_product_threshold: float,
    mismatch_confidence: float, quiet: bool,
) -> None:
    """Label the photos of INPUT (a folder tree or a CSV manifest) into Parquet.

    Every input row comes out exactly once, in input order, with a status:
    labelled, duplicate, junk or error. Exit 0 when the run completed, even
    if some rows are errors; 1 when the run failed; 2 on usage errors.
    """
    from .infer import load_classifier
    from .ingest import IngestError
    from .run import RunConfig, run as run_pipeline, write_summary_json
    from .taxonomy import TaxonomyError

    cfg = RunConfig(
        batch_size=batch_size, top_k=top_k, max_pixels=max_pixels, max_bytes=max_bytes, workers=workers,
        dedupe=DedupeConfig(phash_threshold, fine_threshold, color_threshold),
        junk=JunkConfig(min_side=min_size, not_product=not_product_threshold, mismatch_confidence=mismatch_confidence),
        quiet=quiet,
    )
    try:
        classifier = load_classifier(model, taxonomy, precision)
    except (TaxonomyError, RuntimeError) as exc:
        raise click.UsageError(str(exc)) from None
    try:
        summary = run_pipeline(input_path, out, classifier, cfg)
    except IngestError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        click.echo(f"labelcat: run failed: {exc}", err=True)
        sys.exit(1)
    if summary_json:
        write_summary_json(summary, summary_json)
    if not quiet:
        click.echo(summary.render())


@cli.group()
def models() -> None:
    """Inspect the model and backbone registries."""


@models.command("list")
def models_list() -> None:
    """List registered models and backbones with one line each."""
    from .backbones import BACKBONES
    from .infer import MODELS

    click.echo("models (labelcat run --model NAME):")
    for name in MODELS.list():
        click.echo(f"  {name:20s} {MODELS.describe(name)}")
    click.echo("backbones:")
    for name in BACKBONES.list():
        click.echo(f"  {name:20s} {BACKBONES.describe(name)}")


def main() -> None:  # console-script entry point
    cli()
