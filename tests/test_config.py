"""Config composition: every preset and config-group choice composes and yields a valid DeepSpeed config."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pretrain.config import UserError, _run_slug, build_ds_config, gradient_accumulation_steps

CONF = Path(__file__).resolve().parent.parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DEEPSPEED = sorted(p.stem for p in (CONF / "deepspeed").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["run_name=test", *overrides])


def test_presets_exist():
    assert {"tiny-cpu", "bert-base-wiki-books", "bert-large", "roberta-base"} <= set(EXPERIMENTS)
    assert {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"} <= set(DEEPSPEED)


def test_default_is_tiny_cpu_run():
    cfg = _compose()
    assert cfg.model.hidden_size <= 256 and cfg.trainer.max_steps <= 100 and cfg.trainer.precision == "fp32"
    assert cfg.deepspeed.zero_optimization.stage == 0 and cfg.logger.wandb is False


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_to_valid_ds_config(experiment):
    cfg = _compose(f"experiment={experiment}")
    OmegaConf.to_object(cfg)  # every field validates against the dataclass schema
    assert cfg.name == experiment
    world = {"tiny-cpu": 2, "demo-cpu": 1}.get(experiment, 8)  # CPU presets run on one or two ranks
    ds = build_ds_config(cfg, world)
    t = cfg.trainer
    assert ds["train_batch_size"] == t.global_batch_size
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world == t.global_batch_size
    assert ds["gradient_clipping"] == cfg.optim.max_grad_norm
    assert ds["bf16"]["enabled"] == (t.precision == "bf16") and ds["fp16"]["enabled"] == (t.precision == "fp16")
    json.dumps(ds)  # plain JSON


def test_experiment_values():
    base = _compose("experiment=bert-base-wiki-books")
    assert base.optim.name == "lamb" and base.trainer.max_seq_length == 128 and base.scheduler.power == 0.5
    assert base.model.hidden_size == 768 and base.logger.wandb
    roberta = _compose("experiment=roberta-base")
    assert roberta.model.nsp is False and roberta.optim.betas == [0.9, 0.98] and roberta.trainer.max_seq_length == 512
    phase2 = _compose("experiment=bert-base-wiki-books", "trainer=phase2", "data=wiki-books-512")
    assert phase2.trainer.phase == 2 and phase2.trainer.max_seq_length == 512 and phase2.data.dir.endswith("512")


@pytest.mark.parametrize("choice", DEEPSPEED)
def test_deepspeed_choices(choice):
    cfg = _compose(f"deepspeed={choice}")
    ds = build_ds_config(cfg, 2)
    assert ds["zero_optimization"]["stage"] == int(choice[4])
    assert ("offload_optimizer" in ds["zero_optimization"]) == choice.endswith("offload")


def test_gradient_accumulation_derived_and_checked():
    cfg = _compose("trainer.global_batch_size=64", "trainer.micro_batch_size=4")
    assert gradient_accumulation_steps(cfg, 2) == 8
    assert build_ds_config(cfg, 4)["gradient_accumulation_steps"] == 4
    with pytest.raises(UserError, match="global_batch_size=64 is not divisible"):
        gradient_accumulation_steps(cfg, 3)


def test_precision_and_clipping_single_source():
    cfg = _compose("trainer.precision=fp16", "optim.max_grad_norm=0.5")
    ds = build_ds_config(cfg, 1)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5


def test_raw_json_wins_with_warning(tmp_path):
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"gradient_clipping": 2.0, "zero_optimization": {"stage": 2}, "new_key": 1}))
    cfg = _compose(f"deepspeed.config_file={raw}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_ds_config(cfg, 1)
    assert ds["gradient_clipping"] == 2.0 and ds["zero_optimization"]["stage"] == 2 and ds["new_key"] == 1
    text = " ".join(str(w.message) for w in caught)
    assert "gradient_clipping=2.0" in text and "zero_optimization.stage=2" in text


def test_run_name_deterministic_and_safe():
    assert _run_slug("tiny-cpu", "") == "tiny-cpu"
    a = _run_slug("x", "data.dir=/data/wiki,model=bert-base")
    assert a == _run_slug("x", "data.dir=/data/wiki,model=bert-base") and "/" not in a
    long = _run_slug("x", "data.dir=/" + "a" * 200)
    assert len(long) < 100 and long != _run_slug("x", "data.dir=/" + "b" * 200)


def test_hydra_run_dir_is_not_a_timestamp():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    hydra = OmegaConf.to_container(cfg.hydra, resolve=False)
    # Hydra's own dir is the working dir (it writes nothing: no .hydra, logs to stdout); the run dir is ours
    assert hydra["run"]["dir"] == "." and hydra["output_subdir"] is None
    assert "resume" in hydra["job"]["config"]["override_dirname"]["exclude_keys"]
    assert OmegaConf.to_container(cfg, resolve=False)["run_dir"] == "runs/${run_name}"
