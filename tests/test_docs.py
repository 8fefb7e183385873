"""Keep the documentation honest.

The reference pages and the README must describe the code as it is:

* every key the configuration parser accepts, and every ``twistd echfront``
  flag, is in docs/configuration.rst;
* every option of every ``echfront`` subcommand is in the docs;
* every TOML example in the docs is a valid configuration;
* every ``echfront ...`` command line shown runs (in a temporary directory,
  in the order shown) and every ``twistd ... echfront ...`` line parses;
* the README names the two commands a newcomer needs.

The parser's known keys are read from echfront/config/schema.py with ``ast`` (the
``_Section(data, "table", ("key", ...))`` calls), so nothing is added to the
code for the tests' sake.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from echfront import cli
from echfront.config.schema import parse_config
from echfront.tap import Options

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CONFIG_DOC = DOCS / "configuration.rst"
CONFIG_SOURCE = ROOT / "echfront" / "config" / "schema.py"

#: The two commands of the README (issue 2 and 3): set-up and run, and tests.
INSTALL_AND_RUN = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/twistd -n echfront"
TEST_COMMAND = ".ci/run"

#: Absolute paths in documented commands that the tests map into a temporary directory.
PLACEHOLDER_DIRS = ("/etc/echfront/",)


def doc_files() -> list[Path]:
    """The reStructuredText pages (docs/_build excluded)."""
    return sorted(p for p in DOCS.glob("*.rst"))


# -- reading the parser -------------------------------------------------------


@dataclass(frozen=True)
class KnownKey:
    """A key accepted by one ``_Section`` of the parser.

    :ivar table: the table's name as far as the source shows it (``limits``,
        ``backends.`` for ``f"backends.{name}"``), "" at top level, None when
        it is a variable.
    """

    table: str | None
    key: str
    line: int


def _string_tuple(node: ast.expr, names: dict[str, tuple[str, ...]]) -> tuple[str, ...] | None:
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Tuple | ast.List) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return tuple(str(e.value) for e in node.elts if isinstance(e, ast.Constant))
    return None


def _table_label(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        prefix = ""
        for part in node.values:
            if not isinstance(part, ast.Constant):
                break
            prefix += str(part.value)
        return prefix
    return None


def known_config_keys() -> list[KnownKey]:
    """Every key of every ``_Section(...)`` call in echfront/config/schema.py."""
    tree = ast.parse(CONFIG_SOURCE.read_text(encoding="utf-8"))
    names: dict[str, tuple[str, ...]] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            value = _string_tuple(statement.value, {})
            if isinstance(target, ast.Name) and value is not None:
                names[target.id] = value
    found: list[KnownKey] = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "_Section"
        ):
            continue
        assert len(node.args) == 3, f"config.py:{node.lineno}: _Section call changed shape"
        keys = _string_tuple(node.args[2], names)
        assert keys is not None, f"config.py:{node.lineno}: cannot read the known keys"
        label = _table_label(node.args[1])
        found.extend(KnownKey(label, key, node.lineno) for key in keys)
    return found


# -- reading reStructuredText ---------------------------------------------------

_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")


def sections(text: str) -> list[tuple[str, str]]:
    """Split a page into (title, body) pairs at its section headings."""
    lines = text.splitlines()
    starts: list[tuple[int, str]] = [(0, "")]
    for i in range(1, len(lines)):
        title = lines[i - 1].strip()
        if title and _UNDERLINE.match(lines[i]) and len(lines[i].strip()) >= len(title):
            starts.append((i - 1, title))
    result = []
    for index, (start, title) in enumerate(starts):
        end = starts[index + 1][0] if index + 1 < len(starts) else len(lines)
        result.append((title, "\n".join(lines[start:end])))
    return result


def directive_blocks(text: str, directive: str) -> Iterator[tuple[str, str, int]]:
    """Yield (argument, content, line number) of each ``.. directive:: argument``."""
    lines = text.splitlines()
    pattern = re.compile(rf"^(\s*)\.\. {re.escape(directive)}::\s*(.*)$")
    for number, line in enumerate(lines):
        match = pattern.match(line)
        if match is None:
            continue
        indent = len(match.group(1))
        body: list[str] = []
        for following in lines[number + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        # Drop the directive's options (":language: toml") and dedent.
        content = [b for b in body if not re.match(r"^\s*:[\w-]+:", b)]
        margin = min(
            (len(c) - len(c.lstrip()) for c in content if c.strip()),
            default=0,
        )
        yield match.group(2).strip(), "\n".join(c[margin:] for c in content), number + 1


def definition_body(text: str, term: str) -> str:
    """The text of the definition-list entry whose term line is ``term``."""
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if line.strip() == term:
            indent = len(line) - len(line.lstrip())
            body = []
            for following in lines[number + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                body.append(following)
            return " ".join(" ".join(body).split())
    return ""


def _readme_blocks() -> Iterator[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    fence = re.compile(r"^([ \t]*)```(\w*)\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
    for match in fence.finditer(text):  # fences may be indented inside list items
        yield match.group(2), match.group(3)


def _rst_blocks(page: Path) -> Iterator[tuple[str, str]]:
    text = page.read_text(encoding="utf-8")
    for argument, content, _ in directive_blocks(text, "code-block"):
        yield argument, content


def _literal(key: str) -> re.Pattern[str]:
    """``key``, ``[key]``, ``[[key]]`` or ``[key.NAME]`` as an inline literal."""
    return re.compile(rf"``\[*{re.escape(key)}(``|[\].])")


# -- the configuration reference ------------------------------------------------


def test_parser_keys_are_found() -> None:
    keys = known_config_keys()
    # A sanity floor: if the parser's shape changes, this test must be updated.
    assert {"listen", "default", "first_flight_timeout", "endpoint", "require_ech"} <= {
        k.key for k in keys
    }


@pytest.mark.parametrize("known", known_config_keys(), ids=lambda k: f"{k.table}:{k.key}")
def test_every_config_key_is_documented(known: KnownKey) -> None:
    text = CONFIG_DOC.read_text(encoding="utf-8")
    literal = _literal(known.key)
    table = re.split(r"[.\[]", known.table)[0] if known.table else ""
    if table:
        # A key of [limits] must be described in the section about [limits].
        bodies = [body for title, body in sections(text) if f"[{table}" in title]
        assert bodies, f"docs/configuration.rst has no section titled with [{table}]"
        where = f"the [{table}] section of docs/configuration.rst"
    else:
        bodies = [text]
        where = "docs/configuration.rst"
    assert any(literal.search(body) for body in bodies), (
        f"config.py line {known.line} accepts {known.key!r}, which {where} does not describe"
    )


def _option_names() -> list[str]:
    options = Options()
    return sorted(
        name.rstrip("=") for name in options.longOpt if name.rstrip("=") not in ("help", "version")
    )


@pytest.mark.parametrize("flag", _option_names())
def test_every_twistd_flag_is_documented(flag: str) -> None:
    text = CONFIG_DOC.read_text(encoding="utf-8")
    assert re.search(rf"``--{re.escape(flag)}\b", text), (
        f"twistd echfront --{flag} is not described in docs/configuration.rst"
    )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def test_limit_defaults_match_the_code(tmp_path: Path) -> None:
    settings = parse_config({}, base=tmp_path).settings
    text = CONFIG_DOC.read_text(encoding="utf-8")
    checked = 0
    for known in known_config_keys():
        if known.table != "limits" or not hasattr(settings, known.key):
            continue
        body = definition_body(text, f"``{known.key}``")
        expected = f"default {_number(getattr(settings, known.key))}"
        assert expected in body, f"limits.{known.key}: the docs should say {expected!r}: {body!r}"
        checked += 1
    assert checked >= 3


# -- the operations reference ------------------------------------------------------


def metric_names() -> list[str]:
    """Every metric echfront/front/metrics.py registers (the first argument of each metric)."""
    source = (ROOT / "echfront" / "front" / "metrics.py").read_text(encoding="utf-8")
    return sorted(set(re.findall(r"\(\s*\"(echfront_[a-z0-9_]+)\"", source)))


def test_metrics_are_found() -> None:
    assert "echfront_connections_total" in metric_names()


@pytest.mark.parametrize("name", metric_names())
def test_every_metric_is_documented(name: str) -> None:
    text = (DOCS / "operations.rst").read_text(encoding="utf-8")
    assert re.search(rf"``{name}[`{{]", text), f"metric {name} is not in docs/operations.rst"


def test_every_log_field_is_documented() -> None:
    from echfront.front.connection import CONNECTION_FIELDS  # noqa: PLC0415 (only this test)

    text = (DOCS / "operations.rst").read_text(encoding="utf-8")
    missing = [f for f in CONNECTION_FIELDS if f"``{f}``" not in text]
    assert not missing, f"connection log fields not in docs/operations.rst: {missing}"


# -- the echfront command line ----------------------------------------------------


def _cli_help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 0
    return out.getvalue()


def _subcommands() -> list[str]:
    match = re.search(r"\{([a-z,-]+)\}", _cli_help(["--help"]))
    assert match is not None
    return match.group(1).split(",")


@pytest.mark.parametrize("command", _subcommands())
def test_every_cli_option_is_documented(command: str) -> None:
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", _cli_help([command, "--help"])))
    options.discard("--help")
    text = "\n".join(p.read_text(encoding="utf-8") for p in doc_files())
    missing = sorted(o for o in options if not re.search(rf"``{re.escape(o)}\b", text))
    assert not missing, f"echfront {command}: {missing} not described in docs/"


# -- examples ----------------------------------------------------------------------


def toml_examples() -> list[tuple[str, str]]:
    """(where, text) of every TOML example: code blocks, included files, README fences."""
    examples = [("README.md", block) for lang, block in _readme_blocks() if lang == "toml"]
    for page in doc_files():
        text = page.read_text(encoding="utf-8")
        for argument, content, line in directive_blocks(text, "code-block"):
            if argument == "toml":
                examples.append((f"{page.name}:{line}", content))
        for argument, _, line in directive_blocks(text, "literalinclude"):
            if argument.endswith(".toml"):
                included = (page.parent / argument).resolve()
                examples.append((f"{page.name}:{line}", included.read_text(encoding="utf-8")))
    return examples


def test_docs_have_toml_examples() -> None:
    assert len(toml_examples()) >= 10


@pytest.mark.parametrize(("where", "text"), toml_examples(), ids=lambda v: str(v)[:40])
def test_toml_example_is_a_valid_configuration(where: str, text: str, tmp_path: Path) -> None:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        pytest.fail(f"{where}: not valid TOML: {error}")
    parse_config(data, base=tmp_path)  # raises ConfigError naming the key


def test_literal_includes_exist() -> None:
    for page in doc_files():
        text = page.read_text(encoding="utf-8")
        for argument, _, line in directive_blocks(text, "literalinclude"):
            assert (page.parent / argument).is_file(), f"{page.name}:{line}: {argument} is missing"


# -- command lines shown -----------------------------------------------------------


def shell_commands(language: str, block: str) -> list[list[str]]:
    """The simple commands in a shell or console block, as argument lists.

    In ``console`` blocks only lines starting with ``$`` are commands (the
    rest is output); a trailing backslash continues a line; ``&&``, ``;``
    and ``|`` separate commands; ``VAR=value`` prefixes are dropped.
    """
    if language not in ("sh", "shell", "bash", "console"):
        return []
    lines: list[str] = []
    continuing = False
    for raw in block.splitlines():
        line = raw.strip()
        if continuing:
            lines[-1] += " " + line.rstrip("\\")
        elif language == "console":
            if not line.startswith("$ "):
                continue
            lines.append(line[2:].rstrip("\\"))
        elif line:
            lines.append(line.rstrip("\\"))
        continuing = raw.rstrip().endswith("\\")
    commands = []
    for line in lines:
        current: list[str] = []
        for token in [*shlex.split(line, comments=True), "&&"]:
            if token in ("&&", ";", "|", "||"):
                while current and re.match(r"^[A-Z_]+=", current[0]):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def documented_commands() -> list[tuple[str, list[list[str]]]]:
    """(document, commands in order) for the README and every page."""
    found = [
        ("README.md", [c for lang, b in _readme_blocks() for c in shell_commands(lang, b)]),
    ]
    for page in doc_files():
        commands = [c for lang, b in _rst_blocks(page) for c in shell_commands(lang, b)]
        found.append((page.name, commands))
    return found


def _is(program: str, argv: list[str]) -> bool:
    return bool(argv) and Path(argv[0]).name == program


def test_commands_are_found() -> None:
    every = [c for _, commands in documented_commands() for c in commands]
    assert sum(_is("echfront", c) for c in every) >= 8
    assert sum(_is("twistd", c) for c in every) >= 3


@pytest.mark.parametrize(
    ("document", "commands"), documented_commands(), ids=[d for d, _ in documented_commands()]
)
def test_echfront_commands_run(
    document: str,
    commands: list[list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Run a document's ``echfront`` lines in order in an empty directory."""
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        if not _is("echfront", argv):
            continue
        args = [_relocate(a, tmp_path) for a in argv[1:]]
        try:
            status = cli.main(args)
        except SystemExit as exited:  # --help
            status = exited.code if isinstance(exited.code, int) else 1
        output = capsys.readouterr()
        assert status == 0, f"{document}: `{shlex.join(argv)}` failed: {output.err.strip()}"


@pytest.mark.parametrize(
    ("document", "commands"), documented_commands(), ids=[d for d, _ in documented_commands()]
)
def test_twistd_command_lines_parse(document: str, commands: list[list[str]]) -> None:
    for argv in commands:
        if not _is("twistd", argv) or "echfront" not in argv:
            continue
        options = Options()
        try:
            options.parseOptions(argv[argv.index("echfront") + 1 :])  # type: ignore[no-untyped-call]
        except Exception as error:
            pytest.fail(f"{document}: `{shlex.join(argv)}`: {error}")


def _relocate(argument: str, tmp_path: Path) -> str:
    for directory in PLACEHOLDER_DIRS:
        if argument.startswith(directory):
            return str(tmp_path / argument[len(directory) :])
    return argument


# -- the README ----------------------------------------------------------------------


def test_readme_names_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert INSTALL_AND_RUN in text
    assert re.search(rf"^{re.escape(TEST_COMMAND)}$", text, re.MULTILINE)


def test_readme_links_to_the_docs() -> None:
    text = README.read_text(encoding="utf-8")
    for page in ("docs/configuration.rst", "docs/security.rst"):
        assert page in text
        assert (ROOT / page).is_file()
