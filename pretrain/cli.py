"""Command line of the entry points: ``run_entry``, the one wrapper every launcher's main runs in (one line and
the documented exit code for whatever a user can meet, never a traceback for a user mistake, a signal or a full
disk), the DeepSpeed launcher's ``--local_rank`` argument, and Hydra overrides checked before Hydra runs, so a
typo is one ``error:`` line with the close match and exit code 2.

Exit codes: ``pretrain.runtime.exits`` (their table: docs/architecture.md).

Imports nothing heavy at module level: the entry points call it before torch is imported.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path

from data_prep.errors import DISK_ERRNOS, UserError, first_line
from pretrain.runtime import distributed as D
from pretrain.runtime import exits
from pretrain.runtime.signals import ignore_preempt_signals


def one_line_warnings() -> None:
    """Warnings as one ``warning:`` line on stderr, from rank 0 only (not Python's two-line format per rank)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings API
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show


def resume_hint(run_dir: Path) -> str:
    """Where a rerun of the same command would continue from: the tail of a lost-rank or interrupted line."""
    from pretrain.checkpoint.locate import resume_hint as hint  # torch: only once the run is under way

    return hint(run_dir)


def guard(main: Callable[[], int], where: Callable[[], str] | None = None) -> int:
    """Run an entry point's ``main`` and return its exit code, or the documented code after one ``error:`` line:
    2 for a ``UserError`` or a full/read-only disk, 69 for a lost rank (at once, ``where`` says what to rerun
    from), 130 for Ctrl-C. Anything else is a bug and keeps its traceback."""
    one_line_warnings()
    if where is not None:
        D.set_failure_hint(where)  # the heartbeat thread may report a lost rank before main returns
    try:
        code = main()
        ignore_preempt_signals()  # past its last save: a late signal must not replace the exit code
        return code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return exits.USER_ERROR
    except D.RendezvousError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exits.LOST_RANK)  # not sys.exit: a store client may still be connecting on a thread
    except KeyboardInterrupt:
        print(f"interrupted{f': {where()}' if where else ''}", file=sys.stderr, flush=True)
        return exits.INTERRUPTED
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"error: {e.filename or 'output'}: {e.strerror}; free space or fix the permissions (or point the "
              "output elsewhere), then rerun the same command", file=sys.stderr, flush=True)  # fmt: skip
        return exits.USER_ERROR
    except Exception as e:
        lost = D.explain_failure(e)  # None: not a communication failure but a bug, which keeps its traceback
        if lost is None:
            raise
        D.exit_lost_rank(lost)  # one line, exit 69 at once (no teardown of a broken group)
        raise


def run_entry(main: Callable[[], int], where: Callable[[], str] | None = None) -> None:
    """``guard`` and exit with its code: the body of every launcher's ``main``."""
    sys.exit(guard(main, where))


def strip_local_rank_arg(argv: list[str] | None = None) -> None:
    """Remove ``--local_rank=N`` / ``--local_rank N`` (added by the DeepSpeed launcher) from argv, setting
    LOCAL_RANK from it, so Hydra only sees its own overrides. Runs before ``@hydra.main`` parses argv."""
    argv = sys.argv if argv is None else argv
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            del argv[i]
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            del argv[i : i + 2]
        else:
            i += 1


def _close(word: str, options: list[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"did you mean {prefix}{match[0]}?" if match else f"choose from {', '.join(options)}"


def check_overrides(config_dir: Path, config_name: str, docs: str, argv: list[str] | None = None) -> str | None:
    """Compose the config as ``@hydra.main`` will, and describe the first bad override in one line (None: fine).

    Hydra reports these itself, but as several lines and exit code 1, before our ``main`` runs; composing first
    (Hydra's public compose API) lets the entry point print one ``error:`` line and exit 2. Also rejects keys added
    with ``+``/``++`` that the schema does not know (Hydra accepts them and the run would ignore them); free-form
    sections (plain dicts such as ``deepspeed.extra``) take any key. Hydra's own flags (--help, --cfg, -m) are
    left to Hydra."""
    overrides = (sys.argv if argv is None else argv)[1:]
    if any(a.startswith("-") for a in overrides):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    parser, parsed = OverridesParser.create(), []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except OverrideParseException as e:
            return (
                f"{text}: not an override Hydra can parse ({first_line(e.message)}); write key=value, "
                f"+key=value (new key) or group=option"
            )
    if any(o.is_sweep_override() for o in parsed):
        return None  # a --multirun sweep: Hydra checks each job itself
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            cfg = compose(config_name=config_name, overrides=overrides)
        except MissingConfigException as e:
            group, _, name = (e.missing_cfg_file or "").rpartition("/")
            if not e.options:
                return first_line(e)
            return f"{group}={name}: no such {group} config; {_close(name, sorted(e.options))} (conf/{group}/*.yaml)"
        except (HydraException, OmegaConfBaseException) as e:
            cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
            key = getattr(cause, "full_key", None)
            parent = getattr(cause, "parent_node", None)
            if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key and isinstance(parent, DictConfig):
                head = key.rpartition(".")[0]
                hint = _close(str(cause.key), [str(k) for k in parent.keys()], head + "." if head else "")
                return f"{key}: no such option; {hint} (documented in {docs})"
            if key and getattr(cause, "msg", None):
                return f"{key}: {first_line(cause.msg)}"
            return "; ".join(s.strip() for s in str(e).splitlines() if s.strip())
    for o in parsed:  # keys added with + / ++ must exist in the schema, unless their section is a free-form dict
        key = o.key_or_group
        if not (o.is_add() or o.is_force_add()) or o.package is not None or key.startswith("hydra"):
            continue
        if (config_dir / key.replace(".", "/")).is_dir():
            continue  # a config group (+experiment=...)
        head, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, head) if head else cfg
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if schema is not None and is_dataclass(schema):
            known = [f.name for f in fields(schema)]
            if leaf not in known:
                hint = _close(leaf, known, head + "." if head else "")
                return f"{key}: no such option; {hint} (documented in {docs})"
    return None


def field_docs(schema: type) -> dict[str, str]:
    """The docstring under each field of a dataclass schema and of the schemas it extends (read from their source:
    Python keeps none at run time), whitespace collapsed."""
    docs: dict[str, str] = {}
    for cls in reversed([c for c in schema.__mro__ if is_dataclass(c)]):  # a subclass's own doc wins
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr):
                if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text(usage: str, schema: type, width: int = 100) -> str:
    """``--help`` of an entry point whose options are the fields of one dataclass: the usage text, then every
    option with its default and its documentation."""
    lines = [usage.strip(), "", "Options (key=value; Hydra syntax, e.g. inputs=[a.txt,b.xml]):", ""]
    docs, defaults = field_docs(schema), schema()
    for f in fields(schema):
        value = getattr(defaults, f.name)
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f"  {f.name}={shown.replace(chr(39), '')}")
        lines += textwrap.wrap(docs.get(f.name, ""), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"
