"""Packaging: a build that cannot compile the extension (torch missing, as in pip's isolated
build environment) says so plainly and tags the version; a required one fails. Runs setup.py
--version only (nothing is built)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")


def _setup_version(**env):
    return subprocess.run([sys.executable, "-c", NO_TORCH], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_build_without_torch_says_so_and_tags_the_version():
    out = _setup_version(MOELORA_BUILD_EXTENSION="auto")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0.1.0+noext"
    assert "NOT building the compiled extension" in out.stderr
    assert "pip install --no-build-isolation ." in out.stderr


def test_required_extension_without_torch_fails():
    out = _setup_version(MOELORA_BUILD_EXTENSION="1")
    assert out.returncode != 0
    assert "required but cannot be built" in out.stderr


def test_license_and_typing_marker_ship():
    assert "Apache License" in open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert os.path.exists(os.path.join(ROOT, "moelora", "py.typed"))
    setup_py = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    assert 'license="Apache-2.0"' in setup_py and '"py.typed"' in setup_py


def test_env_reports_integrations_and_answers_help():
    from moelora import env

    assert env._version("moelora_no_such_module") == "not installed"
    help_out = subprocess.run([sys.executable, "-m", "moelora.env", "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    assert help_out.returncode == 0 and "usage: python -m moelora.env" in help_out.stdout
    report = subprocess.run([sys.executable, "-m", "moelora.env"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr
    for name in ("transformers", "peft", "trl"):
        line = next(l for l in report.stdout.splitlines() if l.startswith(name + " "))
        assert line.split(maxsplit=1)[1].strip()  # a version or "not installed"
