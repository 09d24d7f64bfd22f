"""Options several commands share, each defined once (typer reads the help from the type).

A command declares `device: Device = "cpu"`; the default stays beside the parameter, the
option's name and help live here."""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

DATASET_HELP = ("text for the CE suite: a Hugging Face dataset id (streamed), a .txt (paragraphs), .jsonl, "
                ".json, .parquet or .csv file, or a datasets.save_to_disk folder; a column of token ids "
                "(input_ids/tokens) is used as is. Default: the built-in prose for the embedded model, else "
                "the first SAE's own dataset_path")
MASSIVE_FACTOR_HELP = ("a position is a massive activation at a hook when its clean norm exceeds this x the "
                       "median over T")
EXCLUDE_MASSIVE_HELP = ("treat massive activations like position 0 in the CE suite: not spliced, not in T "
                        "(default: spliced and counted, and reported apart)")

Model = Annotated[str, typer.Option(help="smollm2-135m, a local HF folder, a HF id, or tl:NAME")]
Device = Annotated[str, typer.Option(help="cpu, cuda or cuda:N")]
Dtype = Annotated[str, typer.Option(help="the model's dtype: float32, bfloat16 or float16")]
SaeDtype = Annotated[str, typer.Option(help="dtype of the SAE weights (activations are cast in and out)")]
BatchSize = Annotated[int, typer.Option(help="sequences per forward")]
Seed = Annotated[int, typer.Option(help="seed of every random choice (bootstrap, noise baselines)")]
LogitsBudget = Annotated[Optional[int], typer.Option(
    help="MiB of memory for logits at a time (log-softmax, KL, top-3 are computed in chunks within it; "
         "default 256 on CPU, 2048 on CUDA)")]
DeviceMap = Annotated[Optional[str], typer.Option(
    help="'auto': shard the model over all visible GPUs (transformers/accelerate); overrides --device")]
Dataset = Annotated[Optional[str], typer.Option(help=DATASET_HELP)]
DatasetConfig = Annotated[Optional[str], typer.Option(help="the dataset's configuration (Hugging Face name)")]
DatasetSplit = Annotated[str, typer.Option(help="split to read")]
TextColumn = Annotated[Optional[str], typer.Option(help="column to read (default: text, else input_ids/tokens)")]
MassiveFactor = Annotated[float, typer.Option(help=MASSIVE_FACTOR_HELP)]
ExcludeMassive = Annotated[bool, typer.Option("--exclude-massive", help=EXCLUDE_MASSIVE_HELP)]
Resume = Annotated[bool, typer.Option("--resume", help="continue an interrupted run into the same folder (same "
                                                       "configuration only); saved work is not recomputed")]
TrainTokens = Annotated[Optional[str], typer.Option(
    help="the model's pre-training tokens D, for the fixed-tokens reading N_eff/N (default: the known-models "
         "table; unknown otherwise)")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace --out if it exists (only once the new run "
                                                          "is complete); without it an existing folder is refused")]
AllowModelMismatch = Annotated[bool, typer.Option(
    "--allow-model-mismatch", help="accept SAEs whose model_name names another model (one warning line); "
                                   "hooks and widths are still checked")]
Params = Annotated[Optional[str], typer.Option(
    help="the model's parameters N (default: counted on the loaded model, embeddings included)")]
