"""``labelcat``: a thin click layer over the pipeline stages.

Why thin: everything the CLI does is reachable from Python (``pipeline.runners.local``),
so tests and other schedulers drive the same code. Options shared by several
commands are defined once as decorators, in the manner of sqlite-utils.
Exit status: 0 the run completed (rows may still carry errors), 1 the run
failed, 2 usage error (bad option, unusable manifest, unknown model).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ chatter out of cron mail
# TensorFlow's CPU tensors from its pooling (BFC) allocator instead of malloc: a batch's activations are tens
# of MB, above glibc's mmap threshold, so each was mapped, unmapped and its pages zeroed again for the next
# batch. `labelcat run` on 1,000 photos (2 cores): minor page faults 3.6-4.3 million -> 0.4 million, system
# time 12-14 s -> 3.6-4.0 s, wall 35-38 s -> 30-33 s; peak memory 1.35 -> 1.49 GB (README, "Benchmark")
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

from pipeline import __version__  # noqa: E402
from pipeline.stages.dedupe import (DEFAULT_COLOR_THRESHOLD, DEFAULT_EMBEDDING_SIMILARITY, DEFAULT_FINE_THRESHOLD,  # noqa: E402
                                    DEFAULT_PHASH_THRESHOLD, DedupeConfig)
from pipeline.stages.decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS  # noqa: E402
from pipeline.stages.junk import JunkConfig  # noqa: E402
from pipeline.review.sheet import DEFAULT_CORRECTIONS  # noqa: E402
from pipeline.runners.local import DEFAULT_CHUNK  # noqa: E402
from pipeline.models.backbones import BACKBONES  # noqa: E402

DEFAULT_OUT = "labelcat-output/labels.parquet"


def catalogue_option(consequence: str, source: str) -> Callable[[Callable], Callable]:
    """``--catalogue`` as ``run`` and ``evaluate`` both take it (``junk.catalogue_for``): one spelling, one
    meaning, so an evaluation scores the labels a run would give."""
    return click.option(
        "--catalogue", default="auto", show_default=True, metavar="auto|all|CATEGORY,...",
        help=f"The categories the shop sells: labels name only these{consequence}. auto: the categories photos "
             f"are {source}, once there are two, for the default model; all: any.")


def quiet_option(fn: Callable) -> Callable:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars and no summary (for cron).")(fn)


def option_group(build: Callable[..., Any], target: str, *options: Callable) -> Callable[[Callable], Callable]:
    """A decorator adding ``options`` to a command and handing it one object, ``build(**their values)``,
    as the keyword ``target`` (so commands take config objects, not a long tail of parameters)."""
    names = [opt(lambda: None).__click_params__[0].name for opt in options]  # type: ignore[attr-defined]

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[target] = build(**{n: kwargs.pop(n) for n in names})
            return fn(*args, **kwargs)

        for opt in reversed(options):
            wrapper = opt(wrapper)
        return wrapper

    return decorate


@dataclass(frozen=True)
class Limits:
    """What one input may cost: pixels, bytes, and the threads that read and hash."""

    max_pixels: int
    max_bytes: int
    workers: int


limit_options = option_group(
    Limits, "limits",
    click.option("--workers", type=click.IntRange(0, 512), default=0, show_default=True,
                 help="Threads for reading and hashing (0: one per core)."),
    click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS, show_default=True,
                 help="Refuse images with more pixels (decompression-bomb guard)."),
    click.option("--max-bytes", type=click.IntRange(1), default=DEFAULT_MAX_BYTES, show_default=True,
                 help="Refuse files larger than this."),
)
dedupe_options = option_group(
    lambda phash_threshold, fine_threshold, color_threshold, copy_similarity: DedupeConfig(
        phash_threshold=phash_threshold, fine_threshold=fine_threshold, color_threshold=color_threshold,
        embedding_similarity=copy_similarity),
    "dedupe",
    click.option("--phash-threshold", type=click.IntRange(0, 32), default=DEFAULT_PHASH_THRESHOLD, show_default=True,
                 help="Max Hamming distance (of 64 bits) for near-duplicate candidates (trimmed and whole photo)."),
    click.option("--fine-threshold", type=click.IntRange(0, 128), default=DEFAULT_FINE_THRESHOLD, show_default=True,
                 help="Max Hamming distance (of 256 bits) to confirm a near duplicate."),
    click.option("--color-threshold", type=click.FloatRange(0, 100), default=DEFAULT_COLOR_THRESHOLD, show_default=True,
                 help="Max colour distance (CIELAB units) to confirm a near duplicate (keeps colour variants apart)."),
    click.option("--copy-similarity", type=click.FloatRange(0, 2), default=DEFAULT_EMBEDDING_SIMILARITY,
                 show_default=True, help="Cosine of the model's embeddings from which a classified photo is compared "
                 "pixel by pixel with a kept one (the copy check after the model); above 1 turns it off."),
)
junk_options = option_group(
    lambda min_size, not_product_threshold, mismatch_confidence, hint_trust: JunkConfig(
        min_side=min_size, not_product=not_product_threshold, mismatch_confidence=mismatch_confidence,
        hint_trust=hint_trust),
    "junk",
    click.option("--min-size", type=click.IntRange(1), default=JunkConfig.min_side, show_default=True,
                 help="Photos with a shorter side are junk (too_small)."),
    click.option("--not-product-threshold", type=click.FloatRange(0, 1), default=JunkConfig.not_product,
                 show_default=True, help="Not-product evidence (animal, remote, circuit board...) that makes a photo junk."),
    click.option("--mismatch-confidence", type=click.FloatRange(0, 1), default=JunkConfig.mismatch_confidence,
                 show_default=True, help="Confidence at which contradicting the category hint makes a photo junk."),
    click.option("--hint-trust", type=click.FloatRange(0, 1), default=JunkConfig.hint_trust, show_default=True,
                 help="Prior probability that a photo's folder or category_hint names its category; the label "
                 "weighs it against the photo (0: labels from the photo alone)."),
)


def model_options(fn: Callable) -> Callable:
    """--model, --taxonomy and --precision, shared by every command that classifies."""
    from pipeline.models.classifier import PRECISIONS

    fn = click.option(
        "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
        help="auto: mixed precision on a GPU, float32 on a CPU.",
    )(fn)
    fn = click.option(
        "--taxonomy", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="JSON file mapping ImageNet classes to shop categories (default: the packaged one).",
    )(fn)
    fn = click.option(
        "--model", "-m", default="efficientnet_lite0", show_default=True,
        help="Registered model (`labelcat models list`) or a trained model folder (path, or a name under ./models).",
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
@click.option("--embeddings", is_flag=True,
              help="Also write each classified photo's embedding (the `embedding` column, float16).")
@limit_options
@dedupe_options
@junk_options
@catalogue_option(" and a photo the model confidently calls something else is junk (not_sold)",
                  "filed under (folders or hint column, tonight's and earlier nights')")
@click.option("--corrections", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CORRECTIONS,
              show_default=True, help="Review corrections store; photos a person labelled get the person's label.")
@click.option("--review-threshold", type=click.FloatRange(0, 1), default=None,
              help="Confidence below which `review export` picks rows (default: the model card's, else 0.6).")
@click.option("--store", default=None, callback=lambda ctx, param, value: _store_location(value),
              help="History store (a folder, or a pyarrow.fs URI such as s3://bucket/labelcat with --runner ray): "
                   "only new photos are classified, chunks are committed, one run at a time.")
@click.option("--chunk-size", type=click.IntRange(1), default=DEFAULT_CHUNK, show_default=True,
              help="Rows per unit of work (memory holds two: this one and the next, scanned meanwhile; with --store, the unit a killed run resumes from).")
@click.option("--relabel", is_flag=True, help="With --store: classify again photos an older model version labelled.")
@click.option("--skip-seen", is_flag=True, help="With --store: leave photos labelled on earlier nights out of --out.")
@click.option("--allow-outside", is_flag=True, help="Let manifest paths leave the manifest's folder, and folder symlinks point outside the input folder.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append one JSON line per stage and chunk (for monitoring).")
@click.option("--fail-on-row-errors", is_flag=True, help="Exit 4 (not 0) when the run completed but some rows are errors.")
@click.option("--runner", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: Ray Data tasks and actors (pip install 'labelcat[ray]').")
@click.option("--ray-address", default=None, help="Attach --runner ray to an existing cluster (default: start one here).")
@quiet_option
def run(
    input_path: Path, out: Path, summary_json: Path | None, model: str, taxonomy: Path | None, precision: str,
    batch_size: int, top_k: int, embeddings: bool, limits: Limits, dedupe: DedupeConfig, junk: JunkConfig, catalogue: str,
    corrections: Path,
    review_threshold: float | None, store: Path | str | None, chunk_size: int, relabel: bool, skip_seen: bool,
    allow_outside: bool, log_file: Path | None, fail_on_row_errors: bool, runner: str, ray_address: str | None,
    quiet: bool,
) -> None:
    """Label the photos of INPUT (a folder tree or a CSV manifest) into Parquet.

    Every input row comes out exactly once, in input order, with a status:
    labelled, duplicate, junk, error (or seen, with --store). Exit 0 when the
    run completed, even if some rows are errors (4 with --fail-on-row-errors);
    1 when the run failed; 2 on usage errors; 3 when the store is locked.
    """
    from pipeline.stages.ingest import IngestError
    from pipeline.runners.local import RunConfig, log_to_file, run as run_pipeline, write_summary_json
    from pipeline.stages.junk import CatalogueError
    from pipeline.ops.store import Store, StoreError, StoreLocked

    if (relabel or skip_seen) and store is None:
        raise click.UsageError("--relabel and --skip-seen need --store")
    if out.suffix.lower() != ".parquet":
        raise click.UsageError(f"--out {out} must end in .parquet (labelcat writes Parquet; `labelcat export` "
                               "makes CSV or xlsx from it)")
    if out.exists() and input_path.exists() and out.resolve() == input_path.resolve():
        raise click.UsageError(f"--out {out} is the input itself; refusing to replace it")
    for what, path in (("--summary-json", summary_json), ("--out", out)):
        if path is not None:
            _check_writable(what, path)
    if ray_address and runner != "ray":
        raise click.UsageError("--ray-address needs --runner ray")
    if runner == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise click.UsageError("--runner ray needs Ray Data: pip install 'labelcat[ray]'") from None
    if log_file is not None:
        try:
            log = log_to_file(log_file)
        except OSError as exc:
            raise click.UsageError(f"cannot write --log-file {log_file}: {exc.strerror or exc}") from None
    else:
        log = RunConfig().log
    if not quiet:
        log = _warning_echo(log)

    cfg = RunConfig(
        batch_size=batch_size, top_k=top_k, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes,
        workers=limits.workers, dedupe=dedupe, junk=junk,
        quiet=quiet, corrections=corrections, review_threshold=review_threshold, store=store,
        chunk_size=chunk_size, relabel=relabel, skip_seen=skip_seen, allow_outside=allow_outside, log=log,
        embeddings=embeddings, catalogue=catalogue,
    )
    if store is not None:  # refuse a foreign or locked store before spending seconds on the model
        try:
            Store(store).check(cluster=runner == "ray")
        except StoreError as exc:
            raise click.UsageError(str(exc)) from None
        except StoreLocked as exc:
            _locked(exc, log)
    try:
        if runner == "ray":
            from pipeline.runners.ray import run_ray

            _check_model(model, taxonomy)  # the model itself loads on the cluster's classifier actors
            summary = run_ray(input_path, out, model, str(taxonomy) if taxonomy else None, precision, cfg,
                              ray_address)
        else:
            expected = _expected_preprocess(model)
            # TensorFlow imports and the model loads in a thread while the first chunk is scanned
            with ThreadPoolExecutor(1, thread_name_prefix="model") as loader:
                summary = run_pipeline(input_path, out, loader.submit(_load_classifier, model, taxonomy, precision),
                                       cfg, preprocess=expected)
    except click.UsageError:
        raise
    except (IngestError, StoreError, CatalogueError) as exc:
        raise click.UsageError(str(exc)) from None
    except StoreLocked as exc:
        _locked(exc, log)
    except Exception as exc:  # noqa: BLE001 - cron needs one line and a non-zero status, not a traceback
        if os.environ.get("LABELCAT_DEBUG"):
            raise
        log({"stage": "failed", "error": f"{type(exc).__name__}: {exc}"})
        click.echo(f"labelcat: run failed: {type(exc).__name__}: {exc} (previous output left in place; "
                   "LABELCAT_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)
    if summary_json:
        try:
            write_summary_json(summary, summary_json)
        except OSError as exc:
            click.echo(f"labelcat: run completed but --summary-json {summary_json} could not be written: "
                       f"{exc.strerror or exc}", err=True)
            sys.exit(1)
    if not quiet:
        click.echo(summary.render())
    if fail_on_row_errors and summary.by_status.get("error"):
        sys.exit(4)


def _warning_echo(log: Callable[[dict], None]) -> Callable[[dict], None]:
    """``log`` that also tells the terminal when a folder's name was found to be no category hint (the run's
    one decision a person should hear of at once: every photo in that folder lost its hint)."""
    def echo(event: dict) -> None:
        log(event)
        if event.get("stage") == "hints":
            click.echo(f"labelcat: warning: {event['message']}", err=True)

    return echo


def _store_location(value: str | None) -> Path | str | None:
    """A folder as a ``Path``; a filesystem URI (``s3://``, ``gs://``, ``hdfs://``) as given, for ``pyarrow.fs``."""
    if value is None or ("://" in value and not value.startswith("file://")):
        return value
    path = Path(value.removeprefix("file://"))
    if path.is_file():
        raise click.BadParameter(f"{value} is a file, not a folder", param_hint="--store")
    return path


def _locked(exc: Exception, log: Callable[[dict], None]) -> None:
    """Another run holds the store: one line, one log event, exit 3 (cron's next night will try again)."""
    log({"stage": "locked", "message": str(exc)})
    click.echo(f"labelcat: {exc}; not starting a second run", err=True)
    sys.exit(3)


def _check_writable(what: str, path: Path) -> None:
    """Create the parent folder of an output labelcat owns, and refuse (exit 2) one it cannot write,
    before any work is done."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.UsageError(f"cannot create the folder of {what} {path}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise click.UsageError(f"{what} {path} is a folder")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise click.UsageError(f"cannot write {what} {path}: permission denied")


@contextlib.contextmanager
def _model_errors_are_usage_errors() -> Iterator[None]:
    """A model that cannot be found or read is the user's to fix: exit 2 with its message."""
    from pipeline.models.card import CardError
    from pipeline.models.taxonomy import TaxonomyError

    try:
        yield
    except KeyError as exc:
        raise click.UsageError(exc.args[0]) from None
    except (TaxonomyError, CardError, RuntimeError) as exc:
        raise click.UsageError(str(exc)) from None


def _load_classifier(model: str, taxonomy: Path | None, precision: str):
    """Load a model or turn its failure into a usage error (exit 2)."""
    from pipeline.models.classifier import load_classifier

    with _model_errors_are_usage_errors():
        return load_classifier(model, taxonomy, precision)


def _check_model(model: str, taxonomy: Path | None) -> None:
    """What can be checked of a model without TensorFlow (its name or folder and card, the taxonomy), as
    usage errors; a model file that then fails to load on the cluster fails the run."""
    from pipeline.models.taxonomy import load_taxonomy

    _expected_preprocess(model)
    if taxonomy is not None:
        with _model_errors_are_usage_errors():
            load_taxonomy(taxonomy)


def _expected_preprocess(model: str):
    """The model input the loading model should take, or a usage error for a model that cannot load."""
    from pipeline.models.classifier import expected_preprocess

    with _model_errors_are_usage_errors():
        return expected_preprocess(model)


def _echo(quiet: bool) -> Callable[[str], None]:
    return (lambda _msg: None) if quiet else (lambda msg: click.echo(msg, err=True))


@cli.command()
@click.argument("data", metavar="DATA...", nargs=-1, required=True)
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model folder to write (model.keras + card.json), e.g. models/my-shop.")
@click.option("--arch", default=None, help="Fashion-MNIST architecture (`labelcat models list`); default fmnist_best.")
@click.option("--backbone", type=click.Choice(BACKBONES.list()), default="efficientnet_lite0",
              show_default=True, help="Pretrained backbone for shop photos.")
@click.option("--method", type=click.Choice(["auto", "centroid", "logreg", "finetune"]), default="auto", show_default=True,
              help="Shop photos: auto picks centroid or logreg (few-shot on frozen embeddings) by cross-validation, "
                   "and the weight of the taxonomy prior where class names are taxonomy categories; "
                   "finetune trains the top of the backbone.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Epochs (phase 1); default per architecture, 12 for shop photos.")
@click.option("--fine-tune-epochs", type=click.IntRange(0), default=6, show_default=True,
              help="Shop photos: epochs of phase 2 (top blocks unfrozen, learning rate / 10).")
@click.option("--fine-tune-blocks", type=click.IntRange(0, 16), default=3, show_default=True,
              help="Shop photos: how many top MBConv blocks phase 2 trains.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Batch size (default per architecture; 16 for photos).")
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True), default=None, help="Phase-1 learning rate.")
@click.option("--val-split", type=click.FloatRange(0.05, 0.5), default=0.2, show_default=True,
              help="Share of each class held out for validation and calibration.")
