"""Config composition: every preset and config-group choice composes and yields a valid DeepSpeed config."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_prep.errors import UserError
from pretrain.training.config import EngineConfig, _run_slug
from pretrain.training.ds_config import build_ds_config, gradient_accumulation_steps

CONF = Path(__file__).resolve().parents[2] / "conf"
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
    world = {"tiny-cpu": 2, "demo-cpu": 1, "modernbert-tiny-cpu": 1}.get(experiment, 8)  # CPU presets: 1 or 2 ranks
    t = cfg.trainer
    if t.micro_batch_size == "auto":  # probed on the device; the trainer checks the rest with 1 first
        t.micro_batch_size = 1
    ds = build_ds_config(EngineConfig.of(cfg), world)
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
    modern = OmegaConf.to_object(_compose("experiment=modernbert-base"))
    assert type(modern.model).__name__ == "ModernBertConfig" and modern.model.num_hidden_layers == 22
    assert modern.data.masking.mlm_probability == 0.3 and modern.data.pack and modern.data.pair_task == "auto"
    assert modern.scheduler.name == "wsd" and modern.trainer.max_seq_length == 1024 and modern.optim.lr == 8e-4
    extension = OmegaConf.to_object(_compose("experiment=modernbert-base-8k"))
    assert extension.trainer.max_seq_length == 8192 <= extension.model.max_position_embeddings
    assert extension.trainer.phase == 2 and 0 < extension.scheduler.decay_ratio < 1


@pytest.mark.parametrize("choice", DEEPSPEED)
def test_deepspeed_choices(choice):
    cfg = _compose(f"deepspeed={choice}")
    ds = build_ds_config(EngineConfig.of(cfg), 2)
    assert ds["zero_optimization"]["stage"] == int(choice[4])
    assert ("offload_optimizer" in ds["zero_optimization"]) == choice.endswith("offload")


def test_gradient_accumulation_derived_and_checked():
    cfg = _compose("trainer.global_batch_size=64", "trainer.micro_batch_size=4")
    assert gradient_accumulation_steps(cfg.trainer, 2) == 8
    assert build_ds_config(EngineConfig.of(cfg), 4)["gradient_accumulation_steps"] == 4
    with pytest.raises(UserError, match="global_batch_size=64 is not divisible"):
        gradient_accumulation_steps(cfg.trainer, 3)


def test_precision_and_clipping_single_source():
    cfg = _compose("trainer.precision=fp16", "optim.max_grad_norm=0.5")
    ds = build_ds_config(EngineConfig.of(cfg), 1)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5


def test_raw_json_wins_with_warning(tmp_path):
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"gradient_clipping": 2.0, "zero_optimization": {"stage": 2}, "new_key": 1}))
    cfg = _compose(f"deepspeed.config_file={raw}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_ds_config(EngineConfig.of(cfg), 1)
    assert ds["gradient_clipping"] == 2.0 and ds["zero_optimization"]["stage"] == 2 and ds["new_key"] == 1
    text = " ".join(str(w.message) for w in caught)
    assert "gradient_clipping=2.0" in text and "zero_optimization.stage=2" in text


def test_run_name_deterministic_and_safe():
    assert _run_slug("tiny-cpu", "") == "tiny-cpu"
    a = _run_slug("x", "data.dir=/data/wiki,model=bert-base")
    assert a == _run_slug("x", "data.dir=/data/wiki,model=bert-base") and "/" not in a
    long = _run_slug("x", "data.dir=/" + "a" * 200)
    assert len(long) < 100 and long != _run_slug("x", "data.dir=/" + "b" * 200)
    # readable: the overrides that change the result, without paths, "=" or commas
    assert a == "x-wiki-bert-base"
    betas = "optim.betas=[0.9,0.98],optim.lr=0.002,trainer.max_steps=20"
    assert _run_slug("tiny-cpu", betas) == "tiny-cpu-betas_0.9_0.98-lr0.002-max_steps20"


def test_hydra_run_dir_is_not_a_timestamp():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    hydra = OmegaConf.to_container(cfg.hydra, resolve=False)
    # Hydra's own dir is the working dir (it writes nothing: no .hydra, logs to stdout); the run dir is ours
    assert hydra["run"]["dir"] == "." and hydra["output_subdir"] is None
    assert "resume" in hydra["job"]["config"]["override_dirname"]["exclude_keys"]
    assert OmegaConf.to_container(cfg, resolve=False)["run_dir"] == "runs/${run_name}"


def test_optimizer_section_follows_the_same_precedence(tmp_path):
    """The optimizer section DeepSpeed builds from goes through build_ds_config like every other value: the raw
    JSON wins over optim.*, with a warning naming each contradiction."""
    ours = {"type": "Lamb", "params": {"lr": 0.006, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}}
    cfg = _compose("optim=lamb")
    assert build_ds_config(EngineConfig.of(cfg), 1, ours)["optimizer"] == ours
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"optimizer": {"type": "Lamb", "params": {"lr": 0.002}}}))
    cfg = _compose("optim=lamb", f"deepspeed.config_file={raw}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_ds_config(EngineConfig.of(cfg), 1, ours)
    assert ds["optimizer"]["params"]["lr"] == 0.002 and ds["optimizer"]["params"]["eps"] == 1e-6
    assert "optimizer.params.lr=0.002 (Hydra config: 0.006)" in " ".join(str(w.message) for w in caught)


def test_group_yamls_hold_only_what_differs_from_the_schema():
    """Each conf/<group>/<choice>.yaml keeps only the values that differ from the dataclass defaults (model: from
    BertConfig's, with vocab_size taken from the data): one source of truth per value."""
    from pretrain.finetune.config import FinetuneConfig
    from pretrain.models import FAMILIES
    from pretrain.training.config import Config

    schema = OmegaConf.structured(Config)
    finetune = OmegaConf.to_container(OmegaConf.structured(FinetuneConfig))

    def same(node: dict, base: dict, key: str) -> list[str]:
        out = []
        for k, v in node.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                out += same(v, base[k], f"{key}.{k}")
            elif k in base and base[k] == v:
                out.append(f"{key}.{k}={v!r}")
        return out

    def base(path: Path) -> dict:
        if path.parent.name == "finetune":  # the fine-tuning task group: `@package task`, or global presets
            return finetune if "@package _global_" in path.read_text() else finetune["task"]
        if "@package _global_" in path.read_text():  # objective/: several sections at once
            return OmegaConf.to_container(schema)
        if path.parent.name == "model":  # its family's schema, named in its defaults list
            family = OmegaConf.load(path).defaults[0].split("/")[2].split("@")[0]
            return OmegaConf.to_container(OmegaConf.structured(FAMILIES[family][0](vocab_size=None)))
        return OmegaConf.to_container(schema[path.parent.name])

    restated = [
        f"{path.relative_to(CONF)}: {x}"
        for path in sorted(CONF.glob("*/*.yaml"))
        if path.parent.name != "experiment"
        for x in same(
            {k: v for k, v in (OmegaConf.to_container(OmegaConf.load(path)) or {}).items() if k != "defaults"},
            base(path),
            path.parent.name,
        )  # fmt: skip
    ]
    assert not restated, restated


def test_prepare_data_help_lists_its_own_options_only():
    import subprocess
    import sys
    from dataclasses import fields

    from data_prep.config import PrepareConfig

    script = CONF.parent / "launch" / "prepare_data.py"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for f in fields(PrepareConfig):
        assert f"\n  {f.name}=" in r.stdout, f.name
    assert "output_dir=data/out" in r.stdout and "Hidden dropout" not in r.stdout
    assert "Config groups" not in r.stdout and "trainer:" not in r.stdout and "deepspeed" not in r.stdout


def test_every_schema_field_has_a_docstring():
    from data_prep.config import PrepareConfig
    from pretrain.cli import field_docs
    from pretrain.finetune.config import FinetuneConfig, TaskConfig
    from pretrain.models.bert import BertConfig
    from pretrain.training import config as C
    from pretrain.training.masking import MaskingConfig

    schemas = [C.Config, C.DataConfig, C.OptimConfig, C.SchedulerConfig, C.DeepSpeedSection, C.TrainerConfig]
    schemas += [C.LoopConfig, FinetuneConfig, TaskConfig]
    schemas += [C.LoggerConfig, C.BenchConfig, PrepareConfig, MaskingConfig, BertConfig]
    from dataclasses import fields

    missing = [f"{s.__name__}.{f.name}" for s in schemas for f in fields(s) if f.name not in field_docs(s)]
    assert not missing, missing
    declared = [f.name for f in fields(C.TrainerConfig)]  # the loop's fields once, the pretraining loop's added
    assert declared[: len(fields(C.LoopConfig))] == [f.name for f in fields(C.LoopConfig)]
    assert not set(C.TrainerConfig.__annotations__) & {f.name for f in fields(C.LoopConfig)}
