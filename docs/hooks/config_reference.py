"""The configuration reference, made from `conf/` itself: every YAML key with its default and its comment.

Each key in `conf/` carries a comment (on its line, continued on the lines below it at the same column, or on the
lines just above it); this module reads them back, so the reference page cannot go stale. `undocumented` lists
the keys without one, which the test suite refuses. As an MkDocs hook, it writes the page
`reference/configuration.md` into the site at build time (nothing is checked in).
"""

import re
from dataclasses import dataclass
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"
PAGE = "reference/configuration.md"
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w\-.]*|\"[^\"]+\"):(?P<rest>.*)$")
LIST_LINE = re.compile(r"^(?P<indent> *)- ")


@dataclass
class Key:
    """One YAML key: its dotted name in the file, its value as written (empty for a block) and its comment."""

    name: str
    value: str
    comment: str
    line: int


@dataclass
class ConfigFile:
    name: str  # its path under conf/ without .yaml: `train`, `data/_common`
    about: str  # the comment block at the top of the file
    keys: list[Key]


def split_comment(text: str) -> tuple[str, str]:
    """(value, comment) of what follows a key's colon: a `#` after whitespace, outside quotes, starts a comment."""
    quote = ""
    for i, character in enumerate(text):
        if quote:
            quote = "" if character == quote else quote
        elif character in "'\"":
            quote = character
        elif character == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def read_config(path: Path, conf: Path = CONF) -> ConfigFile:
    lines = path.read_text(encoding="utf-8").splitlines()
    about: list[str] = []
    keys: list[Key] = []
    parents: list[tuple[int, str]] = []  # (indent, key) of the blocks the current line sits in
    above: list[str] = []  # comment lines waiting for the key below them
    last: Key | None = None  # the key whose comment a continuation line extends
    column = -1  # the column of that key's comment
    in_list = -1  # indent of a list being skipped (its items are values, not keys)
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if not stripped:
            above, last = [], None
            continue
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if last is not None and line.index("#") == column:
                last.comment = f"{last.comment} {text}".strip()
            elif not keys and not parents and not above and last is None and in_list < 0 and not text.startswith("@package"):
                about.append(text)
            elif not text.startswith("@package"):
                above.append(text)
            continue
        if in_list >= 0 and indent >= in_list and (LIST_LINE.match(line) or indent > in_list):
            last = None
            continue
        in_list = -1
        match = KEY_LINE.match(line)
        if not match:
            last = None
            continue
        while parents and parents[-1][0] >= indent:
            parents.pop()
        key = match["key"].strip('"')
        value, comment = split_comment(match["rest"])
        if not comment and above:
            comment = " ".join(above)
        entry = Key(".".join([*(name for _, name in parents), key]), value, comment, number)
        keys.append(entry)
        above = []
        last, column = (entry, line.index("#", len(line) - len(match["rest"]))) if "#" in match["rest"] and comment \
            else (None, -1)
        if not value:
            parents.append((indent, key))
            following = next((later for later in lines[number:] if later.strip() and not later.strip().startswith("#")), "")
            if LIST_LINE.match(following):
                in_list = len(following) - len(following.lstrip(" "))
                parents.pop()
    if about and about == [k.comment for k in keys[:1]]:
        about = []
    return ConfigFile(path.relative_to(conf).with_suffix("").as_posix(), " ".join(about), keys)


def config_files(conf: Path = CONF) -> list[ConfigFile]:
    """Every file of conf/. A key set without a comment takes the comment of the key it sets, from the group that
    defines it: `data.image_size: 224` in an experiment, or `accelerator` in trainer/gpu.yaml (trainer/default.yaml)."""
    files = [read_config(path, conf) for path in sorted(conf.rglob("*.yaml"))]
    defined: dict[str, str] = {}
    for config in files:
        group = config.name.split("/")[0] if "/" in config.name else ""
        for key in config.keys:
            if group and key.comment:
                defined.setdefault(f"{group}.{key.name}", key.comment)
    for config in files:
        group = config.name.split("/")[0] if "/" in config.name else ""
        for key in config.keys:
            if not key.comment and key.value:
                key.comment = defined.get(key.name) or defined.get(f"{group}.{key.name}", "")
    return files


def undocumented(conf: Path = CONF) -> list[str]:
    """`file.yaml:line key` for each key of conf/ that has no comment."""
    return [f"{config.name}.yaml:{key.line} {key.name}" for config in config_files(conf)
            for key in config.keys if needs_comment(key) and not key.comment]


def needs_comment(key: Key) -> bool:
    """A key with a value: blocks are explained by their keys, `defaults` lists by the groups they pick, and a
    `_target_` names the class it builds."""
    return bool(key.value) and key.name != "defaults" and not key.name.endswith("_target_")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """The page: the entry configurations first, then one section per config group, one table per file."""
    files = config_files()
    entries = [config for config in files if "/" not in config.name]
    groups: dict[str, list[ConfigFile]] = {}
    for config in files:
        if "/" in config.name:
            groups.setdefault(config.name.split("/")[0], []).append(config)
    parts = ["# Configuration reference",
             "Every key of `conf/`, its default and what it does, read from the YAML files themselves at build time "
             "(`docs/hooks/config_reference.py`). Change a key on the command line as `key=value`, pick a file of a "
             "group as `group=name` (e.g. `python train.py model=densenet121 data.image_size=384`).",
             "## Entry configurations"]
    parts += [_file_section(config, level=3) for config in entries]
    for group, members in groups.items():
        parts.append(f"## `{group}`")
        parts += [_file_section(config, level=3) for config in members]
    return "\n\n".join(parts) + "\n"


def _file_section(config: ConfigFile, level: int) -> str:
    lines = [f"{'#' * level} `{config.name}.yaml`"]
    if config.about:
        lines += ["", _cell(config.about)]
    rows = [key for key in config.keys if key.name != "defaults"]
    if rows:
        lines += ["", "| key | default | what it does |", "| --- | --- | --- |"]
        lines += [f"| `{key.name}` | {'`' + _cell(key.value) + '`' if key.value else ''} | {_cell(key.comment)} |"
                  for key in rows]
    return "\n".join(lines)


def on_files(files, config):
    """MkDocs hook: add the generated page to the site."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=reference_markdown()))
    return files
