"""BERT / RoBERTa pretraining with DeepSpeed, configured by Hydra.

    deepspeed --num_gpus 8 launch/pretrain.py experiment=bert-base-wiki-books data.dir=/data/wiki_books_128
    deepspeed --num_gpus 8 launch/pretrain.py model=bert-base data.dir=DIR deepspeed=zero2 optim=lamb trainer=phase1
    torchrun --nproc_per_node 8 launch/pretrain.py ...      srun python launch/pretrain.py ...   (one task per GPU)
    python launch/pretrain.py                                 (the tiny CPU smoke run: needs data/out from prepare_data)

Config groups (conf/): model, data, optim, scheduler, deepspeed, trainer, logger, experiment; fields documented
in pretrain/config.py. The run dir is ``runs/<name>[,<overrides>]`` (or ``run_dir=...``), the same on every rank,
so a requeued job with the same command resumes (``resume=auto``, the default).

Exit codes: 0 done; 2 configuration or data mistake (one line on stderr, before any work);
75 preempted (SIGUSR1/SIGTERM or trainer.max_time_minutes): a checkpoint was saved, requeue to continue.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# This file is named pretrain.py: its own folder on sys.path would shadow the ``pretrain`` package.
ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = ROOT
elif ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pretrain.distributed import strip_local_rank_arg  # noqa: E402

strip_local_rank_arg()  # before Hydra parses argv: the DeepSpeed launcher appends --local_rank=N

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pretrain.config import UserError, register_configs  # noqa: E402

register_configs()


def _one_line_warnings() -> None:
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings API
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    _one_line_warnings()
    try:
        overrides = HydraConfig.get().overrides.task
        if HydraConfig.get().runtime.choices.get("trainer") == "smoke" and any(
            o.startswith("trainer.phase=") for o in overrides
        ):
            # trainer.phase only labels a recipe; without this a "phase 1" run would quietly be the 40-step smoke run
            raise UserError("trainer.phase alone keeps the 40-step smoke recipe: choose the phase recipe with "
                            "trainer=phase1 or trainer=phase2 (batch, steps, precision, sequence length)")
        cfg_dict = OmegaConf.to_container(cfg, resolve=True)
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            run_dir = Path(cfg.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg_dict, run_dir / "config.yaml")
            (run_dir / "overrides.txt").write_text("\n".join(overrides) + "\n")
        from pretrain.trainer import train

        code = train(cfg, cfg_dict)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


if __name__ == "__main__":
    main()
