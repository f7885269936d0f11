"""BERT / RoBERTa pretraining with DeepSpeed, configured by Hydra.

    deepspeed --num_gpus 8 launch/pretrain.py experiment=bert-base-wiki-books data.dir=/data/wiki_books_128
    deepspeed --num_gpus 8 launch/pretrain.py model=bert-base data.dir=DIR deepspeed=zero2 optim=lamb trainer=phase1
    torchrun --nproc_per_node 8 launch/pretrain.py ...      srun python launch/pretrain.py ...   (one task per GPU)
    python launch/pretrain.py                                 (the tiny CPU smoke run: needs data/out from prepare_data)

Config groups (conf/): model, data, optim, scheduler, deepspeed, trainer, logger, experiment; fields documented
in pretrain/training/config.py. The run dir is ``runs/<name>[,<overrides>]`` (or ``run_dir=...``), the same on
every rank, so a requeued job with the same command resumes (``resume=auto``, the default).

Each failure is one ``error:`` line on stderr, no traceback, and a documented exit code (0 done, 2 a mistake found
before any work, 75 preempted: requeue; the table is in docs/architecture.md, the codes in pretrain/runtime/exits.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# This file is named pretrain.py: its own folder on sys.path would shadow the ``pretrain`` package.
ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = ROOT
elif ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pretrain.runtime.signals import catch_preempt_signals  # noqa: E402  (no torch import: it is lazy there)

catch_preempt_signals()  # first: a SLURM signal while torch imports must not kill the job (nor lose exit 75)

from pretrain import cli  # noqa: E402

cli.strip_local_rank_arg()  # before Hydra parses argv: the DeepSpeed launcher appends --local_rank=N

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from data_prep.errors import UserError  # noqa: E402
from pretrain.training.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path=str(Path(ROOT) / "conf"), config_name="config")
def main(cfg: DictConfig) -> None:
    cli.run_entry(lambda: _train(cfg), lambda: cli.resume_hint(Path(cfg.run_dir).resolve()))


def _train(cfg: DictConfig) -> int:
    overrides = HydraConfig.get().overrides.task
    if HydraConfig.get().runtime.choices.get("trainer") == "smoke" and any(
        o.startswith("trainer.phase=") for o in overrides
    ):
        # trainer.phase only labels a recipe; without this a "phase 1" run would quietly be the 40-step smoke run
        raise UserError(
            "trainer.phase alone keeps the 40-step smoke recipe: choose the phase recipe with "
            "trainer=phase1 or trainer=phase2 (batch, steps, precision, sequence length)"
        )
    try:
        cfg_dict = OmegaConf.to_container(cfg, resolve=True)
        config = OmegaConf.to_object(cfg)  # typed: pretrain.training.config.Config, model a BertConfig
    except ValueError as e:  # a dataclass's own check (heads must divide hidden_size, masking rates)
        raise UserError(str(e)) from None
    except OmegaConfBaseException as e:  # e.g. an interpolation to a key that does not exist
        raise UserError(f"{getattr(e, 'full_key', None) or 'config'}: {str(e).splitlines()[0]}") from None
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg_dict, run_dir / "config.yaml")
        (run_dir / "overrides.txt").write_text("\n".join(overrides) + "\n")
    from pretrain.training.trainer import train

    return train(config)


def run() -> None:
    """The console script ``bert-pretrain`` (pyproject.toml) and ``python launch/pretrain.py``."""
    # before Hydra's own report
    problem = cli.check_overrides(Path(ROOT) / "conf", "config", "pretrain/training/config.py")
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()


if __name__ == "__main__":
    run()
