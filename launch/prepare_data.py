"""Data preparation: corpora -> sentences -> WordPiece vocabulary -> token ids -> training shards.

    python launch/prepare_data.py inputs=[PATH,...] output_dir=OUT vocab_size=N max_seq_length=L
        nsp=true seed=S num_workers=W strict=false [stage=read|vocab|tokenize|shards|merge]

Every option is documented in data_prep/config.py. User mistakes (an unknown option, with the close match; a bad
value; unreadable inputs) end with one ``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from data_prep.config import PrepareConfig  # noqa: E402
from data_prep.pipeline import prepare  # noqa: E402
from pretrain.cli import check_overrides, help_text, run_entry  # noqa: E402  (light: no torch)

ConfigStore.instance().store(name="prepare_data_schema", node=PrepareConfig)


@hydra.main(version_base="1.3", config_path=str(Path(ROOT) / "conf"), config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    logging.getLogger("data_prep").setLevel(logging.INFO)

    def run() -> int:
        prepare(OmegaConf.to_object(cfg))
        return 0

    run_entry(run, lambda: "completed parts and shards are kept; rerun the same command to finish")


def run() -> None:
    """The console script ``bert-prepare-data`` (pyproject.toml) and ``python launch/prepare_data.py``."""
    if any(a in ("--help", "-h") for a in sys.argv[1:]):  # the data-prep options, not Hydra's list of conf/ groups
        print(help_text(__doc__, PrepareConfig), end="")
        sys.exit(0)
    problem = check_overrides(ROOT / "conf", "prepare_data", "data_prep/config.py")  # before Hydra's own report
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()


if __name__ == "__main__":
    run()
