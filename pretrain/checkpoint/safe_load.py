"""Nothing loaded from elsewhere runs code: every weights file given by path (``trainer.init_from``, fine-tuning's
``pretrained=``, evaluate, fill-mask, embed) is read with ``torch.load(weights_only=True)``, whose unpickler builds
tensors, containers and plain values only, plus ``ALLOWED``: the few data types a bundle of this trainer holds. A
file whose pickle needs anything else (a function it would call: ``os.system``, ``builtins.exec``, any class not
listed) is refused in one line naming the file (``UserError``, exit 2), before any of it runs.

``check_bundle`` loads every ``*.pt`` of a bundle this way (memory-mapped: the tensors are not read) before
DeepSpeed's own loader (``zero_to_fp32``, which unpickles with ``weights_only=False``) touches them, so that loader
only ever sees pickles made of allowed types. Resume of a run's own bundles keeps DeepSpeed's ``load_checkpoint``.

``ALLOWED`` is what real bundles need (ZeRO 0-3, fp32 and bf16, AdamW and LAMB, CPU offload, pretraining and
fine-tuning; ``torch.serialization.get_unsafe_globals_in_checkpoint`` lists them), data types only:

- numpy's array reconstruction (``_reconstruct``, ``ndarray``, ``dtype`` and the dtype classes of booleans and
  numbers, ``numpy.dtypes.UInt32DType`` and such; ``_reconstruct`` under both module names, numpy 1 and 2): the RNG
  states of the client state (``np.random.get_state()`` holds a uint32 array). They build an array from bytes.
- DeepSpeed's ``ZeroStageEnum`` (an ``int`` enum: the ZeRO stage in the optimizer states), ``fragment_address``
  (a dataclass of two ints: where a parameter lies in its flat partition), ``LossScaler`` (bf16, fp32) and
  ``DynamicLossScaler`` (fp16; a ``LossScaler`` of a few numbers and a torch dtype): the optimizer states of ZeRO
  1-3. Unpickling them makes the instance and sets its attributes; no method of theirs runs.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.errors import UserError

_ARRAY = np.zeros(0).__reduce__()[0]  # numpy's array reconstructor (numpy._core.multiarray._reconstruct in numpy 2)
# numpy's dtype classes (numpy.dtypes.UInt32DType, ...) of booleans and numbers: a dtype's pickle sets the state
# of one of these; object, string and void dtypes are not plain data and stay out.
_DTYPES = sorted({type(np.dtype(c)) for c in "?bhilqBHILQefdgFDG"}, key=lambda t: t.__name__)


def allowed(deepspeed: bool = True) -> list[Any]:
    """The allow-list (the module docstring says why each): numpy's array types, and DeepSpeed's (``deepspeed``;
    imported here, quietly) for its bundles."""
    names = [(_ARRAY, f"numpy.{core}.multiarray._reconstruct") for core in ("_core", "core")]
    out: list[Any] = [*names, np.ndarray, np.dtype, *_DTYPES]
    if deepspeed:
        from pretrain.runtime.deepspeed_env import import_deepspeed

        import_deepspeed()
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        out += [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]
    return out


def _refusal(path: Path, e: pickle.UnpicklingError) -> UserError:
    """The one line of a file whose pickle needs more than tensors and ``ALLOWED`` (torch's message: paragraphs of
    advice around the name of what it refused)."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        name = found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"  # torch drops "builtins."
        what = f"it would call or build {name}, which is not a weights type"
    else:  # not a global: an opcode the weights-only unpickler does not run, or a damaged pickle
        parts = [p.strip() for p in text.split("\n\n") if p.strip()]
        keep = [p for p in parts if not p.startswith(("Weights only load failed", "Check the documentation"))]
        what = (keep or parts or [type(e).__name__])[0].splitlines()[0][:200]
    return UserError(
        f"{path}: refused: {what}; only tensors and plain data are loaded from a file given by path (unpickling "
        "anything else could run code). Give a checkpoint written by this trainer or a Hugging Face directory"
    )


def load_file(path: str | Path, mmap: bool = False, deepspeed: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with the allow-list (``deepspeed``: DeepSpeed's types
    too), memory-mapped where ``mmap`` and the file is torch's zip format. A file that needs another type is one
    ``UserError`` naming it; a damaged file raises what torch raises (RuntimeError, EOFError, OSError)."""
    path = Path(path)
    mmap = mmap and zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be memory-mapped
    try:
        with torch.serialization.safe_globals(allowed(deepspeed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None


def check_bundle(tag: Path) -> None:
    """Load every ``*.pt`` of bundle ``tag`` as ``load_file`` does (memory-mapped: pickles, not tensor bytes), so
    that DeepSpeed's loader, which unpickles with ``weights_only=False``, sees only files of allowed types. One
    ``UserError`` line naming the first file refused or unreadable."""
    for path in sorted(tag.rglob("*.pt")):
        try:
            load_file(path, mmap=True)
        except (RuntimeError, OSError, EOFError, ValueError) as e:  # truncated or overwritten mid-copy
            why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
            raise UserError(f"{path}: unreadable ({why}); the checkpoint is damaged, give an older one") from None


def zero_stage(states: dict) -> int:
    """The ZeRO stage DeepSpeed records in a bundle's model states (its ``ds_config``); 0 where none is recorded."""
    config = states.get("ds_config") if isinstance(states, dict) else None
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return int(stage or 0)
