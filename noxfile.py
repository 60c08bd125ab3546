"""Sessions: tests, equivalence (the CI gate for new families), goldens, lint, bench, demo.

They run in the current environment (`pip install torch==2.13.0 -e ".[test,megatron,train,ray]"`
first): torch is gigabytes, its CPU or CUDA build is the user's choice, and one install
should serve every session rather than one virtualenv each.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]

# The gate: every registered family x every conversion path, against the originals.
EQUIVALENCE = ["tests/test_equivalence.py", "tests/test_unified.py", "tests/test_goldens.py",
               "tests/test_registry.py", "tests/test_config_defaults.py", "tests/test_families_table.py",
               "tests/test_moe.py", "tests/test_deepseek.py", "tests/test_sequence_parallel_matrix.py",
               "tests/megatron"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, one xdist worker per core."""
    session.run("pytest", "-n", "auto", "--dist", "loadgroup", *session.posargs)


@nox.session
def equivalence(session: nox.Session) -> None:
    """Every family x every target, logits against the original implementation."""
    missing = [p for p in EQUIVALENCE if not Path(p).exists()]
    if missing:  # a gate that drops a path passes without it
        session.error(f"the gate's {', '.join(missing)} is missing: restore it or remove it from EQUIVALENCE")
    # REFERENCE_EQUIVALENCE: the full matrices, where a test keeps a handful by default
    session.run("pytest", "-n", "auto", "--dist", "loadgroup", *EQUIVALENCE, *session.posargs,
                env={"REFERENCE_EQUIVALENCE": "1"})


@nox.session
def goldens(session: nox.Session) -> None:
    """Regenerate goldens/ from the installed transformers (the only way they change)."""
    session.run("python", "tests/make_goldens.py")


@nox.session
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark in benchmarks/, each printing a markdown table."""
    for script in sorted(Path("benchmarks").glob("bench_*.py")):
        session.run("python", str(script), *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    session.run("reference", "demo")
