"""The CLI modules form no import circle: the commands that live in their own modules import only
``qwen1m.cli_common`` (never ``qwen1m.cli``, which registers them), the trainer never imports its
CLI, each module imports on its own in a fresh interpreter, and ``qwen1m --help`` imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import qwen1m

SRC = Path(qwen1m.__file__).parent
COMMAND_MODULES = ["cli_demo.py", "eval/cli.py", "server/cli.py", "train/cli.py", "cli_common.py",
                   "engine_config.py"]


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from qwen1m import cli
    return found


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_command_modules_never_import_the_main_cli(module):
    assert "qwen1m.cli" not in _imported_modules(SRC / module)


def test_the_trainer_never_imports_its_cli():
    assert "qwen1m.train.cli" not in _imported_modules(SRC / "train" / "trainer.py")


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from qwen1m import cli\n    return cli\n")
    assert "qwen1m.cli" in _imported_modules(source)


@pytest.mark.parametrize("module", ["qwen1m.cli", "qwen1m.cli_common", "qwen1m.engine_config", "qwen1m.cli_demo",
                                    "qwen1m.eval.cli", "qwen1m.server.cli", "qwen1m.train.cli"])
def test_each_cli_module_imports_alone_without_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_help_of_every_command_imports_no_torch():
    code = ("import sys\n"
            "from qwen1m.cli import main\n"
            "for argv in (['--help'], ['generate', '--help'], ['serve', '--help'], ['eval', 'passkey', '--help'],\n"
            "             ['demo', '--help'], ['calibrate', '--help'], ['train', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
