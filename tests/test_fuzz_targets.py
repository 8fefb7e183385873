"""Bounded CI runs of the coverage-guided fuzz targets in tests/fuzz/.

Two runs per target, both bounded in inputs and time:

* in process, uninstrumented: every seed, then a fixed set of byte-level
  mutations of each (seeded, so every CI run feeds the same inputs);
* under atheris (libFuzzer) in a subprocess, from the seed corpus, for a
  fixed number of inputs with a memory cap: a finding makes libFuzzer exit
  non-zero and write a ``crash-*`` file.

The long runs are by hand (docs/security.rst, "Testing"); the targets'
contract is in tests/fuzz/__init__.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from echfront.ech.decoder import ECHDecoder
from echfront.errors import AlertError
from tests.fuzz import TARGETS

ROOT = Path(__file__).resolve().parent.parent
#: Mutations per seed in process, and inputs for the atheris run.
MUTATIONS_PER_SEED = 150
ATHERIS_RUNS = 2000


def target(name: str) -> ModuleType:
    return importlib.import_module(f"tests.fuzz.{name}")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four byte-level mutations, like libFuzzer's simplest ones."""
    for _ in range(rng.randint(1, 4)):
        if not data:
            return bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        pos = rng.randrange(len(data))
        kind = rng.randrange(6)
        if kind == 0:
            data = data[:pos] + bytes((data[pos] ^ (1 << rng.randrange(8)),)) + data[pos + 1 :]
        elif kind == 1:
            data = data[:pos] + bytes((rng.randrange(256),)) + data[pos + 1 :]
        elif kind == 2:
            data = data[: max(pos, 2)]
        elif kind == 3:
            data = data[:pos] + rng.randbytes(rng.randint(1, 32)) + data[pos:]
        elif kind == 4:
            data = data[:pos] + data[pos + rng.randint(1, 32) :]
        else:
            end = min(len(data), pos + rng.randint(1, 64))
            data = data[:pos] + data[pos:end] * 2 + data[end:]
    return data


@pytest.mark.parametrize("name", TARGETS)
def test_seeds_and_mutations_in_process(name: str) -> None:
    module = target(name)
    rng = random.Random(f"echfront-fuzz-{name}")
    seeds = module.seeds()
    assert seeds
    for seed in seeds:
        module.test_one_input(seed)
        for _ in range(MUTATIONS_PER_SEED):
            module.test_one_input(mutate(seed, rng))


def test_clienthello_target_reports_a_foreign_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    """The target swallows alerts only: anything else the decoder raises is a finding."""
    module = target("clienthello")
    (stream_seed, *_) = module.seeds()

    def broken(self: ECHDecoder, *args: object, **kwargs: object) -> object:
        raise IndexError("a parser bug")

    monkeypatch.setattr(ECHDecoder, "decode", broken)
    with pytest.raises(IndexError):
        module.test_one_input(stream_seed)

    def refusing(self: ECHDecoder, *args: object, **kwargs: object) -> object:
        raise AlertError("refused")

    monkeypatch.setattr(ECHDecoder, "decode", refusing)
    module.test_one_input(stream_seed)


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed for this Python (pip install atheris)",
)
@pytest.mark.parametrize("name", TARGETS)
def test_atheris_run_finds_nothing(name: str, tmp_path: Path) -> None:
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    artifacts.mkdir()
    command = [
        sys.executable,
        "-m",
        f"tests.fuzz.{name}",
        str(corpus),
        f"-atheris_runs={ATHERIS_RUNS}",
        "-max_total_time=90",
        "-rss_limit_mb=1024",
        f"-artifact_prefix={artifacts}/",
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert list(artifacts.iterdir()) == [], output[-4000:]
    assert "Done" in output, output[-4000:]
    assert len(list(corpus.iterdir())) >= len(target(name).seeds())
