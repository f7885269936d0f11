"""``mode=predict``: label a file with the best model of a fine-tuning run (``RUN_DIR/best``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf

from data_prep.atomic import write_text
from data_prep.errors import UserError
from pretrain.checkpoint.hf import vocabulary
from pretrain.finetune import tasks as T
from pretrain.finetune.kinds import KINDS
from pretrain.finetune.loop import load_task_model
from pretrain.finetune.prepare import decode, encode, read_split


def _task_config(cfg: Any, run_dir: Path) -> Any:
    """The run's own task section and sequence length (its config.yaml), so predictions read the file as training
    read its data; without one, the command line's."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return cfg
    run = OmegaConf.load(saved)
    return SimpleNamespace(task=SimpleNamespace(**OmegaConf.to_container(run.task)),
                           trainer=SimpleNamespace(max_seq_length=int(run.trainer.max_seq_length)))  # fmt: skip


@torch.no_grad()
def predict(cfg: Any) -> int:
    run_dir = Path(cfg.run_dir)
    best = run_dir / "best"
    if not (best / "model.safetensors").is_file():
        raise UserError(f"{best}: no fine-tuned model; train first (mode=train) with run_dir={run_dir}")
    if not cfg.predict_file:
        raise UserError("predict_file is not set: give the file to label (same format as the training data)")
    model = load_task_model(best)
    found = vocabulary(best, "model")
    if found is None:
        raise UserError(f"{best}: no vocab.txt or tokenizer.json")
    vocab, tokenizer, _, _ = found
    tcfg = _task_config(cfg, run_dir)
    hf = json.loads((best / "config.json").read_text())
    names = [hf["id2label"][str(i)] for i in range(len(hf.get("id2label", {})))]
    labels = T.LabelMap(tuple(names)) if names and KINDS[hf["task_kind"]].classes else None  # else HF's LABEL_i
    src = SimpleNamespace(vocab=vocab, tokenizer=tokenizer)
    try:
        rows = read_split(tcfg, cfg.predict_file, None, labelled=False)
        feats = encode(tcfg, src, rows, None, cfg.predict_file, labelled=False)
    except T.TaskError as e:
        raise UserError(str(e)) from None
    kind, pad, logits = KINDS[tcfg.task.kind], T.Specials.from_vocab(vocab).pad, []
    batch = cfg.trainer.micro_batch_size
    for start in range(0, len(feats), batch):
        part = feats[start : start + batch]
        out = model(**{k: torch.from_numpy(v) for k, v in kind.collate(part, pad, with_labels=False).items()})
        logits.extend(out.logits.float().numpy()[i] for i in range(len(part)))
    preds = decode(tcfg, labels, rows, feats, logits)
    out_file = run_dir / "predictions.jsonl"
    write_text(out_file, "".join(json.dumps({"row": i, "prediction": p}) + "\n" for i, p in enumerate(preds)))
    print(f"{len(preds):,} predictions for {cfg.predict_file} -> {out_file}", flush=True)
    return 0
