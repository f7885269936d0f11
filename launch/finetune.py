"""Fine-tune a pretrained encoder: sentence(-pair) classification and regression, NER, extractive QA.

    python launch/finetune.py pretrained=runs/my-run finetune=classification task.train=train.csv \\
        task.validation=dev.csv task.text_column=text task.label_column=label
    python launch/finetune.py pretrained=/models/bert-base-uncased finetune=sst2          (GLUE from the hub)
    deepspeed --num_gpus 8 launch/finetune.py pretrained=runs/bert-base finetune=squad trainer.precision=bf16 \\
        trainer.max_seq_length=384 trainer.micro_batch_size=32 trainer.global_batch_size=256
    python launch/finetune.py mode=predict run_dir=runs/finetune-sst2 predict_file=test.csv

pretrained=: a pretraining run dir (its newest complete checkpoint), a checkpoint or a Hugging Face BERT or
ModernBERT directory.
Groups (conf/): finetune (classification, regression, ner, qa; presets sst2, mrpc, stsb, squad), optim,
scheduler, deepspeed, logger; fields documented in pretrain/finetune/config.py. After each epoch the validation
metric is logged; the best model is kept in RUN_DIR/best (a Hugging Face directory), results in
RUN_DIR/results.json and a row of results.md beside the run dir. resume=auto continues a stopped run.
Each failure is one ``error:`` line, no traceback, and an exit code from the table in docs/architecture.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = ROOT  # this folder's pretrain.py would shadow the package
elif ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pretrain.runtime.signals import catch_preempt_signals  # noqa: E402  (no torch import: it is lazy there)

catch_preempt_signals()  # first: a SLURM signal while torch imports must not kill the job (nor lose exit 75)

from pretrain import cli  # noqa: E402

cli.strip_local_rank_arg()  # the DeepSpeed launcher appends --local_rank=N

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from data_prep.errors import UserError  # noqa: E402
from pretrain.finetune.config import register  # noqa: E402

register()


@hydra.main(version_base="1.3", config_path=str(Path(ROOT) / "conf"), config_name="finetune")
def main(cfg: DictConfig) -> None:
    cli.run_entry(lambda: _run(cfg), lambda: cli.resume_hint(Path(cfg.run_dir).resolve()))


def _run(cfg: DictConfig) -> int:
    try:
        config = OmegaConf.to_object(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    except OmegaConfBaseException as e:  # e.g. pretrained=??? not given
        key = getattr(e, "full_key", None) or "config"
        raise UserError(f"{key}: {str(e).splitlines()[0]} (e.g. pretrained=runs/my-run)") from None
    if int(os.environ.get("RANK", "0")) == 0 and config.mode == "train":  # predict reads the run's config
        Path(config.run_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, Path(config.run_dir) / "config.yaml")
    from pretrain.finetune.loop import finetune
    from pretrain.finetune.predict import predict

    return predict(config) if config.mode == "predict" else finetune(config)


def run() -> None:
    """The console script ``bert-finetune`` (pyproject.toml) and ``python launch/finetune.py``."""
    problem = cli.check_overrides(Path(ROOT) / "conf", "finetune", "pretrain/finetune/config.py")
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    main()


if __name__ == "__main__":
    run()