@click.option("--seed", type=int, default=42, show_default=True, help="Random seed (split, shuffling, initialisation).")
@click.option("--target-precision", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Precision the recommended review threshold in the card must reach on validation.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Fashion-MNIST: continue training this model folder (same --arch and --seed, so the same split).")
@click.option("--force", is_flag=True, help="Replace an existing model folder at --out (atomically, once training succeeded).")
@quiet_option
def train(data: tuple[str, ...], out: Path, arch: str | None, backbone: str, method: str, epochs: int | None, fine_tune_epochs: int,
          fine_tune_blocks: int, batch_size: int | None, learning_rate: float | None, val_split: float, seed: int,
          target_precision: float, init_from: Path | None, force: bool, quiet: bool) -> None:
    """Train a model into --out from one or more DATA: folders of class subfolders, manifests with a label
    column, review corrections stores (the photos people labelled; their junk verdicts and corrected
    labels also override the folders' and manifests' labels), or `fashion-mnist` (with --arch) for the
    studies' models.

    Photos go through the same ingest, decode and dedupe as `labelcat run`; broken files are reported
    and skipped, near duplicates never straddle the train/validation split. The model is calibrated
    (temperature scaling) on the validation split and saved with its model card.
    """
    from pipeline.learning.archs import ARCHS
    from pipeline.learning.fashion_mnist import DatasetMissing
    from pipeline.ops.device import has_gpu
    from pipeline.stages.ingest import IngestError
    from pipeline.learning.fashion_mnist import train_fashion_mnist
    from pipeline.learning.recipe import TrainConfig
    from pipeline.learning.train import train_images

    from pipeline.models.card import CardError, check_model_destination

    if "fashion-mnist" in data and len(data) > 1:
        raise click.UsageError("`fashion-mnist` trains alone; give it as the only DATA")
    try:  # before hours of training, not after
        for source in data:
            check_model_destination(out, force, protect=Path(source) if source != "fashion-mnist" else None)
    except CardError as exc:
        raise click.UsageError(str(exc)) from None
    has_gpu()  # imports TensorFlow with its start-up log muted

    cfg = TrainConfig(force=force, method=method, epochs=epochs, fine_tune_epochs=fine_tune_epochs, fine_tune_blocks=fine_tune_blocks,
                      batch_size=batch_size, learning_rate=learning_rate, val_split=val_split, seed=seed,
                      backbone=backbone, target_precision=target_precision, init_from=init_from, quiet=quiet,
                      log=_echo(quiet))
    try:
        if data == ("fashion-mnist",):
            name = arch or "fmnist_best"
            if name not in ARCHS:
                raise click.UsageError(f"unknown architecture {name!r} (known: {', '.join(ARCHS.list())})")
            train_fashion_mnist(name, out, cfg)
        else:
            if arch or init_from:
                raise click.UsageError("--arch and --init-from apply to `labelcat train fashion-mnist`")
            for source in data:
                if not Path(source).exists():
                    raise click.UsageError(f"DATA {source!r} does not exist (a folder, a manifest, a corrections "
                                           "store or `fashion-mnist`)")
            train_images(list(data), out, cfg)
    except (IngestError, DatasetMissing) as exc:
        raise click.UsageError(str(exc)) from None
    except RuntimeError as exc:  # e.g. MobileNetV2 weights file missing
        raise click.UsageError(str(exc)) from None


@cli.command()
@click.argument("model", metavar="MODEL")
@click.argument("data", metavar="DATA")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (report.md, report.json, confusion.png, reliability.png); default reports/<model>.")
@click.option("--target-precision", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Recommend the lowest confidence threshold whose accepted rows reach this precision.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Images per model call.")
@catalogue_option("", "labelled with (DATA's folders or label column)")
@quiet_option
def evaluate(model: str, data: str, report_dir: Path | None, target_precision: float, batch_size: int, catalogue: str,
             quiet: bool) -> None:
    """Measure MODEL (registered name or model folder) on DATA (labelled folder/manifest, or `fashion-mnist`
    for its official test set): accuracy, per-class precision/recall/F1, ECE, confusion matrix,
    reliability diagram and the coverage table, written as Markdown + PNG + JSON.

    Labels are read as `labelcat run` gives them: among the categories of --catalogue, and for the default
    model with each photo's most alike others voting, as a run labels photos without a folder.
    """
    from pipeline.models.card import CardError
    from pipeline.learning.evaluate import evaluate_model, summary_line, write_report
    from pipeline.learning.fashion_mnist import DatasetMissing
    from pipeline.models.classifier import resolve_model
    from pipeline.ops.device import has_gpu
    from pipeline.stages.ingest import IngestError
    from pipeline.stages.junk import CatalogueError

    has_gpu()  # imports TensorFlow with its start-up log muted

    try:
        resolve_model(model)
    except KeyError as exc:
        raise click.UsageError(exc.args[0]) from None
    if data != "fashion-mnist" and not Path(data).exists():
        raise click.UsageError(f"DATA {data!r} does not exist (a labelled folder, a manifest or `fashion-mnist`)")
    try:
        metrics = evaluate_model(model, data, target_precision, batch_size, quiet, catalogue)
    except (IngestError, DatasetMissing, CardError, CatalogueError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    folder = report_dir or Path("reports") / Path(model).name
    overlap = metrics.get("training_overlap")
    title = f"labelcat evaluate {model} on {data}"
    if overlap and not overlap["is_test_score"]:
        title += f" (NOT a test score: {overlap['share']:.0%} of these photos were trained on)"
    write_report(metrics, folder, title)
    if overlap and overlap["photos"]:
        click.echo(f"labelcat: warning: {overlap['photos']} of the evaluated photos ({overlap['share']:.0%}) were in "
                   "the model's training data" + ("; this is not a test score" if not overlap["is_test_score"] else ""),
                   err=True)
    if not quiet:
        rt = metrics["recommended_threshold"]
        click.echo(f"{model} on {data}: {summary_line(metrics)}")
        if metrics.get("catalogue"):
            click.echo(f"  catalogue: {', '.join(metrics['catalogue'])} (labels name only these; --catalogue all: any)")
        if metrics.get("photo_alone_accuracy") is not None:
            click.echo(f"  each photo voted on by its {metrics['neighbours']} most alike others, as a run labels photos "
                       f"without a folder; the photo alone: accuracy {metrics['photo_alone_accuracy']:.4f}")
        click.echo(f"  review threshold for precision {target_precision}: "
                   + (f"{rt} (rows below it need a person)" if rt is not None else "not reachable"))
        if metrics["skipped"]:
            click.echo(f"  skipped {len(metrics['skipped'])} photos (see report.json)")
        click.echo(f"  report: {folder / 'report.md'}")


@cli.group()
def review() -> None:
    """Send uncertain rows to people in a spreadsheet and take their corrections back."""


@review.command("export")
@click.argument("run_file", metavar="RUN.parquet", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path("review.xlsx"), show_default=True,
              help="Workbook to write (.xlsx, with thumbnails and drop-downs) or .csv for Google Sheets-like tools.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Confidence below which a labelled row needs a look (default: the run's review threshold).")
def review_export(run_file: Path, out: Path, threshold: float | None) -> None:
    """Write the rows of RUN.parquet that need a person: low confidence, junk, hint mismatches.

    Least confident first; an empty corrected_label column (a drop-down of valid labels plus
    junk and duplicate) and a note column for the reviewer.
    """
    from pipeline.review.sheet import ReviewError, export

    if out.suffix.lower() not in (".xlsx", ".csv"):
        raise click.UsageError("--out must end in .xlsx or .csv")
    try:
        path, n = export(run_file, out, threshold)
    except ReviewError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"{n} rows to review written to {path}")


@review.command("import")
@click.argument("review_file", metavar="REVIEW", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--run", "run_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The run's Parquet file (default: recorded in the workbook; required for CSV).")
@click.option("--corrections", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_CORRECTIONS,
              show_default=True, help="Append-only corrections store (Parquet parts) to add to.")
@click.option("--reviewer", default=None, help="Who reviewed (default: $LABELCAT_REVIEWER or $USER).")
def review_import(review_file: Path, run_file: Path | None, corrections: Path, reviewer: str | None) -> None:
    """Validate a filled REVIEW sheet (.xlsx or .csv) and store its corrections.

    Every row is checked (known row, key columns unedited, valid label); if any row is wrong the
    whole file is refused with one line per problem (exit 2) and nothing is stored.
    """
    from pipeline.review.sheet import ReviewError, import_review, reviewer_name

    try:
        n, part = import_review(review_file, run_file, corrections, reviewer or reviewer_name())
    except ReviewError as exc:
        click.echo("\n".join(f"labelcat: {p}" for p in exc.problems), err=True)
        sys.exit(2)
    if n:
        click.echo(f"{n} corrections stored in {part}")
    else:
        click.echo("no corrections in the sheet (corrected_label is empty everywhere)")


@cli.command("export")
@click.argument("run_file", metavar="RUN.parquet", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--to", "fmt", type=click.Choice(["csv", "xlsx"]), required=True, help="Spreadsheet format to write.")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write (default: RUN with the new extension).")
def export_cmd(run_file: Path, fmt: str, out: Path | None) -> None:
    """Write every row of RUN.parquet as a flat CSV or xlsx: one row per photo, list columns joined
    with ` | `, numbers as written, formula starters neutralised (pandas reads the CSV back as is)."""
    from pipeline.review.sheet import ReviewError, export_table

    out = out or run_file.with_suffix(f".{fmt}")
    if out.suffix.lower() != f".{fmt}":
        raise click.UsageError(f"--out must end in .{fmt}")
    try:
        path, n = export_table(run_file, out)
    except ReviewError as exc:
        raise click.UsageError("; ".join(exc.problems)) from None
    click.echo(f"{n} rows written to {path}")


@cli.group()
def models() -> None:
    """Inspect the model and backbone registries."""


@models.command("list")
def models_list() -> None:
    """List registered models, backbones, trainable architectures and model folders under ./models."""
    from pipeline.learning.archs import ARCHS
    from pipeline.models.backbones import BACKBONES
    from pipeline.models.card import CardError, read_card
    from pipeline.models.classifier import MODELS

    click.echo("models (labelcat run --model NAME):")
    for name in MODELS.list():
        click.echo(f"  {name:20s} {MODELS.describe(name)}")
    click.echo("backbones (labelcat train --backbone NAME):")
    for name in BACKBONES.list():
        click.echo(f"  {name:20s} {BACKBONES.describe(name)}")
    click.echo("architectures (labelcat train fashion-mnist --arch NAME):")
    for name in ARCHS.list():
        click.echo(f"  {name:20s} {ARCHS.describe(name)}")
    folders = sorted(p for p in Path("models").glob("*/card.json")) if Path("models").is_dir() else []
    if folders:
        click.echo("model folders (labelcat run --model NAME):")
        for card_file in folders:
            try:
                card = read_card(card_file.parent)
                test = card.metrics.get("test") or card.metrics.get("validation") or {}
                acc = f", accuracy {test['accuracy']:.3f}" if "accuracy" in test else ""
                click.echo(f"  {card_file.parent.name:20s} {card.arch}, {len(card.classes)} classes{acc}")
            except CardError as exc:
                click.echo(f"  {card_file.parent.name:20s} unusable: {exc}")


def main() -> None:  # console-script entry point
    """``labelcat``: the click group, then a quick exit.

    Why ``os._exit``: once a command has returned, its files are written
    (atomically) and its log lines flushed, yet the interpreter's teardown of
    TensorFlow, the model engine and the photos' arrays took 1.3 s of a 20 s
    run of 1,000 photos, deciding nothing. The scan's worker processes are
    stopped first. Under Ray the normal exit stays (Ray's own exit handler
    stops the local cluster it started), and in-process callers (tests'
    ``CliRunner``) call ``cli``, not this.
    """
    try:
        cli()
    except SystemExit as done:
        code = done.code
    else:  # pragma: no cover - click's standalone mode always ends in SystemExit
        code = 0
    if "ray" in sys.modules or not isinstance(code, int | None):
        sys.exit(code)
    from pipeline.stages.scan import stop_workers

    stop_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
