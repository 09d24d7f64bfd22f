"""Whole sets of SAEs or transcoders, one `--sae` spec each, spliced jointly at every layer.

A set is a folder whose sub-folders are SAEs or transcoders (any format harness/splice/
replacements.py reads), a glob over such folders, a circuit-tracer `transcoder_set` folder
(harness/splice/transcoders.py), or the shipped demo `skip-transcoders` (a skip transcoder at
every block of the embedded default). Its members must agree on the model and the width and
write different hooks.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UserError
from harness.model.loading import hook_layer
from harness.splice import transcoders
from harness.splice.replacements import FOLDER_FORMATS, Replacement, from_sae
from harness.files import sha256

DEMO_SETS = {"skip-transcoders": Path(__file__).resolve().parents[1] / "demo_transcoders"}


@dataclass
class ReplacementSet:
    name: str
    members: list[Replacement]  # ordered by the layer they write


def is_set_spec(spec: str) -> bool:
    if spec in DEMO_SETS:
        return True
    if any(c in spec for c in "*?["):
        return True
    path = Path(spec).expanduser()
    if not path.is_dir():
        return False
    if (path / "config.yaml").exists():
        return transcoders.ct_config(path)["model_kind"] == "transcoder_set"
    return _member_folders(path) != [] and not _is_single_folder(path)


def _is_single_folder(path: Path) -> bool:
    """A folder one loader reads: its format's first mark (FOLDER_FORMATS), or Gemma Scope 2's."""
    return any((path / marks[0]).exists() for marks in FOLDER_FORMATS.values()) or transcoders.is_gemma_scope_2(path)


def _member_folders(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and _is_single_folder(p)), key=_natural)


def _natural(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def load_set(spec: str, load_one) -> ReplacementSet:
    """The members of a set spec, each loaded by `load_one(spec)`, checked to agree."""
    if spec in DEMO_SETS:
        folder = DEMO_SETS[spec]
        if not folder.exists():
            raise UserError(f"the demo set {spec} is not shipped in this installation ({folder})")
        name, folders = spec, _member_folders(folder)
    elif any(c in spec for c in "*?["):
        folders = sorted((Path(p) for p in glob.glob(str(Path(spec).expanduser())) if Path(p).is_dir()), key=_natural)
        if not folders:
            raise UserError(f"no folder matches {spec}")
        name = spec
    else:
        path = Path(spec).expanduser()
        if (path / "config.yaml").exists():
            members = [from_sae(f"{path.name}/layer_{layer}", str(f), tc, {str(f): sha256(f)})
                       for layer, f, tc in transcoders.read_ct_transcoder_set(path)]
            return ReplacementSet(path.name, check_set(path.name, members))
        name, folders = path.name, _member_folders(path)
    members = [load_one(str(f)) for f in folders]
    for f, m in zip(folders, members):
        m.name = f"{name}/{f.name}"
        if spec in DEMO_SETS:  # a shipped set's members go by name, not by where it is installed
            m.spec = m.name
    return ReplacementSet(name, check_set(name, members))


def check_set(name: str, members: list) -> list:
    """Members in forward order; one line for a set that disagrees on model or width, or
    writes one hook twice."""
    if not members:
        raise UserError(f"set {name} has no members")
    models = {m.model_name for m in members if m.model_name}
    if len(models) > 1:
        raise UserError(f"set {name}: its members name different models ({', '.join(sorted(models))})")
    widths = {int(m.sae.cfg.d_sae) for m in members if m.sae is not None and hasattr(m.sae, "cfg")}
    if len(widths) > 1:
        raise UserError(f"set {name}: its members have different widths ({', '.join(map(str, sorted(widths)))})")
    writes = [h for m in members for h in m.writes]
    if len(set(writes)) != len(writes):
        raise UserError(f"set {name}: two members write the same hook")
    return sorted(members, key=lambda m: hook_layer(m.writes[0]))


